"""Where the project keeps its data (no Dagster import, so the CLI's SQL path stays light)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import quote

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def default_home() -> Path:
    """``$AUTOCOA_HOME`` if set, else ``<repo>/var``: tables, artifacts and the Dagster home live here."""
    return Path(os.environ.get("AUTOCOA_HOME", REPO_ROOT / "var")).resolve()


def tables_dir(home: str | Path) -> Path:
    return Path(home) / "tables"


def artifacts_dir(home: str | Path) -> Path:
    return Path(home) / "artifacts"


def partition_dirname(key: str) -> str:
    """Hive-style directory for one partition, readable by DuckDB's ``hive_partitioning``."""
    return "partition=" + quote(str(key), safe="|-_.,@")


def table_path(home: str | Path, asset_path: list[str], partition: str | None = None) -> Path:
    base = tables_dir(home).joinpath(*asset_path)
    return (base / partition_dirname(partition) if partition is not None else base) / "data.parquet"


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def discover_tables(home: str | Path) -> dict[str, tuple[str, bool]]:
    """Map view name -> (parquet glob, partitioned) for every materialised asset table."""
    root = tables_dir(home)
    found: dict[str, tuple[str, bool]] = {}
    if not root.is_dir():
        return found
    for data in sorted(root.rglob("data.parquet")):
        rel = data.parent.relative_to(root).parts
        partitioned = bool(rel) and rel[-1].startswith("partition=")
        asset_parts = rel[:-1] if partitioned else rel
        name = "__".join(asset_parts)
        if not _IDENT.match(name) or name in found:
            continue
        base = root.joinpath(*asset_parts)
        glob = str(base / "partition=*" / "data.parquet") if partitioned else str(base / "data.parquet")
        found[name] = (glob, partitioned)
    return found
