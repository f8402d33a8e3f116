"""Data stage: the generated world, normalised HotpotQA-style questions, the CoT/CoA sample and the RL pool."""

import collections

import dagster as dg
import pyarrow as pa
from pydantic import Field

from assets.metadata import bar_plot, latest_metadata, markdown_table, table_metadata, timed
from assets.quality import REJECTED_EXPECTATIONS, gx_check
from assets.storage import StorageResource
from qadata.checks import answer_in_gold
from qadata.loaders import SourceSpec, count_records, load_sources, normalise_hotpot
from qadata.sampling import sample_questions
from qadata.schema import QUESTION_SCHEMA, questions_table, reason_kind, rejected_table
from qadata.text import normalise_question
from qadata.world import WorldSpec, build_world, generate_questions

GROUP = "data"
SAMPLE_SCHEMA = QUESTION_SCHEMA.append(pa.field("pool", pa.string())).append(pa.field("stratum", pa.string()))


# -- embedded_world -----------------------------------------------------------------------------
class EmbeddedWorldConfig(dg.Config):
    seed: int = Field(13, description="Seed of the generated world; the same seed gives the same data.")
    countries: int = Field(24, description="Fictional countries.")
    places: int = Field(300, description="Cities.")
    people: int = Field(1200, description="People (each with occupation, birth city/year, employer).")
    orgs: int = Field(300, description="Organisations.")
    works: int = Field(1200, description="Creative works.")
    questions: int = Field(1000, description="Questions of 1 to 4 hops (mix: hop_mix); 1,000 leaves 200 held out.")
    hop_mix: list[float] = Field(
        default_factory=lambda: [0.1, 0.5, 0.25, 0.15],
        description=("Shares of 1-, 2-, 3- and 4-hop questions (2-hop: HotpotQA's bridge and comparison, half each)."),
    )
    dev_fraction: float = Field(0.2, description="Share of questions held out as the 'dev' split.")


@dg.asset(group_name=GROUP, kinds={"python", "parquet"})
def embedded_world(context: dg.AssetExecutionContext, config: EmbeddedWorldConfig) -> dg.Output[pa.Table]:
    """Bridge and comparison questions over a generated fictional world, in the Hugging Face HotpotQA layout."""
    md: dict = {}
    with timed(md):
        world = build_world(WorldSpec(**{**config.model_dump(), "hop_mix": tuple(config.hop_mix)}))
        rows = generate_questions(world)
        table = pa.Table.from_pylist(rows)
    kinds = collections.Counter(e.kind for e in world.entities.values())
    context.log.info("generated %d entities and %d questions (seed %d)", len(world.entities), len(rows), config.seed)
    md.update(table_metadata(table, preview_columns=["id", "question", "answer", "type", "level", "split"]))
    md["entities"] = dg.MetadataValue.json(dict(kinds))
    md["paragraphs"] = len(world.entities)
    return dg.Output(table, metadata=md)


@dg.asset_check(
    asset=embedded_world,
    blocking=True,
    description="Every question parses as HotpotQA and is answerable from its gold sentences.",
)
def embedded_world_is_answerable(embedded_world: pa.Table) -> dg.AssetCheckResult:
    problems = []
    for i, raw in enumerate(embedded_world.to_pylist()):
        rec = normalise_hotpot(raw, source="embedded", split=raw["split"], source_file="embedded", source_row=i)
        if not answer_in_gold(rec, sentences_only=True):
            problems.append(f"{rec['id']}: answer {rec['answer']!r} not in its supporting sentences")
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={
            "questions": embedded_world.num_rows,
            "unanswerable": len(problems),
            "examples": "\n".join(problems[:5]),
        },
    )


# -- hotpotqa_raw -------------------------------------------------------------------------------
class HotpotqaRawConfig(dg.Config):
    use_embedded: bool = Field(
        True, description="Include the generated fictional-world questions (the default source)."
    )
    files: list[str] = Field(
        default_factory=list,
        description=(
            "Extra sources as 'path[::split[::layout]]': official HotpotQA .json, Hugging Face .jsonl/.parquet, "
            "or verl/AutoCoA .parquet. Layout is detected when omitted; split is inferred from the file name."
        ),
    )


@dg.multi_asset(
    group_name=GROUP,
    outs={
        "hotpotqa_raw": dg.AssetOut(
            description="Questions from every configured source in one normalised schema, with source and split kept.",
            kinds={"parquet"},
        ),
        "hotpotqa_raw_rejected": dg.AssetOut(
            description="Input rows that could not be normalised, each with the file, row and reason.",
            kinds={"parquet"},
        ),
    },
)
def hotpotqa_raw(context: dg.AssetExecutionContext, config: HotpotqaRawConfig, embedded_world: pa.Table):
    md: dict = {}
    with timed(md):
        specs = [SourceSpec.parse(f) for f in config.files]
        extra = []
        if config.use_embedded:
            extra = [
                normalise_hotpot(r, source="embedded", split=r["split"], source_file="embedded_world", source_row=i)
                for i, r in enumerate(embedded_world.to_pylist())
            ]
        rows, rejected = load_sources(specs, extra_rows=extra)
        rows_in = len(extra) + sum(count_records(s) for s in specs)
    if not rows:
        raise dg.Failure(
            f"hotpotqa_raw: no usable question in {config.files or 'the embedded world'} "
            f"({len(rejected)} rows rejected, first reason: {rejected[0].reason if rejected else 'none'})"
        )
    table, rej = questions_table(rows), rejected_table(rejected)
    by_source = collections.Counter((r["source"], r["split"]) for r in rows)
    reasons = collections.Counter(reason_kind(r.reason) for r in rejected)
    context.log.info("loaded %d questions, rejected %d of %d input rows", len(rows), len(rejected), rows_in)
    if rejected:
        context.log.warning("rejected rows, by reason: %s", dict(reasons.most_common(10)))
    counts = {"rows_in": rows_in, "rows_out": len(rows), "rows_rejected": len(rejected)}
    yield dg.Output(
        table,
        output_name="hotpotqa_raw",
        metadata={
            **md,
            **table_metadata(table, preview_columns=["id", "question", "answer", "type", "level", "source", "split"]),
            **counts,
            "by_source_split": dg.MetadataValue.md(
                markdown_table([{"source": s, "split": sp, "rows": n} for (s, sp), n in sorted(by_source.items())])
            ),
        },
    )
    yield dg.Output(
        rej,
        output_name="hotpotqa_raw_rejected",
        metadata={
            **table_metadata(rej, preview_columns=["source_file", "source_row", "reason"]),
            **counts,
            "reasons": dg.MetadataValue.json(dict(reasons.most_common(20))),
        },
    )


@dg.asset_check(
    asset="hotpotqa_raw",
    blocking=True,
    additional_ins={"rejected": dg.AssetIn("hotpotqa_raw_rejected")},
    description="Counts reconcile: rows read from the sources = rows kept + rows quarantined.",
)
def hotpotqa_raw_counts_reconcile(
    context: dg.AssetCheckExecutionContext, hotpotqa_raw: pa.Table, rejected: pa.Table
) -> dg.AssetCheckResult:
    rows_in = latest_metadata(context.instance, "hotpotqa_raw").get("rows_in")
    ok = rows_in is not None and rows_in == hotpotqa_raw.num_rows + rejected.num_rows
    return dg.AssetCheckResult(
        passed=ok,
        metadata={
            "rows_in": rows_in if rows_in is not None else -1,
            "rows_out": hotpotqa_raw.num_rows,
            "rows_rejected": rejected.num_rows,
        },
    )


@dg.asset_check(
    asset="hotpotqa_raw",
    blocking=True,
    description="Schema, unique ids, no empty question or answer, known type/level values.",
)
def hotpotqa_raw_expectations(hotpotqa_raw: pa.Table) -> dg.AssetCheckResult:
    df = hotpotqa_raw.select(["id", "question", "answer", "type", "level", "source", "split"]).to_pandas()
    df["question_len"] = df["question"].str.len()
    df["answer_len"] = df["answer"].str.len()
    return gx_check(
        df,
        "hotpotqa_raw",
        [
            ("ExpectTableColumnsToMatchSet", {"column_set": list(df.columns), "exact_match": True}),
            ("ExpectColumnValuesToBeUnique", {"column": "id"}),
            ("ExpectColumnValuesToNotBeNull", {"column": "id"}),
            ("ExpectColumnValuesToNotBeNull", {"column": "question"}),
            ("ExpectColumnValuesToBeBetween", {"column": "question_len", "min_value": 1}),
            ("ExpectColumnValuesToBeBetween", {"column": "answer_len", "min_value": 1}),
            ("ExpectColumnValuesToBeInSet", {"column": "type", "value_set": ["bridge", "comparison"]}),
            ("ExpectColumnValuesToBeInSet", {"column": "level", "value_set": ["easy", "medium", "hard"]}),
            (
                "ExpectColumnValuesToBeInSet",
                {"column": "source", "value_set": ["embedded", "hotpotqa_json", "hf", "verl"]},
            ),
        ],
    )


@dg.asset_check(
    asset="hotpotqa_raw",
    description="Answerability: where gold paragraphs exist, the answer (or yes/no) is found in them.",
)
def hotpotqa_raw_answerable(hotpotqa_raw: pa.Table) -> dg.AssetCheckResult:
    checked = missing = 0
    examples = []
    for rec in hotpotqa_raw.select(["id", "answer", "supporting_facts", "context"]).to_pylist():
        found = answer_in_gold(rec)
        if found is None:
            continue
        checked += 1
        if not found:
            missing += 1
            if len(examples) < 5:
                examples.append(f"{rec['id']}: {rec['answer']!r}")
    share = 1.0 - missing / checked if checked else 1.0
    # real HotpotQA has a few answers paraphrased from the paragraphs, so this is a WARN threshold
    return dg.AssetCheckResult(
        passed=share >= 0.9,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"checked": checked, "answer_found_share": round(share, 4), "examples": "\n".join(examples)},
    )


# -- question_sample ----------------------------------------------------------------------------
class QuestionSampleConfig(dg.Config):
    total: int = Field(
        720,
        description=(
            "Questions to sample (embedded: 720 of the world's 800 training questions, the rest left for RL; paper: 20,000)."
        ),
    )
    cot_fraction: float = Field(
        1 / 6,
        description=(
            "Share of the sample in the CoT pool; the rest is the CoA pool (embedded: the paper's 1:5 SFT mix; paper: 0.5)."
        ),
    )
    seed: int = Field(0, description="Sampling seed.")
    splits: list[str] = Field(default_factory=lambda: ["train"], description="Splits of hotpotqa_raw to sample from.")
    eval_splits: list[str] = Field(
        default_factory=lambda: ["dev", "test"],
        description="Splits of hotpotqa_raw that are evaluation sets: their questions never enter the sample.",
    )
    eval_files: list[str] = Field(
        default_factory=list,
        description="Further evaluation sets ('path[::split[::layout]]') whose questions are excluded.",
    )


def _eval_questions(raw: pa.Table, eval_splits: list[str], eval_files: list[str]) -> set[str]:
    qs = {
        normalise_question(r["question"])
        for r in raw.select(["question", "split"]).to_pylist()
        if r["split"] in eval_splits
    }
    if eval_files:
        rows, _ = load_sources([SourceSpec.parse(f) for f in eval_files])
        qs |= {normalise_question(r["question"]) for r in rows}
    return qs


@dg.asset(group_name=GROUP, kinds={"python", "parquet"})
def question_sample(
    context: dg.AssetExecutionContext, config: QuestionSampleConfig, hotpotqa_raw: pa.Table
) -> dg.Output[pa.Table]:
    """Seeded sample of training questions, stratified by level and type, split into disjoint CoT and CoA pools."""
    md: dict = {}
    with timed(md):
        banned = _eval_questions(hotpotqa_raw, config.eval_splits, config.eval_files)
        result = sample_questions(
            hotpotqa_raw.to_pylist(),
            total=config.total,
            cot_fraction=config.cot_fraction,
            seed=config.seed,
            splits=config.splits,
            eval_questions=banned,
        )
        table = pa.Table.from_pylist(result.rows, schema=SAMPLE_SCHEMA)
    if result.eligible < config.total:
        context.log.warning("only %d eligible questions for a requested sample of %d", result.eligible, config.total)
    strata = sorted(result.strata)
    md.update(table_metadata(table, preview_columns=["id", "question", "answer", "pool", "stratum"]))
    md.update(
        {
            "requested_total": config.total,
            "cot_fraction": config.cot_fraction,
            "eligible": result.eligible,
            "excluded_other_split": result.excluded_split,
            "excluded_leakage": result.excluded_leakage,
            "cot": sum(1 for r in result.rows if r["pool"] == "cot"),
            "coa": sum(1 for r in result.rows if r["pool"] == "coa"),
            "eval_splits": dg.MetadataValue.json(config.eval_splits),
            "eval_files": dg.MetadataValue.json(config.eval_files),
            "strata": dg.MetadataValue.md(markdown_table([{"stratum": s, **result.strata[s]} for s in strata])),
            "strata_plot": bar_plot(
                strata,
                {"cot": [result.strata[s]["cot"] for s in strata], "coa": [result.strata[s]["coa"] for s in strata]},
                "question_sample by stratum",
                "questions",
            ),
        }
    )
    return dg.Output(table, metadata=md)


@dg.asset_check(
    asset=question_sample, blocking=True, description="The CoT and CoA pools share no question (by id or by text)."
)
def question_sample_pools_disjoint(question_sample: pa.Table) -> dg.AssetCheckResult:
    rows = question_sample.select(["id", "question", "pool"]).to_pylist()
    ids = {p: {r["id"] for r in rows if r["pool"] == p} for p in ("cot", "coa")}
    texts = {p: {normalise_question(r["question"]) for r in rows if r["pool"] == p} for p in ("cot", "coa")}
    overlap = (ids["cot"] & ids["coa"]) | (texts["cot"] & texts["coa"])
    return dg.AssetCheckResult(
        passed=not overlap, metadata={"overlap": len(overlap), "examples": ", ".join(sorted(overlap)[:5])}
    )


@dg.asset_check(
    asset=question_sample,
    blocking=True,
    description="Sample and pool sizes are what was configured (or every eligible question when fewer).",
)
def question_sample_sizes(context: dg.AssetCheckExecutionContext, question_sample: pa.Table) -> dg.AssetCheckResult:
    meta = latest_metadata(context.instance, "question_sample")
    want = min(meta.get("requested_total", -1), meta.get("eligible", -1))
    want_cot = int(round(want * meta.get("cot_fraction", 0.5)))
    pools = collections.Counter(question_sample.column("pool").to_pylist())
    ok = question_sample.num_rows == want and pools["cot"] == want_cot and pools["coa"] == want - want_cot
    return dg.AssetCheckResult(
        passed=ok and want > 0,
        metadata={
            "rows": question_sample.num_rows,
            "expected": want,
            "cot": pools["cot"],
            "expected_cot": want_cot,
            "coa": pools["coa"],
        },
    )


@dg.asset_check(
    asset=question_sample,
    blocking=True,
    additional_ins={"hotpotqa_raw": dg.AssetIn("hotpotqa_raw")},
    description="Leakage: no sampled question appears in a configured evaluation set.",
)
def question_sample_no_eval_leakage(
    context: dg.AssetCheckExecutionContext, question_sample: pa.Table, hotpotqa_raw: pa.Table
) -> dg.AssetCheckResult:
    meta = latest_metadata(context.instance, "question_sample")
    banned = _eval_questions(hotpotqa_raw, meta.get("eval_splits", ["dev", "test"]), meta.get("eval_files", []))
    leaked = [q for q in question_sample.column("question").to_pylist() if normalise_question(q) in banned]
    return dg.AssetCheckResult(
        passed=not leaked,
        metadata={"eval_questions": len(banned), "leaked": len(leaked), "examples": "\n".join(leaked[:5])},
    )


@dg.asset_check(asset=question_sample, description="Ids unique, pools and strata well-formed, answers non-empty.")
def question_sample_expectations(question_sample: pa.Table) -> dg.AssetCheckResult:
    df = question_sample.select(["id", "question", "answer", "pool", "stratum"]).to_pandas()
    return gx_check(
        df,
        "question_sample",
        [
            ("ExpectTableRowCountToBeBetween", {"min_value": 1}),
            ("ExpectColumnValuesToBeUnique", {"column": "id"}),
            ("ExpectColumnValuesToNotBeNull", {"column": "answer"}),
            ("ExpectColumnValuesToBeInSet", {"column": "pool", "value_set": ["cot", "coa"]}),
            ("ExpectColumnValuesToMatchRegex", {"column": "stratum", "regex": r"^[a-z]+/[a-z]+$"}),
        ],
    )


# -- rl_questions -------------------------------------------------------------------------------
RL_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("answers", pa.list_(pa.string())),
        ("type", pa.string()),
        ("level", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("stratum", pa.string()),
    ]
)
# what the RL pool must not share a question with: every table that holds an SFT or synthesis question
SFT_QUESTION_TABLES = (
    "cot_trajectories",
    "coa_trajectories",
    "contrastive_pairs",
    "sft_stage1_data",
    "sft_stage23_data",
)


class RlQuestionsConfig(dg.Config):
    total: int = Field(8, description="RL questions (paper profile: 4,608 = 96 steps x 48 questions).")
    seed: int = Field(0, description="Sampling seed.")
    splits: list[str] = Field(default_factory=lambda: ["train"], description="Splits of hotpotqa_raw to draw from.")


def _table_files(home: str, asset: str) -> list[str]:
    import glob

    from qadata.paths import table_path, tables_dir

    whole = table_path(home, [asset])
    return (
        [str(whole)]
        if whole.is_file()
        else sorted(glob.glob(str(tables_dir(home) / asset / "partition=*" / "data.parquet")))
    )


def _column(home: str, asset: str, column: str) -> set[str]:
    """The values of one column over an asset's materialised table or partitions (empty when none)."""
    import pyarrow.parquet as pq

    values: set[str] = set()
    for f in _table_files(home, asset):
        if column not in pq.read_schema(f).names:
            raise ValueError(f"{f}: no column {column!r}, which the RL pool's exclusion reads")
        values |= {v for v in pq.read_table(f, columns=[column]).column(column).to_pylist() if v is not None}
    return values


def rl_excluded(
    home: str, question_sample: pa.Table, hotpotqa_raw: pa.Table, eval_splits: list[str], eval_files: list[str]
) -> dict[str, tuple[set[str], set[str]]]:
    """What RL may not train on, by source: ``{source: (question ids, normalised question texts)}``.

    ``sft``: question_sample (every question synthesis can draw) and the question ids of every materialised
    trajectory, pair and SFT table; ``evaluation``: the evaluation splits and files question_sample excluded
    and every materialised eval_questions partition.
    """
    sft_ids = set(question_sample.column("id").to_pylist())
    for asset in SFT_QUESTION_TABLES:
        sft_ids |= _column(home, asset, "question_id")
    texts = {r["id"]: normalise_question(r["question"]) for r in hotpotqa_raw.select(["id", "question"]).to_pylist()}
    sft_texts = {normalise_question(q) for q in question_sample.column("question").to_pylist()}
    sft_texts |= {texts[i] for i in sft_ids if i in texts}
    eval_texts = _eval_questions(hotpotqa_raw, eval_splits, eval_files) | {
        normalise_question(q) for q in _column(home, "eval_questions", "question")
    }
    return {"sft": (sft_ids, sft_texts), "evaluation": (set(), eval_texts)}


def rl_overlap(rows: list[dict], excluded: dict[str, tuple[set[str], set[str]]]) -> dict[str, list[str]]:
    """Per source, the ids of ``rows`` (``id``, ``question``) whose id or normalised text it holds."""
    return {
        source: [r["id"] for r in rows if r["id"] in ids or normalise_question(r["question"]) in texts]
        for source, (ids, texts) in excluded.items()
    }


def _eval_config(instance: dg.DagsterInstance) -> tuple[list[str], list[str]]:
    meta = latest_metadata(instance, "question_sample")
    return list(meta.get("eval_splits", ["dev", "test"])), list(meta.get("eval_files", []))


@dg.asset(group_name=GROUP, kinds={"python", "parquet"}, deps=list(SFT_QUESTION_TABLES))
def rl_questions(
    context: dg.AssetExecutionContext,
    config: RlQuestionsConfig,
    storage: StorageResource,
    hotpotqa_raw: pa.Table,
    question_sample: pa.Table,
) -> dg.Output[pa.Table]:
    """Seeded RL prompts from hotpotqa_raw, stratified by level and type, sharing no question with SFT data or evaluation."""
    md: dict = {}
    with timed(md):
        eval_splits, eval_files = _eval_config(context.instance)
        excluded = rl_excluded(storage.home, question_sample, hotpotqa_raw, eval_splits, eval_files)
        candidates = hotpotqa_raw.to_pylist()
        hits = rl_overlap(candidates, excluded)
        out = {i for ids in hits.values() for i in ids}
        result = sample_questions(
            [r for r in candidates if r["id"] not in out],
            total=config.total,
            cot_fraction=0.0,
            seed=config.seed,
            splits=config.splits,
        )
        table = pa.Table.from_pylist([{k: r[k] for k in RL_SCHEMA.names} for r in result.rows], schema=RL_SCHEMA)
    if table.num_rows < config.total:
        context.log.warning(
            "rl_questions: only %d eligible questions for a requested pool of %d", table.num_rows, config.total
        )
    strata = sorted(result.strata)
    md.update(table_metadata(table, preview_columns=["id", "question", "answer", "stratum"]))
    md.update(
        {
            "requested_total": config.total,
            "eligible": result.eligible,
            "excluded_other_split": result.excluded_split,
            **{f"excluded_{source}": len(ids) for source, ids in hits.items()},
            "eval_splits": dg.MetadataValue.json(eval_splits),
            "eval_files": dg.MetadataValue.json(eval_files),
            "strata": dg.MetadataValue.md(
                markdown_table([{"stratum": s, "rl": result.strata[s]["coa"]} for s in strata])
            ),
        }
    )
    return dg.Output(table, metadata=md)


@dg.asset_check(
    asset=rl_questions,
    blocking=True,
    additional_deps=["question_sample", "hotpotqa_raw"],
    description=(
        "No RL question is an SFT question (question_sample, any trajectory, pair or SFT table) "
        "or an evaluation question, by id or by text."
    ),
)
def rl_questions_disjoint_from_sft(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    from assets.storage import NOT_MATERIALISED, read_table

    rl_questions, question_sample, hotpotqa_raw = (
        read_table(storage, a) for a in ("rl_questions", "question_sample", "hotpotqa_raw")
    )
    if rl_questions is None:
        return NOT_MATERIALISED
    if question_sample is None or hotpotqa_raw is None:
        return dg.AssetCheckResult(
            passed=False,
            metadata={
                "error": "rl_questions exists but question_sample or "
                "hotpotqa_raw does not: disjointness cannot be shown"
            },
        )
    excluded = rl_excluded(storage.home, question_sample, hotpotqa_raw, *_eval_config(context.instance))
    hits = rl_overlap(rl_questions.select(["id", "question"]).to_pylist(), excluded)
    return dg.AssetCheckResult(
        passed=not any(hits.values()),
        metadata={
            "rl_questions": rl_questions.num_rows,
            **{f"overlap_{s}": len(ids) for s, ids in hits.items()},
            **{f"{s}_questions": len(texts) for s, (_, texts) in excluded.items()},
            "examples": ", ".join(sorted({i for ids in hits.values() for i in ids})[:5]) or "none",
        },
    )


@dg.asset_check(asset="hotpotqa_raw_rejected", description="Every quarantined row names its file, row and reason.")
def hotpotqa_raw_rejected_expectations(hotpotqa_raw_rejected: pa.Table) -> dg.AssetCheckResult:
    return gx_check(hotpotqa_raw_rejected.to_pandas(), "hotpotqa_raw_rejected", REJECTED_EXPECTATIONS)
