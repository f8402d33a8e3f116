"""SFT data stage: contrastive CoT+A pairs mined from the wrong trajectories of a synthesis round."""

import collections
import glob

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from agent.engines import load_engine, release_engines
from agent.prompts import TEMPLATES, template_for
from agent.rollout import search_tool
from assets.metadata import bar_plot, markdown_table, table_metadata, timed
from assets.resources import SearchEngineResource
from assets.settings import rollout_settings
from assets.storage import StorageResource
from assets.trajectories import TeacherEngineConfig
from qadata.paths import partition_dirname, tables_dir
from training.pairs import budget_pairs, mine_pairs

GROUP = "sft"
PAIR_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("question_id", pa.string()),
        ("round", pa.string()),
        ("kind", pa.string()),
        ("juncture_rule", pa.string()),
        ("source_trajectory", pa.string()),
        ("template_id", pa.string()),
        ("engine", pa.string()),
        ("model", pa.string()),
        ("prompt_text", pa.string()),
        ("prefix_text", pa.string()),
        ("chosen_text", pa.string()),
        ("rejected_text", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("prefix_ids", pa.list_(pa.int32())),
        ("chosen_ids", pa.list_(pa.int32())),
        ("rejected_ids", pa.list_(pa.int32())),
        ("chosen_correct", pa.bool_()),
        ("rejected_correct", pa.bool_()),
        ("chosen_answer", pa.string()),
        ("rejected_answer", pa.string()),
        ("chosen_has_action", pa.bool_()),
        ("rejected_has_action", pa.bool_()),
        ("chosen_observation_spans", pa.list_(pa.list_(pa.int32()))),
        ("rejected_observation_spans", pa.list_(pa.list_(pa.int32()))),
        ("chosen_mask", pa.list_(pa.int8())),
        ("rejected_mask", pa.list_(pa.int8())),
    ]
)
DISCARD_SCHEMA = pa.schema(
    [("question_id", pa.string()), ("round", pa.string()), ("kind", pa.string()), ("reason", pa.string())]
)
TRAJ_COLUMNS = [
    "trajectory_id",
    "question_id",
    "question",
    "gold_answers",
    "token_ids",
    "policy_mask",
    "prompt_tokens",
    "em",
    "spans",
]


PairsRollout = rollout_settings(
    "PairsRollout",
    "Rollout settings of the teacher's continuations from each juncture.",
    temperature=0.6,
    max_actions=5,  # 4-hop questions need 4; paper profile: 10
    max_turn_tokens=128,  # paper profile: 8192
    search_k=2,  # as the trajectories; paper profile: 3
)


class PairsConfig(dg.Config):
    round: str = Field("r000", description="Synthesis round whose trajectories are mined.")
    engine: TeacherEngineConfig = Field(
        default_factory=TeacherEngineConfig,
        description=(
            "The teacher that writes the continuations (embedded: the expert demonstrator, as for the trajectories)."
        ),
    )
    template_id: str | None = Field(None, description="CoA template for the shared context; default: by model family.")
    attempts: int = Field(4, description="Continuations sampled per juncture; the first correct one is kept.")
    rollout: PairsRollout = Field(
        default_factory=PairsRollout, description="Rollout settings of the continuations: agent.rollout.RolloutConfig."
    )
    seed: int = Field(0, description="Seed of the continuations.")
    max_per_kind: int | None = Field(
        None,
        description=(
            "Wrong trajectories mined per kind (teacher time); the rest are recorded as discarded. None = all (paper)."
        ),
    )
    max_pairs: int | None = Field(
        400, description=("Pairs kept after mining (paper: 1,500); the rest are recorded as discarded. None = all.")
    )
    action_chosen_share: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description=(
            "Share of the kept pairs that are action-chosen (kind a); the rest think-chosen (kind b). The paper says "
            "'mostly action-chosen' without a number; a kind short of its share leaves its room to the other."
        ),
    )


def read_round(home: str, asset: str, round_key: str, columns=None) -> pa.Table | None:
    files = sorted(glob.glob(str(tables_dir(home) / asset / f"{partition_dirname(round_key + '|')}*" / "data.parquet")))
    if not files:
        return None
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


@dg.multi_asset(
    group_name=GROUP,
    deps=["cot_trajectories", "coa_trajectories", "search_index"],
    outs={
        "contrastive_pairs": dg.AssetOut(
            description=(
                "Contrastive CoT+A pairs: a shared reasoning prefix, then a chosen and a rejected continuation that differ on taking an action."
            ),
            kinds={"parquet"},
        ),
        "contrastive_pairs_discarded": dg.AssetOut(
            description="Wrong trajectories that yielded no pair, with the reason.", kinds={"parquet"}
        ),
    },
)
def contrastive_pairs(
    context: dg.AssetExecutionContext,
    config: PairsConfig,
    storage: StorageResource,
    search_engine: SearchEngineResource,
):
    md: dict = {}
    cot = read_round(storage.home, "cot_trajectories", config.round, TRAJ_COLUMNS)
    coa = read_round(storage.home, "coa_trajectories", config.round, TRAJ_COLUMNS)
    if cot is None or coa is None:
        raise dg.Failure(
            f"contrastive_pairs: round {config.round!r} has no materialised "
            f"{'cot' if cot is None else 'coa'}_trajectories partitions; synthesise it first"
        )
    with timed(md):
        engine = load_engine(config.engine.spec(config.rollout.max_context), storage.artifact_dir("models"))
        template = TEMPLATES[config.template_id] if config.template_id else template_for("coa", engine.model_name)
        rcfg = config.rollout.build(seed=config.seed)
        cot_rows, coa_rows = cot.to_pylist(), coa.to_pylist()
        wrong = sum(1 for r in cot_rows if r["em"] < 1) + sum(1 for r in coa_rows if r["em"] < 1)
        context.log.info(
            "round %s: %d wrong CoT and %d wrong CoA trajectories to mine (%d attempts each)",
            config.round,
            sum(1 for r in cot_rows if r["em"] < 1),
            sum(1 for r in coa_rows if r["em"] < 1),
            config.attempts,
        )
        pairs, discarded = mine_pairs(
            cot_rows,
            coa_rows,
            engine=engine,
            search=search_tool(search_engine.get_engine(), config.rollout.search_k),
            coa_prompt_ids=lambda q: template.prompt_ids(engine.tokenizer, q),
            config=rcfg,
            attempts=config.attempts,
            max_per_kind=config.max_per_kind,
        )
        mined = len(pairs)
        pairs, over_budget, budget = budget_pairs(pairs, config.max_pairs, config.action_chosen_share, seed=config.seed)
        discarded += over_budget
        # the training steps that follow in the same process need the memory more than a warm teacher
        release_engines()

    def dec(ids):
        return engine.tokenizer.decode(ids, skip_special_tokens=False)

    rows = [
        {
            "pair_id": p.pair_id,
            "question_id": p.question_id,
            "round": config.round,
            "kind": p.kind,
            "juncture_rule": p.juncture_rule,
            "source_trajectory": p.source_trajectory,
            "template_id": template.id,
            "engine": engine.name,
            "model": engine.model_name,
            "prompt_text": dec(p.prompt_ids),
            "prefix_text": dec(p.prefix_ids),
            "chosen_text": dec(p.chosen_ids),
            "rejected_text": dec(p.rejected_ids),
            "prompt_ids": p.prompt_ids,
            "prefix_ids": p.prefix_ids,
            "chosen_ids": p.chosen_ids,
            "rejected_ids": p.rejected_ids,
            "chosen_correct": p.chosen_correct,
            "rejected_correct": p.rejected_correct,
            "chosen_answer": p.chosen_answer,
            "rejected_answer": p.rejected_answer,
            "chosen_has_action": p.chosen_has_action,
            "rejected_has_action": p.rejected_has_action,
            "chosen_observation_spans": [list(s) for s in p.chosen_observation_spans],
            "rejected_observation_spans": [list(s) for s in p.rejected_observation_spans],
            "chosen_mask": p.chosen_mask,
            "rejected_mask": p.rejected_mask,
        }
        for p in pairs
    ]
    table = pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)
    dtable = pa.Table.from_pylist(
        [{"question_id": d.question_id, "round": config.round, "kind": d.kind, "reason": d.reason} for d in discarded],
        schema=DISCARD_SCHEMA,
    )
    kinds = collections.Counter(p.kind for p in pairs)
    reasons = collections.Counter(d.reason for d in discarded)
    counts = {"wrong_trajectories": wrong, "pairs": len(pairs), "discarded": len(discarded)}
    context.log.info(
        "mined %d pairs, kept %d (a: %d, b: %d; max_pairs %s) from %d wrong trajectories; discarded %d: %s",
        mined,
        len(pairs),
        kinds["a"],
        kinds["b"],
        config.max_pairs,
        wrong,
        len(discarded),
        dict(reasons),
    )
    yield dg.Output(
        table,
        output_name="contrastive_pairs",
        metadata={
            **md,
            **table_metadata(table, preview_columns=["pair_id", "kind", "prefix_text", "chosen_text", "rejected_text"]),
            **counts,
            "kind_a": kinds["a"],
            "kind_b": kinds["b"],
            "round": config.round,
            "mined_pairs": mined,
            "max_pairs": config.max_pairs if config.max_pairs is not None else -1,
            "action_chosen_share": config.action_chosen_share,
            "budget": dg.MetadataValue.json({k: budget[k] for k in ("requested", "available", "kept", "dropped")}),
            "policy_tokens": sum(sum(p.chosen_mask) + sum(p.rejected_mask) for p in pairs),
            "env_tokens_excluded": sum(
                len(p.chosen_mask) - sum(p.chosen_mask) + len(p.rejected_mask) - sum(p.rejected_mask) for p in pairs
            ),
            "discard_reasons": dg.MetadataValue.md(
                markdown_table([{"reason": r, "n": n} for r, n in reasons.most_common()])
            ),
            "yield_plot": bar_plot(
                ["a (CoT wrong)", "b (CoA wrong)"],
                {
                    "pairs": [kinds["a"], kinds["b"]],
                    "discarded": [sum(1 for d in discarded if d.kind == k) for k in ("a", "b")],
                },
                "pairs mined vs discarded",
                "trajectories",
            ),
        },
    )
    yield dg.Output(
        dtable,
        output_name="contrastive_pairs_discarded",
        metadata={**table_metadata(dtable), **counts, "reasons": dg.MetadataValue.json(dict(reasons))},
    )


@dg.asset_check(
    asset="contrastive_pairs",
    blocking=True,
    description=(
        "Every pair: chosen differs from rejected, exactly one side opens with an action, chosen correct and rejected wrong, "
        "and each side's loss mask is aligned with its ids and 0 on every observation token."
    ),
)
def contrastive_pairs_well_formed(contrastive_pairs: pa.Table) -> dg.AssetCheckResult:
    bad = []
    for r in contrastive_pairs.to_pylist():
        if r["chosen_ids"] == r["rejected_ids"]:
            bad.append(f"{r['pair_id']}: chosen == rejected")
        if r["chosen_has_action"] == r["rejected_has_action"]:
            bad.append(f"{r['pair_id']}: {'both' if r['chosen_has_action'] else 'neither'} side opens with an action")
        if not r["chosen_correct"] or r["rejected_correct"]:
            bad.append(
                f"{r['pair_id']}: chosen correct={r['chosen_correct']}, rejected correct={r['rejected_correct']}"
            )
        for side in ("chosen", "rejected"):
            ids, mask = r[f"{side}_ids"], r[f"{side}_mask"]
            if mask is None or len(mask) != len(ids):
                bad.append(f"{r['pair_id']}: {side}_mask not aligned with {side}_ids")
            elif any(mask[i] for a, b in r[f"{side}_observation_spans"] for i in range(a, min(b, len(mask)))):
                bad.append(f"{r['pair_id']}: an observation token is in the {side} loss mask")
    return dg.AssetCheckResult(
        passed=not bad,
        metadata={"pairs": contrastive_pairs.num_rows, "problems": len(bad), "examples": "\n".join(bad[:8])},
    )


@dg.asset_check(
    asset="contrastive_pairs",
    blocking=True,
    description=(
        "The shared prefix is the source trajectory's own tokens (both sides start from the same prefix, token-exact)."
    ),
)
def contrastive_pairs_share_the_prefix(contrastive_pairs: pa.Table, storage: StorageResource) -> dg.AssetCheckResult:
    bad, checked = [], 0
    by_round = collections.defaultdict(list)
    for r in contrastive_pairs.select(["pair_id", "round", "kind", "source_trajectory", "prefix_ids"]).to_pylist():
        by_round[r["round"]].append(r)
    for round_key, rows in by_round.items():
        trajs = {}
        for asset in ("cot_trajectories", "coa_trajectories"):
            t = read_round(storage.home, asset, round_key, ["trajectory_id", "token_ids", "prompt_tokens"])
            if t is not None:
                trajs.update({x["trajectory_id"]: x for x in t.to_pylist()})
        for r in rows:
            checked += 1
            src = trajs.get(r["source_trajectory"])
            if src is None:
                bad.append(f"{r['pair_id']}: source trajectory {r['source_trajectory']} not found")
                continue
            start = src["prompt_tokens"]
            if src["token_ids"][start : start + len(r["prefix_ids"])] != r["prefix_ids"]:
                bad.append(f"{r['pair_id']}: prefix differs from the source trajectory's tokens")
    return dg.AssetCheckResult(
        passed=not bad, metadata={"checked": checked, "problems": len(bad), "examples": "\n".join(bad[:8])}
    )


@dg.asset_check(
    asset="contrastive_pairs", description="No question yields both an (a) and a (b) pair (conflicting lessons)."
)
def contrastive_pairs_no_conflicting_kinds(contrastive_pairs: pa.Table) -> dg.AssetCheckResult:
    kinds = collections.defaultdict(set)
    for r in contrastive_pairs.select(["question_id", "kind"]).to_pylist():
        kinds[r["question_id"]].add(r["kind"])
    both = sorted(q for q, k in kinds.items() if len(k) > 1)
    return dg.AssetCheckResult(
        passed=not both,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"questions": len(kinds), "conflicting": len(both), "examples": ", ".join(both[:8])},
    )


@dg.asset_check(
    asset="contrastive_pairs",
    blocking=True,
    additional_ins={"contrastive_pairs_discarded": dg.AssetIn()},
    description="Counts reconcile: wrong trajectories = pairs + discarded.",
)
def contrastive_pairs_counts_reconcile(
    context: dg.AssetCheckExecutionContext, contrastive_pairs: pa.Table, contrastive_pairs_discarded: pa.Table
) -> dg.AssetCheckResult:
    from assets.metadata import latest_metadata

    discarded = contrastive_pairs_discarded
    wrong = latest_metadata(context.instance, "contrastive_pairs").get("wrong_trajectories", -1)
    ok = wrong == contrastive_pairs.num_rows + discarded.num_rows
    return dg.AssetCheckResult(
        passed=ok,
        metadata={"wrong_trajectories": wrong, "pairs": contrastive_pairs.num_rows, "discarded": discarded.num_rows},
    )
