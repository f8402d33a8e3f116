"""The project's single Definitions object (the code location ``workspace.yaml`` loads)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import yaml

from assets import data, retrieval
from pipelines.paths import REPO_ROOT, default_home
from pipelines.resources import SearchEngineResource
from pipelines.sensors import build_incoming_sensor
from pipelines.storage import ParquetIOManager, StorageResource

ASSET_MODULES = [data, retrieval]
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


def build_definitions(home: str | Path | None = None) -> dg.Definitions:
    home = str(Path(home).resolve()) if home else str(default_home())
    assets = dg.load_assets_from_modules(ASSET_MODULES)
    checks = dg.load_asset_checks_from_modules(ASSET_MODULES)
    everything = dg.AssetSelection.all()
    embedded_job = dg.define_asset_job(
        "autocoa_embedded", selection=everything,
        description="Materialise every asset on the embedded default (CPU, generated data, SmolLM2).")
    paper_job = dg.define_asset_job(
        "autocoa_paper", selection=everything, config=load_profile("paper"),
        description="Materialise every asset with the paper profile (paper sizes and models; needs a GPU box).")
    checks_job = dg.define_asset_job(
        "data_checks", selection=dg.AssetSelection.all_asset_checks(),
        description="Run every data-quality check on the materialised data (what `autocoa check` runs).")
    nightly_checks = dg.ScheduleDefinition(
        name="nightly_data_checks", job=checks_job, cron_schedule="0 3 * * *",
        default_status=dg.DefaultScheduleStatus.STOPPED)
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=[embedded_job, paper_job, checks_job],
        schedules=[nightly_checks],
        sensors=[build_incoming_sensor(home, embedded_job)],
        resources={
            "io_manager": ParquetIOManager(home=home),
            "storage": StorageResource(home=home),
            "search_engine": SearchEngineResource(home=home),
        },
    )


defs = build_definitions()
