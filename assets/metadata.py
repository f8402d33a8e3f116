"""Metadata helpers every asset uses: row counts, previews, timings and plots for the UI."""

from __future__ import annotations

import base64
import io
import time
from contextlib import contextmanager

import dagster as dg
import pyarrow as pa

PREVIEW_ROWS = 5
PREVIEW_CELL_CHARS = 80


def _cell(value) -> str:
    text = str(value).replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= PREVIEW_CELL_CHARS else text[: PREVIEW_CELL_CHARS - 1] + "…"


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "_(empty)_"
    columns = columns or list(rows[0])
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "\n".join("| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows)


def table_metadata(table: pa.Table, *, preview_columns: list[str] | None = None, **extra) -> dict:
    """Row count, column schema and a Markdown preview of the first rows."""
    cols = preview_columns or [f.name for f in table.schema if not pa.types.is_nested(f.type)][:8]
    preview = table.slice(0, PREVIEW_ROWS).select(cols).to_pylist() if table.num_rows else []
    md = {
        "dagster/row_count": table.num_rows,
        "preview": dg.MetadataValue.md(markdown_table(preview, cols)),
        "dagster/column_schema": dg.TableSchema(columns=[dg.TableColumn(f.name, str(f.type)) for f in table.schema]),
    }
    md.update(extra)
    return md


@contextmanager
def timed(md: dict, key: str = "elapsed_seconds"):
    """Record the wall time of the block into ``md[key]`` (added to what an earlier block of the same step put there)."""
    start = time.perf_counter()
    before = getattr(md.get(key), "value", 0.0) or 0.0
    try:
        yield md
    finally:
        md[key] = dg.MetadataValue.float(round(before + time.perf_counter() - start, 3))


def plot_markdown(fig) -> dg.MetadataValue:
    """Embed a matplotlib figure as a PNG in Markdown metadata (rendered by the Dagster UI)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return dg.MetadataValue.md(f"![plot](data:image/png;base64,{data})")


def bar_plot(labels: list[str], series: dict[str, list[float]], title: str, ylabel: str) -> dg.MetadataValue:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(labels) + 2), 3.2))
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=name)
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return plot_markdown(fig)


def latest_metadata(instance: dg.DagsterInstance, asset: str) -> dict:
    """Metadata values of an asset's latest materialisation (what checks reconcile against)."""
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None or event.asset_materialization is None:
        return {}
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}
