"""The one storage mechanism of the project: an IO manager writing Parquet per asset and partition.

``<home>/tables/<asset>/data.parquet`` or ``<home>/tables/<asset>/partition=<key>/data.parquet``,
written through a temp file and renamed, so re-materialising overwrites and a reader never sees a
partial file. Assets that also produce files (indexes, checkpoints) write them under
``<home>/artifacts/<asset>/`` with :func:`qadata.io.atomic_directory` and return a manifest table.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from qadata.io import atomic_write_parquet
from qadata.paths import artifacts_dir, table_path


class ParquetIOManager(dg.ConfigurableIOManager):
    """Stores ``pyarrow.Table`` / ``pandas.DataFrame`` outputs as Parquet under ``home``."""

    home: str

    def _paths(self, context) -> list[Path]:
        key = context.asset_key.path
        if context.has_asset_partitions:
            return [table_path(self.home, key, str(p)) for p in context.asset_partition_keys]
        return [table_path(self.home, key)]

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        if obj is None:
            return
        if isinstance(obj, pd.DataFrame):
            obj = pa.Table.from_pandas(obj, preserve_index=False)
        if not isinstance(obj, pa.Table):
            raise TypeError(
                f"{context.asset_key.to_user_string()}: ParquetIOManager stores pyarrow Tables or "
                f"pandas DataFrames, got {type(obj).__name__}"
            )
        paths = self._paths(context)
        if len(paths) != 1:
            raise ValueError(f"{context.asset_key.to_user_string()}: one output cannot fill {len(paths)} partitions")
        atomic_write_parquet(paths[0], obj)
        context.add_output_metadata(
            {"parquet_path": dg.MetadataValue.path(str(paths[0])), "dagster/row_count": obj.num_rows}
        )

    def load_input(self, context: dg.InputContext):
        paths = self._paths(context)
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{context.asset_key.to_user_string()}: not materialised yet (no {missing[0]}); materialise it first"
            )
        table = pa.concat_tables([pq.read_table(p) for p in paths], promote_options="default")
        typ = getattr(context.dagster_type, "typing_type", None)
        if typ is pd.DataFrame:
            return table.to_pandas()
        return table


class StorageResource(dg.ConfigurableResource):
    """Where assets put files that are not tables (indexes, corpora, checkpoints)."""

    home: str

    def artifact_dir(self, asset: str, partition: str | None = None) -> Path:
        base = artifacts_dir(self.home) / asset
        return base / partition if partition else base


def read_table(storage: StorageResource, asset: str) -> pa.Table | None:
    """The unpartitioned table of ``asset`` in the home, or None when it is not materialised (for checks that
    read a second asset besides their own)."""
    path = table_path(storage.home, [asset])
    return pq.read_table(path) if path.is_file() else None


# what a check returns when data it needs is not materialised: `autocoa check` reports it as skipped, not passed
NOT_MATERIALISED = dg.AssetCheckResult(passed=True, metadata={"skipped": "not materialised yet"})
