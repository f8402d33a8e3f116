"""What the evaluation assets share (``evaluation.py``, ``eval_reports.py``, ``fidelity.py``): their group, the
partitions of an asset on disk, the predictions read back, a checkpoint's directory, and a check's result."""

import base64
import glob
from pathlib import Path
from urllib.parse import unquote

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from assets.storage import StorageResource, read_table
from evals.predict import PREDICTION_SCHEMA
from qadata.paths import partition_dirname, tables_dir

GROUP = "evaluation"


def partition_files(storage: StorageResource, asset: str, partition: str | None = None) -> dict[str, str]:
    """``{partition key: parquet path}`` of one partition (when on disk) or of every materialised one."""
    base = tables_dir(storage.home) / asset
    if partition is not None:
        path = base / partition_dirname(partition) / "data.parquet"
        return {partition: str(path)} if path.is_file() else {}
    return {
        unquote(Path(f).parent.name[len("partition=") :]): f
        for f in sorted(glob.glob(str(base / "partition=*" / "data.parquet")))
    }


def scoped_partitions(context, storage: StorageResource, asset: str) -> tuple[dict[str, pa.Table], str]:
    """The partitions a check looks at: the run's partition, else every materialised one."""
    partition = context.run.tags.get("dagster/partition")
    files = partition_files(storage, asset, partition)
    scope = f"partition {partition}" if partition else "all partitions"
    return {k: pq.read_table(f) for k, f in files.items()}, f"{scope} ({len(files)} files)"


def read_predictions(storage: StorageResource) -> tuple[pa.Table, dict[str, int]]:
    """Every materialised eval_predictions partition in one table, and the row count per partition."""
    files = partition_files(storage, "eval_predictions")
    tables = {k: pq.read_table(f) for k, f in files.items()}
    rows = pa.concat_tables(list(tables.values())) if tables else PREDICTION_SCHEMA.empty_table()
    return rows, {k: t.num_rows for k, t in tables.items()}


def checkpoint_of(storage: StorageResource, method: str) -> str | None:
    """The directory of ``<method>_checkpoint`` (None: not materialised)."""
    manifest = read_table(storage, f"{method}_checkpoint")
    if manifest is None or manifest.num_rows == 0:
        return None
    path = manifest.column("path")[0].as_py()
    if not Path(path).is_dir():
        raise dg.Failure(f"{method}_checkpoint: its manifest points at {path}, which does not exist; re-materialise it")
    return path


def check_result(
    checked: int, problems: list[str], scope: str, severity=dg.AssetCheckSeverity.ERROR, **extra
) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=not problems,
        severity=severity,
        metadata={
            "scope": scope,
            "checked": checked,
            "problems": len(problems),
            "examples": "\n".join(problems[:8]),
            **extra,
        },
    )


def question_ids(storage: StorageResource) -> dict[str, list[str]]:
    """``{benchmark: question ids}`` of every materialised eval_questions partition."""
    return {
        k: pq.read_table(f, columns=["question_id"]).column("question_id").to_pylist()
        for k, f in partition_files(storage, "eval_questions").items()
    }


def png_markdown(alt: str, png: bytes) -> dg.MetadataValue:
    """A PNG inline in a Markdown metadata value."""
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")
