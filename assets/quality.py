"""Great Expectations suites for tabular checks, run on an ephemeral context.

GX takes a few seconds to import, so it is imported on first use only. Each expectation is given
as ``(ExpectationClassName, kwargs)`` so callers need no GX import of their own.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence

import dagster as dg
import pandas as pd

log = logging.getLogger(__name__)
_lock = threading.Lock()
_context = None

Expectation = tuple[str, dict]

# every quarantine table (``*_rejected``) has this shape
REJECTED_EXPECTATIONS = [
    (
        "ExpectTableColumnsToMatchSet",
        {"column_set": ["source", "split", "source_file", "source_row", "reason", "raw"], "exact_match": True},
    ),
    ("ExpectColumnValuesToNotBeNull", {"column": "reason"}),
    ("ExpectColumnValuesToNotBeNull", {"column": "source_file"}),
    ("ExpectColumnValuesToBeBetween", {"column": "source_row", "min_value": 0}),
]


def _gx_context():
    global _context
    with _lock:
        if _context is None:
            os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
            import great_expectations as gx

            _context = gx.get_context(mode="ephemeral")
            try:  # progress bars would flood the run log
                from great_expectations.data_context.types.base import ProgressBarsConfig

                _context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
            except Exception:  # noqa: BLE001 - cosmetic only
                pass
        return _context


def validate(df: pd.DataFrame, suite_name: str, expectations: Sequence[Expectation]) -> tuple[bool, dict]:
    """Validate ``df`` against the expectations; returns (success, per-expectation metadata)."""
    import great_expectations as gx

    ctx = _gx_context()
    with _lock:
        name = f"{suite_name}_{len(ctx.data_sources.all())}"
        ds = ctx.data_sources.add_pandas(name)
        batch = (
            ds.add_dataframe_asset(name)
            .add_batch_definition_whole_dataframe(name)
            .get_batch(batch_parameters={"dataframe": df})
        )
        suite = gx.ExpectationSuite(name=name)
        for cls_name, kwargs in expectations:
            suite.add_expectation(getattr(gx.expectations, cls_name)(**kwargs))
        result = batch.validate(suite)
    details = {}
    for res in result.results:
        cfg = res.expectation_config
        col = cfg.kwargs.get("column") or ",".join(cfg.kwargs.get("column_list", []) or [])
        key = f"{cfg.type}[{col}]" if col else cfg.type
        unexpected = res.result.get("unexpected_count")
        details[key] = (
            "ok"
            if res.success
            else f"FAILED (unexpected: {unexpected}, sample: {res.result.get('partial_unexpected_list', [])[:3]})"
        )
    return bool(result.success), details


def gx_check(
    df: pd.DataFrame,
    suite_name: str,
    expectations: Sequence[Expectation],
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR,
    **extra_md,
) -> dg.AssetCheckResult:
    ok, details = validate(df, suite_name, expectations)
    md = {
        "rows": len(df),
        "suite": suite_name,
        "expectations": dg.MetadataValue.md("\n".join(f"- `{k}`: {v}" for k, v in details.items())),
    }
    md.update(extra_md)
    return dg.AssetCheckResult(passed=ok, severity=severity, metadata=md)
