"""The project's single Definitions object (the code location ``workspace.yaml`` loads)."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import yaml

from assets import data, evaluation, pairs, rl, search, sft, sft_data, trajectories
from assets.resources import SearchEngineResource
from assets.storage import ParquetIOManager, StorageResource
from pipelines.sensors import build_incoming_sensor
from qadata.paths import REPO_ROOT, default_home

ASSET_MODULES = [data, search, pairs, sft_data, sft, rl]
PROFILES_DIR = REPO_ROOT / "configs"


def load_profile(name: str) -> dict:
    """Run config of a named profile (``configs/<name>.yaml``); ``embedded`` is the defaults (empty)."""
    if name == "embedded":
        return {}
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ["embedded"] + sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ValueError(f"unknown profile {name!r}: no {path} (known: {', '.join(known)})")
    return yaml.safe_load(path.read_text()) or {}


def profile_config(name: str, ops: set[str] | None = None) -> dict:
    """A profile's run config restricted to the given ops (a job rejects config for ops it lacks)."""
    cfg = load_profile(name)
    if ops is not None and "ops" in cfg:
        cfg = {**cfg, "ops": {k: v for k, v in cfg["ops"].items() if k in ops}}
    return cfg


SYNTHESIS_JOB = "trajectory_synthesis"
AFTER_JOB = "autocoa_after_synthesis"
EVAL_QUESTIONS_JOB, EVAL_PREDICTIONS_JOB, EVAL_REPORTS_JOB = (
    "evaluation_questions",
    "evaluation_predictions",
    "evaluation_reports",
)
SYNTHESIS_OPS = {f"{p}_trajectories" for p in trajectories.POOLS}


def build_definitions(home: str | Path | None = None, shards: int | None = None) -> dg.Definitions:
    home = str(Path(home).resolve()) if home else str(default_home())
    assets = dg.load_assets_from_modules(ASSET_MODULES)
    checks = dg.load_asset_checks_from_modules(ASSET_MODULES)
    traj_assets, traj_checks, traj_partitions = trajectories.build(shards)
    assets, checks = assets + traj_assets, checks + traj_checks
    # evaluation declares lineage only to the checkpoint assets that exist in this code location
    existing = {k.to_user_string() for a in assets for k in a.keys}
    eval_assets, eval_checks = evaluation.build(existing)
    assets, checks = assets + eval_assets, checks + eval_checks
    eval_selection = dg.AssetSelection.groups(evaluation.GROUP)
    # a job runs one partitions definition: the unpartitioned stages in one, the sharded synthesis in another
    synthesis = dg.AssetSelection.assets(*traj_assets)
    # three jobs in run order: what synthesis needs, synthesis (partitioned), what comes after it
    before = synthesis.upstream().required_multi_asset_neighbors()
    unpartitioned = before - synthesis
    after = dg.AssetSelection.all() - before - eval_selection  # a job runs one partitions definition

    def ops_of(selection: dg.AssetSelection) -> set[str]:
        """Op names of a selection: a job's baked config may name only its own ops."""
        keys = selection.resolve(assets)
        return {a.op.name for a in assets if set(a.keys) & keys}

    embedded_job = dg.define_asset_job(
        "autocoa_embedded",
        selection=unpartitioned,
        description="Materialise every unpartitioned asset on the embedded default (CPU, generated data, SmolLM2); "
        "then run trajectory_synthesis for each shard (`autocoa run` does both).",
    )
    paper_job = dg.define_asset_job(
        "autocoa_paper",
        selection=unpartitioned,
        config=profile_config("paper", ops_of(unpartitioned)),
        description="Materialise every unpartitioned asset with the paper profile (paper sizes and models; needs a GPU box).",
    )
    synthesis_job = dg.define_asset_job(
        SYNTHESIS_JOB,
        selection=synthesis,
        partitions_def=traj_partitions,
        description="CoT and CoA trajectories for one (round, shard) partition, embedded defaults. "
        "Backfill every shard of a round to synthesise it; a failed shard reruns alone.",
    )
    synthesis_paper_job = dg.define_asset_job(
        f"{SYNTHESIS_JOB}_paper",
        selection=synthesis,
        partitions_def=traj_partitions,
        config=profile_config("paper", SYNTHESIS_OPS),
        description="Trajectory synthesis with the paper profile's teacher (vLLM, DeepSeek-R1-Distill-Qwen-32B).",
    )
    after_job = dg.define_asset_job(
        AFTER_JOB,
        selection=after,
        description="Everything downstream of synthesis (contrastive pairs, SFT data, SFT and RL checkpoints), embedded defaults.",
    )
    after_paper_job = dg.define_asset_job(
        f"{AFTER_JOB}_paper",
        selection=after,
        config=profile_config("paper", ops_of(after)),
        description="Everything downstream of synthesis with the paper profile.",
    )
    eval_jobs = []
    for name, selection, desc in (
        (
            EVAL_QUESTIONS_JOB,
            dg.AssetSelection.assets("eval_questions", "eval_questions_rejected"),
            "Held-out evaluation questions of one benchmark partition (embedded world, NQ, TriviaQA, ...).",
        ),
        (
            EVAL_PREDICTIONS_JOB,
            dg.AssetSelection.assets("eval_predictions"),
            "One method x benchmark partition of the evaluation: rollouts, EM/F1/cover-EM, LLM-judge verdicts.",
        ),
        (
            EVAL_REPORTS_JOB,
            dg.AssetSelection.assets("eval_table", "eval_comparisons", "action_analysis", "world_model_fidelity"),
            "Table 1 with its intervals and paired tests, Figure 3 and the world-model fidelity table from every "
            "materialised prediction partition.",
        ),
    ):
        eval_jobs.append(dg.define_asset_job(name, selection=selection, description=desc + " Embedded defaults."))
        eval_jobs.append(
            dg.define_asset_job(
                f"{name}_paper",
                selection=selection,
                config=profile_config("paper", ops_of(selection)),
                description=desc + " Paper profile.",
            )
        )
    profile = os.environ.get("AUTOCOA_PROFILE", "embedded")
    resynthesis = trajectories.build_resynthesis_schedule(
        synthesis_paper_job if profile == "paper" else synthesis_job, running=profile == "paper"
    )
    checks_job = dg.define_asset_job(
        "data_checks",
        selection=dg.AssetSelection.all_asset_checks(),
        description="Run every data-quality check on the materialised data (what `autocoa check` runs).",
    )
    nightly_checks = dg.ScheduleDefinition(
        name="nightly_data_checks",
        job=checks_job,
        cron_schedule="0 3 * * *",
        default_status=dg.DefaultScheduleStatus.STOPPED,
    )
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=[
            embedded_job,
            paper_job,
            checks_job,
            synthesis_job,
            synthesis_paper_job,
            after_job,
            after_paper_job,
            *eval_jobs,
        ],
        schedules=[nightly_checks, resynthesis],
        sensors=[build_incoming_sensor(home, embedded_job)],
        resources={
            "io_manager": ParquetIOManager(home=home),
            "storage": StorageResource(home=home),
            "search_engine": SearchEngineResource(home=home),
        },
    )


defs = build_definitions()
