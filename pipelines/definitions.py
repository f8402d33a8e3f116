"""The project's single Definitions object (the code location ``workspace.yaml`` loads)."""

from __future__ import annotations

import functools
from pathlib import Path

import dagster as dg
import yaml

from assets import data, eval_reports, evaluation, fidelity, pairs, rl, search, sft, sft_data, trajectories
from assets.resources import SearchEngineResource
from assets.storage import ParquetIOManager, StorageResource
from pipelines.sensors import build_incoming_sensor
from qadata.paths import REPO_ROOT, default_home

ASSET_MODULES = [data, search, pairs, sft_data, sft, rl]
PROFILES_DIR = REPO_ROOT / "configs"


DEFINITION_KEYS = ("definitions",)  # a profile's top-level keys that configure the Definitions, not a run


def _profile_file(name: str) -> dict:
    if name == "embedded":
        return {}
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown profile {name!r}: no {path} (known: {', '.join(profile_names())})")
    return yaml.safe_load(path.read_text()) or {}


def profile_names() -> list[str]:
    """Every profile: ``embedded`` (the defaults) and one per ``configs/<name>.yaml`` with an ``ops`` section."""
    names = [p.stem for p in sorted(PROFILES_DIR.glob("*.yaml")) if "ops" in (yaml.safe_load(p.read_text()) or {})]
    return ["embedded", *names]


def load_profile(name: str) -> dict:
    """Run config of a named profile (``configs/<name>.yaml`` without its ``definitions`` section); ``embedded``
    is the defaults (empty)."""
    return {k: v for k, v in _profile_file(name).items() if k not in DEFINITION_KEYS}


def profile_options(name: str) -> dict:
    """The profile's ``definitions`` section: settings of the Definitions themselves (e.g. which schedules run)."""
    return _profile_file(name).get("definitions") or {}


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


BEFORE_JOB = "autocoa_before_synthesis"


def build_definitions(
    home: str | Path | None = None, shards: int | None = None, profile: str = "embedded"
) -> dg.Definitions:
    """The code location of one profile: every job carries the profile's run config (``configs/<profile>.yaml``;
    ``embedded``: the assets' defaults), so a job launched from the UI or the CLI runs that profile."""
    home = str(Path(home).resolve()) if home else str(default_home())
    options = profile_options(profile)
    assets = dg.load_assets_from_modules(ASSET_MODULES)
    checks = dg.load_asset_checks_from_modules(ASSET_MODULES)
    traj_assets, traj_checks, traj_partitions = trajectories.build(shards)
    assets, checks = assets + traj_assets, checks + traj_checks
    # evaluation declares lineage only to the checkpoint assets that exist in this code location
    existing = {k.to_user_string() for a in assets for k in a.keys}
    for stage in (evaluation, eval_reports, fidelity):
        stage_assets, stage_checks = stage.build(existing)
        assets, checks = assets + stage_assets, checks + stage_checks
    eval_selection = dg.AssetSelection.groups(evaluation.GROUP)
    # a job runs one partitions definition: the unpartitioned stages in one, the sharded synthesis in another
    synthesis = dg.AssetSelection.assets(*traj_assets)
    # three jobs in run order: what synthesis needs, synthesis (partitioned), what comes after it
    before = synthesis.upstream().required_multi_asset_neighbors()
    unpartitioned = before - synthesis
    after = dg.AssetSelection.all() - before - eval_selection  # a job runs one partitions definition

    def job(name: str, selection: dg.AssetSelection, description: str, **kw) -> dg.UnresolvedAssetJobDefinition:
        """A job with the profile's config for its own ops baked in (a job rejects config for ops it lacks)."""
        keys = selection.resolve(assets)
        ops = {a.op.name for a in assets if set(a.keys) & keys}
        return dg.define_asset_job(
            name,
            selection=selection,
            config=profile_config(profile, ops) or None,
            description=f"{description} Profile: {profile}.",
            tags={"autocoa/profile": profile},
            **kw,
        )

    before_job = job(
        BEFORE_JOB,
        unpartitioned,
        "Materialise every unpartitioned asset synthesis needs (world or HotpotQA, sample, corpus, index); then run "
        "trajectory_synthesis for each shard (`autocoa run` does both).",
    )
    synthesis_job = job(
        SYNTHESIS_JOB,
        synthesis,
        "CoT and CoA trajectories for one (round, shard) partition. Backfill every shard of a round to synthesise "
        "it; a failed shard reruns alone.",
        partitions_def=traj_partitions,
    )
    after_job = job(
        AFTER_JOB,
        after,
        "Everything downstream of synthesis (contrastive pairs, SFT data, SFT and RL checkpoints).",
    )
    eval_jobs = [
        job(
            EVAL_QUESTIONS_JOB,
            dg.AssetSelection.assets("eval_questions", "eval_questions_rejected"),
            "Held-out evaluation questions of one benchmark partition (embedded world, NQ, TriviaQA, ...).",
        ),
        job(
            EVAL_PREDICTIONS_JOB,
            dg.AssetSelection.assets("eval_predictions"),
            "One method x benchmark partition of the evaluation: rollouts, EM/F1/cover-EM, LLM-judge verdicts.",
        ),
        job(
            EVAL_REPORTS_JOB,
            dg.AssetSelection.assets("eval_table", "eval_comparisons", "action_analysis", "world_model_fidelity"),
            "Table 1 with its intervals and paired tests, Figure 3 and the world-model fidelity table from every "
            "materialised prediction partition.",
        ),
    ]
    resynthesis = trajectories.build_resynthesis_schedule(
        synthesis_job, running=options.get("weekly_resynthesis", "stopped") == "running"
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
        jobs=[before_job, checks_job, synthesis_job, after_job, *eval_jobs],
        schedules=[nightly_checks, resynthesis],
        sensors=[build_incoming_sensor(home, before_job)],
        resources={
            "io_manager": ParquetIOManager(home=home),
            "storage": StorageResource(home=home),
            "search_engine": SearchEngineResource(home=home),
        },
    )


defs = build_definitions()


@functools.cache
def _profile_definitions(profile: str) -> dg.Definitions:
    return build_definitions(profile=profile)


def __getattr__(name: str) -> dg.Definitions:
    """``defs_<profile>``: the code location of another profile, e.g. ``dagster dev -m pipelines.definitions -a
    defs_paper`` (``autocoa ui --profile paper``). One profile per running code location: Dagster refuses to
    launch an asset two loaded locations both define."""
    if name.startswith("defs_") and name[5:] in profile_names():
        return _profile_definitions(name[5:])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r} (profiles: {', '.join(profile_names())})")
