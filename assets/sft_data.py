"""SFT data stage: tokenised stage-1 pairs and the stage-2/3 trajectory mix, with exports for other trainers."""

import collections

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from agent.synthesis import SPAN
from assets.metadata import table_metadata, timed
from assets.pairs import read_round
from assets.storage import StorageResource
from qadata.io import atomic_directory, atomic_write_json
from training.sft_data import (
    IGNORE,
    llamafactory_dataset_info,
    select_mix,
    stage1_rows,
    stage23_rows,
    write_sharegpt,
)

GROUP = "sft"
STAGE1_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("question_id", pa.string()),
        ("kind", pa.string()),
        ("context_ids", pa.list_(pa.int32())),
        ("chosen_ids", pa.list_(pa.int32())),
        ("chosen_mask", pa.list_(pa.int8())),
        ("rejected_ids", pa.list_(pa.int32())),
        ("rejected_mask", pa.list_(pa.int8())),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("truncated", pa.bool_()),
    ]
)
STAGE23_SCHEMA = pa.schema(
    [
        ("trajectory_id", pa.string()),
        ("question_id", pa.string()),
        ("pool", pa.string()),
        ("em", pa.float32()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels_stage2", pa.list_(pa.int32())),
        ("labels_stage3", pa.list_(pa.int32())),
        ("env_tokens", pa.int32()),
        ("length", pa.int32()),
        ("truncated", pa.bool_()),
        ("prompt", pa.string()),
        ("text", pa.string()),
        ("spans", pa.list_(SPAN)),
    ]
)
TRAJ_COLUMNS = [
    "trajectory_id",
    "question_id",
    "pool",
    "em",
    "token_ids",
    "policy_mask",
    "prompt_tokens",
    "prompt",
    "text",
    "spans",
]


class Stage1DataConfig(dg.Config):
    max_length: int = Field(2048, description="Longest context + continuation; longer ones are truncated and flagged.")


@dg.asset(group_name=GROUP, kinds={"python", "parquet"})
def sft_stage1_data(
    context: dg.AssetExecutionContext, config: Stage1DataConfig, contrastive_pairs: pa.Table
) -> dg.Output[pa.Table]:
    """The contrastive pairs as SFT-1 examples: context c = prompt + shared prefix, then each continuation's ids and policy-token mask."""
    pairs = contrastive_pairs
    md: dict = {}
    with timed(md):
        table = pa.Table.from_pylist(stage1_rows(pairs.to_pylist(), config.max_length), schema=STAGE1_SCHEMA)
    truncated = sum(table.column("truncated").to_pylist())
    if truncated:
        context.log.warning(
            "sft_stage1_data: %d of %d pairs truncated to %d tokens", truncated, table.num_rows, config.max_length
        )
    md.update(table_metadata(table, preview_columns=["pair_id", "kind", "prompt", "chosen", "rejected"]))
    masks = table.column("chosen_mask").to_pylist() + table.column("rejected_mask").to_pylist()
    md.update(
        {
            "pairs": table.num_rows,
            "truncated": truncated,
            "max_length": config.max_length,
            "policy_tokens": sum(sum(m) for m in masks),  # in SFT-1's loss
            "env_tokens_excluded": sum(len(m) - sum(m) for m in masks),
        }
    )  # observations and forced text
    return dg.Output(table, metadata=md)


class Stage23DataConfig(dg.Config):
    round: str = Field("r000", description="Synthesis round the trajectories come from.")
    coa: int = Field(
        200,
        description=(
            "Correct CoA trajectories wanted (embedded: 200 of the ~490 correct ones, what CPU training affords in "
            "minutes with length-bucketed batches; paper: 5,000); fewer if fewer exist."
        ),
    )
    cot: int = Field(26, description="Correct CoT trajectories wanted (embedded: the paper's 1:5 mix; paper: 1,000).")
    seed: int = Field(0, description="Seed of the selection.")
    max_length: int = Field(2048, description="Longest sequence; longer ones are truncated and flagged.")


@dg.asset(group_name=GROUP, kinds={"python", "parquet"}, deps=["cot_trajectories", "coa_trajectories"])
def sft_stage23_data(
    context: dg.AssetExecutionContext, config: Stage23DataConfig, storage: StorageResource
) -> dg.Output[pa.Table]:
    """Correct CoA + CoT trajectories for SFT-2 (observations masked out of the labels) and SFT-3 (observations kept)."""
    cot = read_round(storage.home, "cot_trajectories", config.round, TRAJ_COLUMNS)
    coa = read_round(storage.home, "coa_trajectories", config.round, TRAJ_COLUMNS)
    if cot is None or coa is None:
        raise dg.Failure(f"sft_stage23_data: round {config.round!r} has no materialised trajectories")
    md: dict = {}
    with timed(md):
        selected, stats = select_mix(cot.to_pylist(), coa.to_pylist(), coa=config.coa, cot=config.cot, seed=config.seed)
        rows = stage23_rows(selected, config.max_length)
        for r, src in zip(rows, selected):
            r["em"] = src["em"]
        table = pa.Table.from_pylist(rows, schema=STAGE23_SCHEMA)
        out = storage.artifact_dir("sft_stage23_data")
        with atomic_directory(out) as tmp:
            n = write_sharegpt(rows, tmp / "autocoa_sft.json")
            atomic_write_json(tmp / "dataset_info.json", llamafactory_dataset_info("autocoa_sft", "autocoa_sft.json"))
            (tmp / "hf").mkdir()
            pq.write_table(
                table.select(["input_ids", "labels_stage2", "labels_stage3", "pool", "trajectory_id"]),
                tmp / "hf" / "train.parquet",
            )
    if stats["coa_selected"] < config.coa or stats["cot_selected"] < config.cot:
        context.log.warning(
            "sft_stage23_data: only %d/%d correct CoA and %d/%d correct CoT trajectories in round %s",
            stats["coa_selected"],
            config.coa,
            stats["cot_selected"],
            config.cot,
            config.round,
        )
    md.update(table_metadata(table, preview_columns=["trajectory_id", "pool", "length", "env_tokens", "text"]))
    md.update(
        {
            **stats,
            "round": config.round,
            "max_length": config.max_length,
            "truncated": sum(table.column("truncated").to_pylist()),
            "sharegpt_records": n,
            "exports": dg.MetadataValue.path(str(out)),
            "pools": dg.MetadataValue.json(dict(collections.Counter(table.column("pool").to_pylist()))),
        }
    )
    return dg.Output(table, metadata=md)


@dg.asset_check(
    asset=sft_stage23_data, blocking=True, description="Only correct trajectories (EM = 1) are in the SFT mix."
)
def sft_stage23_only_correct(sft_stage23_data: pa.Table) -> dg.AssetCheckResult:
    t = sft_stage23_data
    wrong = [r["trajectory_id"] for r in t.select(["trajectory_id", "em"]).to_pylist() if r["em"] < 1.0]
    return dg.AssetCheckResult(
        passed=not wrong, metadata={"rows": t.num_rows, "wrong": len(wrong), "examples": "\n".join(wrong[:5])}
    )


@dg.asset_check(
    asset=sft_stage23_data,
    blocking=True,
    description=("The mix is what was configured: min(requested, available) CoA and CoT trajectories."),
)
def sft_stage23_mix_ratio(context: dg.AssetCheckExecutionContext, sft_stage23_data: pa.Table) -> dg.AssetCheckResult:
    from assets.metadata import latest_metadata

    t = sft_stage23_data
    md = latest_metadata(context.instance, "sft_stage23_data")
    pools = collections.Counter(t.column("pool").to_pylist())
    want_coa = min(md.get("coa_requested", -1), md.get("correct_coa_available", -1))
    want_cot = min(md.get("cot_requested", -1), md.get("correct_cot_available", -1))
    ok = pools["coa"] == want_coa and pools["cot"] == want_cot
    return dg.AssetCheckResult(
        passed=ok,
        metadata={"coa": pools["coa"], "expected_coa": want_coa, "cot": pools["cot"], "expected_cot": want_cot},
    )


@dg.asset_check(
    asset=sft_stage23_data,
    blocking=True,
    description=(
        "Every observation token is masked (-100) in the stage-2 labels and none is in the stage-3 labels; prompts masked in both."
    ),
)
def sft_stage23_observation_masks(sft_stage23_data: pa.Table) -> dg.AssetCheckResult:
    t = sft_stage23_data
    bad, checked = [], 0
    for r in t.select(["trajectory_id", "input_ids", "labels_stage2", "labels_stage3", "spans"]).to_pylist():
        n = len(r["input_ids"])
        for s in r["spans"]:
            if s["kind"] != "observation":
                continue
            for i in range(s["start"], min(s["end"], n)):
                checked += 1
                if r["labels_stage2"][i] != IGNORE:
                    bad.append(f"{r['trajectory_id']}: observation token {i} in the stage-2 loss")
                    break
                if r["labels_stage3"][i] != r["input_ids"][i]:
                    bad.append(f"{r['trajectory_id']}: observation token {i} masked in stage 3")
                    break
    return dg.AssetCheckResult(
        passed=not bad,
        metadata={"observation_tokens_checked": checked, "problems": len(bad), "examples": "\n".join(bad[:5])},
    )


@dg.asset_check(
    asset=sft_stage23_data, description="No sequence over max_length; truncations are counted (WARN when any)."
)
def sft_stage23_lengths(context: dg.AssetCheckExecutionContext, sft_stage23_data: pa.Table) -> dg.AssetCheckResult:
    from assets.metadata import latest_metadata

    t = sft_stage23_data
    limit = latest_metadata(context.instance, "sft_stage23_data").get("max_length", 2048)
    over = sum(1 for n in t.column("length").to_pylist() if n > limit)
    truncated = sum(t.column("truncated").to_pylist())
    return dg.AssetCheckResult(
        passed=over == 0 and truncated == 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"over_limit": over, "truncated": truncated, "max_length": limit},
    )


@dg.asset_check(
    asset=sft_stage1_data,
    blocking=True,
    additional_ins={"contrastive_pairs": dg.AssetIn()},
    description=(
        "Every contrastive pair became exactly one SFT-1 example whose context is the pair's prompt + shared prefix ids "
        "and whose loss masks are the pair's."
    ),
)
def sft_stage1_data_matches_the_pairs(sft_stage1_data: pa.Table, contrastive_pairs: pa.Table) -> dg.AssetCheckResult:
    data, pairs = sft_stage1_data, contrastive_pairs
    by_id = {
        p["pair_id"]: p
        for p in pairs.select(["pair_id", "prompt_ids", "prefix_ids", "chosen_mask", "rejected_mask"]).to_pylist()
    }
    rows = data.select(
        ["pair_id", "context_ids", "chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"]
    ).to_pylist()
    ids = [r["pair_id"] for r in rows]
    bad = [f"{r['pair_id']}: no such pair" for r in rows if r["pair_id"] not in by_id]
    bad += [
        f"{r['pair_id']}: context is not prompt + prefix"
        for r in rows
        if r["pair_id"] in by_id
        and r["context_ids"] != by_id[r["pair_id"]]["prompt_ids"] + by_id[r["pair_id"]]["prefix_ids"]
    ]
    bad += [
        f"{r['pair_id']}: {side} mask is not the pair's (aligned with the ids)"
        for r in rows
        if r["pair_id"] in by_id
        for side in ("chosen", "rejected")
        if r[f"{side}_mask"] != by_id[r["pair_id"]][f"{side}_mask"][: len(r[f"{side}_ids"])]
    ]
    missing = sorted(set(by_id) - set(ids))
    dup = len(ids) - len(set(ids))
    return dg.AssetCheckResult(
        passed=not bad and not missing and not dup,
        metadata={
            "examples": len(rows),
            "pairs": len(by_id),
            "missing": len(missing),
            "duplicates": dup,
            "problems": "\n".join((bad + [f"{m}: pair without an example" for m in missing])[:8]) or "none",
        },
    )
