"""Sensors: pick up question files dropped into ``<home>/incoming`` and rebuild the graph with them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import dagster as dg

SOURCE_SUFFIXES = (".json", ".jsonl", ".parquet")


def incoming_files(home: str | Path) -> list[Path]:
    folder = Path(home) / "incoming"
    return (
        sorted(f for f in folder.glob("*") if f.is_file() and f.suffix.lower() in SOURCE_SUFFIXES)
        if folder.is_dir()
        else []
    )


def build_incoming_sensor(home: str, job: dg.UnresolvedAssetJobDefinition) -> dg.SensorDefinition:
    @dg.sensor(
        name="incoming_sources_sensor",
        job=job,
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="When HotpotQA-style files appear or change in <home>/incoming, re-run the graph with them as extra sources.",
    )
    def incoming_sources_sensor(context: dg.SensorEvaluationContext):
        files = incoming_files(home)
        if not files:
            return dg.SkipReason(f"no .json/.jsonl/.parquet files in {Path(home) / 'incoming'}")
        stamp = json.dumps([[str(f), f.stat().st_mtime_ns, f.stat().st_size] for f in files])
        if stamp == context.cursor:
            return dg.SkipReason("incoming files unchanged since the last run")
        context.update_cursor(stamp)
        return dg.RunRequest(
            run_key=hashlib.sha256(stamp.encode()).hexdigest()[:16],
            run_config={"ops": {"hotpotqa_raw": {"config": {"use_embedded": True, "files": [str(f) for f in files]}}}},
            tags={"autocoa/trigger": "incoming_sources"},
        )

    return incoming_sources_sensor
