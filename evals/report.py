"""The paper's Table 1 (methods x benchmarks, EM and LLM-judged accuracy) and Figure 3 (action
analysis), built from per-question prediction rows, plus the paper's own numbers to compare with.

A prediction row is a mapping (or DataFrame row) with ``method, benchmark, question_id`` and the
metrics: ``em``, ``f1``, ``cover_em`` (0/1 or floats) and ``judge`` (True/False/None, None =
unparsable or not judged); Figure 3 also needs ``n_actions``. Scores are percentages, as in the paper.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa

from evals import stats
from evals.datasets import benchmark_sort_key
from evals.fidelity import aggregate_fidelity
from evals.predict import METHODS
from qadata.paths import table_path

AVG = "avg"
METRIC_LABELS = {"em": "EM", "judge": "LLM", "f1": "F1", "cover_em": "CEM"}
BENCHMARK_LABELS = {
    "nq": "NQ",
    "triviaqa": "TriviaQA",
    "popqa": "PopQA",
    "hotpotqa": "HotpotQA",
    "2wikimultihopqa": "2Wiki",
    "musique": "MuSiQue",
    "bamboogle": "Bamboogle",
    "fanout": "Fanout",
    "embedded": "Embedded",
    AVG: "Avg",
}
TABLE1_BENCHMARKS = ("nq", "triviaqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle", "fanout")
# the paper's Average is over these six; an average over other benchmarks is not compared with it
PAPER_AVERAGE_BENCHMARKS = ("nq", "triviaqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
# our Table 1 rows (evals/predict.py says how each is evaluated): three baselines, then one per checkpoint
TABLE1_METHODS = METHODS
TABLE1_METRICS = ("em", "judge")  # EM and LLM-judged accuracy; metric names hold no underscore (flattened columns)
REFERENCE_METHOD = "react_reasoning"
PREDECESSOR = {
    "sft_stage1": "base_cot",
    "sft_stage2": "sft_stage1",
    "sft_stage3": "sft_stage2",
    "sft_stage2_only": "base_cot",
    "rl_stage2_only": "base_cot",
    "sft123_rl1": "sft_stage3",
    "sft123_rl12": "sft123_rl1",
    "sft12_rl2": "sft_stage2",
}


def compared_with(
    method: str, reference: str = REFERENCE_METHOD, predecessor: Mapping[str, str] = PREDECESSOR
) -> dict[str, str | None]:
    """The two methods a Table 1 row is tested against: ``{"reference": ..., "predecessor": ...}`` (None: none).

    The reference is ReAct on the reasoning model (``react_reasoning``): the untrained agentic
    workflow the paper's agent models are meant to beat, on the same model they start from. The
    predecessor is the checkpoint a stage was trained from (SFT-2 from SFT-1, SFT-3 from SFT-2, RL-1
    from SFT-3, RL-1&2 from RL-1, RL-2 from SFT-1&2), or the base model with CoT for the stages trained
    straight from the base model (SFT-1 and the stage-2-only ablations): the paper reads Table 1 stage
    by stage, and only this pairing tells whether a stage added anything over the one before it.
    """
    return {"reference": reference if method != reference else None, "predecessor": predecessor.get(method)}


def _frame(predictions: pd.DataFrame | Iterable[Mapping]) -> pd.DataFrame:
    df = predictions if isinstance(predictions, pd.DataFrame) else pd.DataFrame(list(predictions))
    missing = {"method", "benchmark", "question_id"} - set(df.columns)
    if missing:
        raise ValueError(f"prediction rows lack columns {sorted(missing)} (have {sorted(df.columns)})")
    return df


def _metric_value(value) -> float:
    """A row's score for a metric. A judge verdict of None (unparsable, not judged) counts as 0, so
    every method is scored over the same questions; an unparsable judge is reported, not hidden."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 0.0
    return float(value)


# -- Table 1 ---------------------------------------------------------------------------------------
def table1(
    predictions: pd.DataFrame | Iterable[Mapping],
    *,
    metrics: Sequence[str] = ("em", "judge"),
    benchmarks: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Methods x (benchmark, metric) in percent, with an ``avg`` block.

    ``avg`` is the unweighted mean of the benchmark columns (the paper's macro average, so
    Bamboogle's 125 questions weigh as much as NQ's 500); it is NaN for a method missing a benchmark,
    so averages always compare like with like.

    Args:
        benchmarks: columns, in order; default the benchmarks present, in table order.
        methods: rows, in order; default the methods present, in first-seen order.
    """
    df = _frame(predictions)
    missing = set(metrics) - set(df.columns)
    if missing:
        raise ValueError(f"prediction rows lack metric columns {sorted(missing)}")
    benches = list(benchmarks) if benchmarks is not None else sorted(df["benchmark"].unique(), key=benchmark_sort_key)
    rows = list(methods) if methods is not None else list(dict.fromkeys(df["method"]))
    scored = df[["method", "benchmark", *metrics]].copy()
    for m in metrics:
        scored[m] = scored[m].map(_metric_value)
    means = scored.groupby(["method", "benchmark"])[list(metrics)].mean() * 100.0
    columns = pd.MultiIndex.from_product([[*benches, AVG], list(metrics)], names=["benchmark", "metric"])
    table = pd.DataFrame(index=pd.Index(rows, name="method"), columns=columns, dtype=float)
    for (method, bench), vals in means.iterrows():
        if method in table.index and bench in benches:
            for m in metrics:
                table.loc[method, (bench, m)] = vals[m]
    for m in metrics:
        table[(AVG, m)] = table[[(b, m) for b in benches]].mean(axis=1, skipna=False)
    return table


def recompute_averages(
    predictions: Iterable[Mapping], metrics: Sequence[str] = ("em", "judge"), benchmarks: Sequence[str] | None = None
) -> dict[tuple[str, str], float]:
    """``{(method, metric): average}`` straight from the rows, in plain Python (no pandas), so a
    check can compare it with :func:`table1`'s ``avg`` block by an independent route."""
    records = predictions.to_dict("records") if isinstance(predictions, pd.DataFrame) else list(predictions)
    sums: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    seen_benches: set[str] = set()
    for r in records:
        seen_benches.add(r["benchmark"])
        for m in metrics:
            acc = sums[(r["method"], r["benchmark"], m)]
            acc[0] += _metric_value(r.get(m))
            acc[1] += 1
    benches = list(benchmarks) if benchmarks is not None else sorted(seen_benches)
    out: dict[tuple[str, str], float] = {}
    for method in dict.fromkeys(r["method"] for r in records):
        for m in metrics:
            cells = [sums.get((method, b, m)) for b in benches]
            out[(method, m)] = (
                float("nan") if any(c is None for c in cells) else sum(100.0 * s / n for s, n in cells) / len(cells)
            )
    return out


def average_mismatches(table: pd.DataFrame, predictions: Iterable[Mapping], tol: float = 1e-6) -> list[str]:
    """Where Table 1's ``avg`` block disagrees with :func:`recompute_averages` (empty when it agrees)."""
    metrics = list(dict.fromkeys(m for b, m in table.columns if b == AVG))
    benches = [b for b in dict.fromkeys(b for b, _ in table.columns) if b != AVG]
    want = recompute_averages(predictions, metrics, benches)
    problems = []
    for method in table.index:
        for m in metrics:
            got, exp = table.loc[method, (AVG, m)], want.get((method, m), float("nan"))
            if not ((math.isnan(got) and math.isnan(exp)) or abs(got - exp) <= tol):
                problems.append(f"{method} avg {m}: table {got:.4f} != recomputed {exp:.4f}")
    return problems


def _fmt(value, digits: int) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _header(columns: Sequence[tuple[str, str]]) -> str:
    return " | ".join(f"{BENCHMARK_LABELS.get(b, b)} {METRIC_LABELS.get(m, m)}" for b, m in columns)


def table1_markdown(
    table: pd.DataFrame, *, digits: int = 1, caption: str | None = None, intervals: pd.DataFrame | None = None
) -> str:
    """Table 1 as a Markdown table (``—`` for a missing cell); with ``intervals`` (:func:`table1_power`'s
    rows) each cell it covers reads ``score [low, high]``."""
    cols = list(table.columns)
    bounds = (
        {}
        if intervals is None
        else {
            (r["method"], r["benchmark"], r["metric"]): (r["ci_low"], r["ci_high"])
            for r in intervals.to_dict("records")
        }
    )

    def cell(method, c, value) -> str:
        low_high = bounds.get((method, *c))
        text = _fmt(value, digits)
        return (
            text if low_high is None or text == "—" else f"{text} [{low_high[0]:.{digits}f}, {low_high[1]:.{digits}f}]"
        )

    lines = [f"| Method | {_header(cols)} |", "|" + "---|" * (len(cols) + 1)]
    for method, row in table.iterrows():
        lines.append(f"| {method} | " + " | ".join(cell(method, c, row[c]) for c in cols) + " |")
    return (f"{caption}\n\n" if caption else "") + "\n".join(lines) + "\n"


# -- Table 1 as a flat Parquet table ------------------------------------------------------------------
def flatten_table1(table: pd.DataFrame, questions: dict[str, int]) -> pa.Table:
    """Table 1 with one column per (benchmark, metric), named ``<metric>_<benchmark>`` (``em_nq``, ``judge_avg``)."""
    cols = [f"{m}_{b}" for b, m in table.columns]
    schema = pa.schema([("method", pa.string()), ("questions", pa.int64()), *[(c, pa.float64()) for c in cols]])
    rows = [
        {
            "method": method,
            "questions": int(questions.get(method, 0)),
            **{f"{m}_{b}": None if math.isnan(v) else float(v) for (b, m), v in row.items()},
        }
        for method, row in table.iterrows()
    ]
    return pa.Table.from_pylist(rows, schema=schema)


def unflatten_table1(table: pa.Table) -> pd.DataFrame:
    """The inverse of :func:`flatten_table1`: :func:`evals.report.table1`'s layout (NaN for null)."""
    df = table.to_pandas().set_index("method").drop(columns=["questions"])
    df.columns = pd.MultiIndex.from_tuples(
        [tuple(reversed(c.split("_", 1))) for c in df.columns], names=["benchmark", "metric"]
    )
    return df.astype(float)


# -- the paper's numbers --------------------------------------------------------------------------------
PAPER_TABLE1_SOURCE = (
    "Zhang et al. 2025, 'Agent models: Internalizing Chain-of-Action Generation into "
    "Reasoning models', arXiv:2503.06580, Table 1"
)
# The paper's numbers live in a CSV transcribed cell by cell from the PDF (arXiv:2503.06580), validated line by
# line on every read: a number that is not the paper's must never be labelled as the paper's.
PAPER_TABLE1_FILE = Path(__file__).resolve().parents[1] / "configs" / "paper_table1.csv"
PAPER_TABLE1_COLUMNS = ("paper_row", "method", "benchmark", "metric", "value")


def _read_paper_rows(
    path: Path, metrics: Sequence[str], methods: Collection[str] | None = TABLE1_METHODS
) -> tuple[list[dict], list[str]]:
    """The CSV's data rows (``#`` lines are comments) and every problem found, each naming file and line.

    ``method`` must be empty (a paper row with no counterpart of ours, e.g. Deepseek-R1*) or one of
    ``methods`` (None: any name), and each of our methods maps to at most one paper row."""
    import csv

    rows, problems = [], []
    benchmarks = (*TABLE1_BENCHMARKS, AVG)
    with path.open(newline="", encoding="utf-8") as fh:
        lines = [(n, line) for n, line in enumerate(fh, 1) if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        return [], [f"{path}: no header; expected {','.join(PAPER_TABLE1_COLUMNS)}"]
    reader = csv.reader([line for _, line in lines])
    header = [c.strip() for c in next(reader)]
    if tuple(header) != PAPER_TABLE1_COLUMNS:
        return [], [f"{path}:{lines[0][0]}: header {header} != {list(PAPER_TABLE1_COLUMNS)}"]
    seen: dict[tuple, int] = {}
    row_methods: dict[str, str] = {}
    method_rows: dict[str, str] = {}
    for (lineno, _), cells in zip(lines[1:], reader):
        where = f"{path}:{lineno}"
        if len(cells) != len(PAPER_TABLE1_COLUMNS):
            problems.append(f"{where}: {len(cells)} cells, expected {len(PAPER_TABLE1_COLUMNS)}")
            continue
        row = dict(zip(PAPER_TABLE1_COLUMNS, (c.strip() for c in cells)))
        if not row["paper_row"]:
            problems.append(f"{where}: empty paper_row")
        if row["benchmark"] not in benchmarks:
            problems.append(f"{where}: unknown benchmark {row['benchmark']!r} (one of {', '.join(benchmarks)})")
        if row["metric"] not in metrics:
            problems.append(f"{where}: unknown metric {row['metric']!r} (one of {', '.join(metrics)})")
        try:
            value = float(row["value"])
        except ValueError:
            problems.append(f"{where}: value {row['value']!r} is not a number")
            continue
        if not 0.0 <= value <= 100.0:
            problems.append(f"{where}: value {value} is not a percentage in [0, 100]")
        key = (row["paper_row"], row["benchmark"], row["metric"])
        if key in seen:
            problems.append(f"{where}: {key} repeats line {seen[key]}")
        seen.setdefault(key, lineno)
        if row_methods.setdefault(row["paper_row"], row["method"]) != row["method"]:
            problems.append(
                f"{where}: paper_row {row['paper_row']!r} maps to method {row['method']!r} here "
                f"but to {row_methods[row['paper_row']]!r} earlier"
            )
        elif row["method"] and methods is not None and row["method"] not in methods:
            problems.append(f"{where}: unknown method {row['method']!r} (one of {', '.join(methods)}, or empty)")
        elif row["method"] and method_rows.setdefault(row["method"], row["paper_row"]) != row["paper_row"]:
            problems.append(
                f"{where}: method {row['method']!r} is mapped from paper_row {row['paper_row']!r} here "
                f"but from {method_rows[row['method']]!r} earlier"
            )
        rows.append({**row, "value": value})
    return rows, problems


def paper_table1(
    metrics: Sequence[str] = ("em", "judge"),
    path: str | Path | None = None,
    *,
    methods: Collection[str] | None = TABLE1_METHODS,
) -> pd.DataFrame:
    """The paper's Table 1 (percent) in :func:`table1`'s layout, read from ``path`` (default
    ``configs/paper_table1.csv``: columns ``paper_row, method, benchmark, metric, value``).

    ``method`` names our method that a paper row corresponds to (empty: none); the mapping is in
    ``attrs["method_map"]`` (our method -> paper row). Averages are the paper's own numbers, never
    recomputed; where a printed Average is not the mean of the paper's six benchmarks (beyond rounding),
    ``attrs["average_flags"]`` says so. A malformed file raises ``ValueError`` naming every bad line;
    a header-only file (or a missing default file) gives no rows.

    Args:
        methods: the method names the ``method`` column may use (default: our Table 1 rows; None: any).
    """
    columns = pd.MultiIndex.from_product([[*TABLE1_BENCHMARKS, AVG], list(metrics)], names=["benchmark", "metric"])
    explicit = path is not None
    path = Path(path) if explicit else PAPER_TABLE1_FILE
    rows: list[dict] = []
    if path.is_file():
        rows, problems = _read_paper_rows(path, metrics, methods)
        if problems:
            raise ValueError(f"{len(problems)} problem(s) in the paper's Table 1 file:\n" + "\n".join(problems[:20]))
    elif explicit:
        raise FileNotFoundError(f"the paper's Table 1 file {path} does not exist")
    order = list(dict.fromkeys(r["paper_row"] for r in rows))
    table = pd.DataFrame(index=pd.Index(order, name="method"), columns=columns, dtype=float)
    for r in rows:
        table.loc[r["paper_row"], (r["benchmark"], r["metric"])] = r["value"]
    table.attrs.update(
        source=PAPER_TABLE1_SOURCE,
        path=str(path),
        method_map={r["method"]: r["paper_row"] for r in rows if r["method"]},
        average_flags=paper_average_flags(table),
    )
    return table


def paper_average_flags(paper: pd.DataFrame, tol: float = 0.1) -> list[str]:
    """Where the paper's printed Average differs from the mean of its six benchmarks by more than ``tol``.

    Each printed number is rounded to 0.1, so a mean of six rounded numbers and a rounded Average may
    differ by up to 0.1 without either being wrong; more than that is the paper's own inconsistency,
    shown as printed and flagged here, never corrected.
    """
    flags = []
    for row in paper.index:
        for m in dict.fromkeys(m for _, m in paper.columns):
            six = [paper.loc[row, (b, m)] for b in PAPER_AVERAGE_BENCHMARKS]
            printed = paper.loc[row, (AVG, m)] if (AVG, m) in paper.columns else float("nan")
            if math.isnan(printed) or any(math.isnan(v) for v in six):
                continue
            mean = sum(six) / len(six)
            if abs(printed - mean) > tol + 1e-9:
                flags.append(
                    f"{row} {METRIC_LABELS.get(m, m)}: printed Average {printed:.1f}, "
                    f"mean of the six benchmarks {mean:.2f}"
                )
    return flags


def ours_vs_paper_markdown(
    ours: pd.DataFrame,
    paper: pd.DataFrame | None = None,
    *,
    method_map: Mapping[str, str] | None = None,
    digits: int = 1,
) -> str:
    """Our Table 1 beside the paper's: per our method, a row of ours, the paper's and the difference.

    Columns: our benchmarks, then the paper's benchmarks we lack, then the averages. The difference is
    shown where both sides measured the same benchmark; on the averages only where ours averages the
    paper's six benchmarks (an average over other questions is not the same quantity).

    Args:
        method_map: our method name -> the paper's row label (e.g. ``{"react": "ReAct"}``); a method
            without a counterpart shows only our row. Default: the paper table's ``attrs["method_map"]``
            (the CSV's ``method`` column).
    """
    paper = paper_table1(sorted({m for _, m in ours.columns})) if paper is None else paper
    method_map = paper.attrs.get("method_map", {}) if method_map is None else method_map
    metrics = list(dict.fromkeys(m for _, m in ours.columns))
    ours_benches = [b for b in dict.fromkeys(b for b, _ in ours.columns) if b != AVG]
    theirs_benches = [
        b
        for b in dict.fromkeys(b for b, _ in paper.columns)
        if b not in (AVG, *ours_benches) and paper[[c for c in paper.columns if c[0] == b]].notna().any().any()
    ]
    cols = [(b, m) for b in (*ours_benches, *theirs_benches, AVG) for m in metrics]
    same_average = sorted(ours_benches) == sorted(PAPER_AVERAGE_BENCHMARKS)

    def cell(table, row, c):
        return table.loc[row, c] if c in table.columns else float("nan")

    lines = [f"| Method | {_header(cols)} |", "|" + "---|" * (len(cols) + 1)]
    for method in ours.index:
        lines.append(f"| ours: {method} | " + " | ".join(_fmt(cell(ours, method, c), digits) for c in cols) + " |")
        theirs = method_map.get(method)
        if theirs is not None and theirs in paper.index:
            pvals = [cell(paper, theirs, c) for c in cols]
            lines.append(f"| paper: {theirs} | " + " | ".join(_fmt(v, digits) for v in pvals) + " |")
            diffs = [
                cell(ours, method, c) - v if c[0] != AVG or same_average else float("nan") for c, v in zip(cols, pvals)
            ]
            lines.append("| Δ (ours − paper) | " + " | ".join(_fmt(d, digits) for d in diffs) + " |")
    where = paper.attrs.get("path", str(PAPER_TABLE1_FILE))
    if not len(paper.index):
        return "\n".join(lines) + (
            f"\n\nThe paper's Table 1 numbers are not filled in yet ({where} holds no rows); "
            "only our numbers are shown.\n"
        )
    notes = [
        f"Paper numbers: {PAPER_TABLE1_SOURCE} (copied into {where}); paper rows without a counterpart "
        f"of ours are in the paper's table only."
    ]
    if not same_average:
        notes.append(
            f"Our Avg is over {', '.join(BENCHMARK_LABELS.get(b, b) for b in ours_benches) or 'no benchmark'}, "
            "the paper's over its six benchmarks: no Δ on the averages."
        )
    flags = paper.attrs.get("average_flags", [])
    if flags:
        notes.append(
            "Printed Averages that are not the mean of the paper's six benchmarks (kept as printed): "
            + "; ".join(flags)
            + "."
        )
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"


# -- Figure 3: action analysis -------------------------------------------------------------------------
def action_analysis(
    predictions: pd.DataFrame | Iterable[Mapping], *, correct: str = "em", cap: int = 5
) -> pd.DataFrame:
    """Per method and number of actions: how many answers, how many correct, and the two Figure 3 panels.

    ``share_of_correct`` (panel a) is the fraction of a method's correct answers that took that many
    actions (sums to 1 per method); ``success_rate`` (panel b) is the accuracy of the answers that
    took that many actions (NaN where there were none). Action counts of ``cap`` or more share one
    bucket labelled ``"{cap}+"``; every bucket 0..cap is present for every method, so plots align.
    """
    df = _frame(predictions)
    if "n_actions" not in df.columns or correct not in df.columns:
        raise ValueError(f"action analysis needs columns 'n_actions' and {correct!r}")
    work = pd.DataFrame(
        {
            "method": df["method"],
            "n_actions": df["n_actions"].astype(int).clip(lower=0, upper=cap),
            "correct": df[correct].map(_metric_value) > 0.5,
        }
    )
    rows = []
    for method in dict.fromkeys(work["method"]):
        sub = work[work["method"] == method]
        total_correct = int(sub["correct"].sum())
        for k in range(cap + 1):
            bucket = sub[sub["n_actions"] == k]
            n, n_ok = len(bucket), int(bucket["correct"].sum())
            rows.append(
                {
                    "method": method,
                    "n_actions": k,
                    "label": f"{k}+" if k == cap else str(k),
                    "n": n,
                    "n_correct": n_ok,
                    "share_of_correct": n_ok / total_correct if total_correct else float("nan"),
                    "success_rate": n_ok / n if n else float("nan"),
                }
            )
    return pd.DataFrame(rows)


def plot_action_analysis(
    analysis: pd.DataFrame, path: str | Path | None = None, *, title: str = "Action analysis"
) -> bytes:
    """Figure 3 as a PNG: (a) share of correct answers and (b) success rate, by number of actions.

    Uses matplotlib's Agg canvas directly (no pyplot, so no global state or display is touched).
    Returns the PNG bytes; with ``path`` also writes them there atomically (temp file + rename).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = list(dict.fromkeys(analysis["method"]))
    labels = list(dict.fromkeys(analysis["label"]))
    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    width = 0.8 / max(len(methods), 1)
    for ax, column, name in zip(
        fig.subplots(1, 2), ("share_of_correct", "success_rate"), ("(a) share of correct answers", "(b) success rate")
    ):
        for i, method in enumerate(methods):
            sub = analysis[analysis["method"] == method].set_index("label").reindex(labels)
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(labels))]
            ax.bar(xs, sub[column].fillna(0.0).to_numpy(), width=width, label=str(method))
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("number of actions")
        ax.set_ylim(0, 1)
        ax.set_title(name)
    fig.axes[0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return _png(fig, path)


def _png(fig, path: str | Path | None) -> bytes:
    """The figure as PNG bytes; with ``path`` also written there atomically (temp file + rename)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = buf.getvalue()
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    return data


# -- Table 1 with power: an interval per cell, paired tests per method -----------------------------------
POWER_RELATIONS = ("reference", "predecessor")


def _scores(df: pd.DataFrame, metric: str) -> dict[tuple[str, str], dict[str, float]]:
    """``{(method, benchmark): {question_id: 0/1 score}}``; a question graded twice is an error, not a vote."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for method, bench, qid, value in zip(df["method"], df["benchmark"], df["question_id"], df[metric]):
        cell = out.setdefault((method, bench), {})
        if qid in cell:
            raise ValueError(f"{method}/{bench}: question {qid!r} is graded more than once")
        cell[qid] = _metric_value(value)
    return out


def table1_power(
    predictions: pd.DataFrame | Iterable[Mapping],
    *,
    metrics: Sequence[str] = ("em", "judge"),
    methods: Sequence[str] | None = None,
    reference: str = REFERENCE_METHOD,
    predecessor: Mapping[str, str] = PREDECESSOR,
    resamples: int = stats.DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
    paired: bool = True,
) -> pd.DataFrame:
    """One row per Table 1 cell (method, benchmark, metric): its questions, score and Wilson interval,
    and the paired comparison with the reference and with the predecessor (:func:`compared_with`).

    Scores, intervals and differences are percent. For each relation ``r`` in ("reference",
    "predecessor"): ``r`` (the other method; None when it is the method itself or has no predictions on
    that benchmark), ``r_score``, ``r_diff`` (ours − theirs), ``r_diff_low``/``r_diff_high`` (paired
    percentile bootstrap, ``resamples`` draws, ``seed``), ``r_only_method``/``r_only_other`` (the
    discordant questions) and ``r_p`` (exact McNemar). A judge verdict of None counts 0, as in
    :func:`table1`. Raises ``ValueError`` when two compared methods were graded on different question ids.
    ``paired=False``: the intervals only (the comparison columns stay empty).
    """
    df = _frame(predictions)
    missing = set(metrics) - set(df.columns)
    if missing:
        raise ValueError(f"prediction rows lack metric columns {sorted(missing)}")
    present = list(dict.fromkeys(df["method"]))
    order = (
        list(methods)
        if methods is not None
        else ([m for m in TABLE1_METHODS if m in present] + [m for m in present if m not in TABLE1_METHODS])
    )
    benches = sorted(df["benchmark"].unique(), key=benchmark_sort_key)
    rows = []
    for metric in metrics:
        scores = _scores(df, metric)
        for method in order:
            for bench in benches:
                mine = scores.get((method, bench))
                if mine is None:
                    continue
                k, n = int(sum(v > 0.5 for v in mine.values())), len(mine)
                low, high = stats.wilson_interval(k, n, confidence)
                row = {
                    "method": method,
                    "benchmark": bench,
                    "metric": metric,
                    "n": n,
                    "correct": k,
                    "score": 100.0 * sum(mine.values()) / n,
                    "ci_low": 100.0 * low,
                    "ci_high": 100.0 * high,
                }
                for rel, other in compared_with(method, reference, predecessor).items():
                    theirs = scores.get((other, bench)) if other and paired else None
                    cmp = (
                        stats.compare_paired(
                            mine,
                            theirs,
                            resamples=resamples,
                            seed=seed,
                            confidence=confidence,
                            names=(f"{method}/{bench}", f"{other}/{bench}"),
                        )
                        if theirs
                        else None
                    )
                    row.update(
                        {
                            rel: other if cmp else None,
                            f"{rel}_score": 100.0 * cmp.score_b if cmp else None,
                            f"{rel}_diff": 100.0 * cmp.diff if cmp else None,
                            f"{rel}_diff_low": 100.0 * cmp.diff_low if cmp else None,
                            f"{rel}_diff_high": 100.0 * cmp.diff_high if cmp else None,
                            f"{rel}_only_method": cmp.only_a if cmp else None,
                            f"{rel}_only_other": cmp.only_b if cmp else None,
                            f"{rel}_p": cmp.p_value if cmp else None,
                        }
                    )
                rows.append({**row, "resamples": resamples, "seed": seed, "confidence": confidence})
    return pd.DataFrame(rows, columns=list(POWER_COLUMNS))


POWER_COLUMNS = {
    "method": pa.string(),
    "benchmark": pa.string(),
    "metric": pa.string(),
    "n": pa.int64(),
    "correct": pa.int64(),
    "score": pa.float64(),
    "ci_low": pa.float64(),
    "ci_high": pa.float64(),
    **{
        k: t
        for r in POWER_RELATIONS
        for k, t in (
            (r, pa.string()),
            (f"{r}_score", pa.float64()),
            (f"{r}_diff", pa.float64()),
            (f"{r}_diff_low", pa.float64()),
            (f"{r}_diff_high", pa.float64()),
            (f"{r}_only_method", pa.int64()),
            (f"{r}_only_other", pa.int64()),
            (f"{r}_p", pa.float64()),
        )
    },
    "resamples": pa.int64(),
    "seed": pa.int64(),
    "confidence": pa.float64(),
}
POWER_SCHEMA = pa.schema(list(POWER_COLUMNS.items()))


def power_table(power: pd.DataFrame) -> pa.Table:
    """:func:`table1_power`'s rows as an Arrow table with a fixed schema (nulls where no comparison)."""
    records = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        for r in power.to_dict("records")
    ]
    return pa.Table.from_pylist(records, schema=POWER_SCHEMA)


def _p(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _vs(r: Mapping, rel: str, digits: int) -> str:
    other = r.get(rel)
    if other is None or (isinstance(other, float) and math.isnan(other)):
        return "—"
    return (
        f"{r[f'{rel}_diff']:+.{digits}f} [{r[f'{rel}_diff_low']:+.{digits}f}, {r[f'{rel}_diff_high']:+.{digits}f}] "
        f"vs {other}, p={_p(r[f'{rel}_p'])} ({int(r[f'{rel}_only_method'])}:{int(r[f'{rel}_only_other'])})"
    )


def power_markdown(power: pd.DataFrame, *, metric: str = "em", digits: int = 1) -> str:
    """Table 1 with power as Markdown: per method and benchmark, n, each metric with its 95% interval,
    and ``metric``'s paired differences with the reference and the predecessor (McNemar p, discordant counts)."""
    if not len(power):
        return "_(no predictions)_\n"
    metrics = list(dict.fromkeys(power["metric"]))
    labels = [METRIC_LABELS.get(m, m) for m in metrics]
    name = METRIC_LABELS.get(metric, metric)
    lines = [
        "| Method | Benchmark | n | "
        + " | ".join(f"{m} [95% CI]" for m in labels)
        + f" | Δ{name} vs ReAct (reasoning) [95% CI], McNemar p (only ours:only theirs) | Δ{name} vs predecessor |",
        "|" + "---|" * (len(metrics) + 5),
    ]
    cells = {(r["method"], r["benchmark"], r["metric"]): r for r in power.to_dict("records")}
    for method, bench in dict.fromkeys(zip(power["method"], power["benchmark"])):
        ivs = [cells.get((method, bench, m)) for m in metrics]
        main = cells.get((method, bench, metric), {})
        lines.append(
            f"| {method} | {BENCHMARK_LABELS.get(bench, bench)} | {ivs[0]['n']} | "
            + " | ".join(
                f"{c['score']:.{digits}f} [{c['ci_low']:.{digits}f}, {c['ci_high']:.{digits}f}]" if c else "—"
                for c in ivs
            )
            + f" | {_vs(main, 'reference', digits) if main else '—'} | {_vs(main, 'predecessor', digits) if main else '—'} |"
        )
    r0 = power.iloc[0]
    return (
        "\n".join(lines) + f"\n\nPercent. Intervals: Wilson score, {r0['confidence']:.0%}. Δ: paired percentile "
        f"bootstrap ({int(r0['resamples'])} resamples, seed {int(r0['seed'])}) of the difference on the same "
        "questions; p: exact McNemar test (two-sided binomial on the discordant questions).\n"
    )


def plot_intervals(
    power: pd.DataFrame, benchmark: str, path: str | Path | None = None, *, metric: str = "em", title: str | None = None
) -> bytes:
    """Score per method on one benchmark with its 95% interval as error bars, as PNG bytes (Agg canvas);
    the reference method's interval is shaded across the plot. With ``path`` also written there."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sub = power[(power["benchmark"] == benchmark) & (power["metric"] == metric)]
    if not len(sub):
        raise ValueError(f"no {metric} cells for benchmark {benchmark!r} (have {sorted(set(power['benchmark']))})")
    fig = Figure(figsize=(max(5.0, 0.7 * len(sub) + 2), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    xs = range(len(sub))
    ref = sub[sub["method"] == REFERENCE_METHOD]
    if len(ref):
        ax.axhspan(ref["ci_low"].iloc[0], ref["ci_high"].iloc[0], color="0.9", label=f"{REFERENCE_METHOD} 95% CI")
    ax.errorbar(
        xs,
        sub["score"],
        yerr=[sub["score"] - sub["ci_low"], sub["ci_high"] - sub["score"]],
        fmt="o",
        capsize=4,
        label=f"{METRIC_LABELS.get(metric, metric)} (95% Wilson CI)",
    )
    ax.set_xticks(
        list(xs), [f"{m}\nn={n}" for m, n in zip(sub["method"], sub["n"])], rotation=30, ha="right", fontsize=8
    )
    ax.set_ylabel("percent")
    ax.set_ylim(0, max(5.0, float(sub["ci_high"].max()) * 1.15))
    ax.legend(fontsize="small")
    ax.set_title(
        title or f"{METRIC_LABELS.get(metric, metric)} per method on {BENCHMARK_LABELS.get(benchmark, benchmark)}"
    )
    fig.tight_layout()
    return _png(fig, path)


# -- DuckDB views -----------------------------------------------------------------------------------------
def duckdb_views(home: str | Path) -> str:
    """SQL for a plain ``duckdb`` shell: views over the evaluation tables of ``home`` and Table 1 recomputed in SQL."""
    from qadata.sql import ident, sql_literal  # imports duckdb

    preds = str(table_path(home, ["eval_predictions"]).parent / "partition=*" / "data.parquet")
    return (
        "-- DuckDB views over the evaluation tables: `duckdb -init views.sql`, or execute this file in a session.\n"
        "-- `autocoa sql` already offers eval_predictions, eval_table and action_analysis as views.\n"
        f"CREATE OR REPLACE VIEW {ident('eval_predictions')} AS SELECT * FROM read_parquet("
        f"{sql_literal(preds)}, hive_partitioning = true, union_by_name = true);\n"
        f"CREATE OR REPLACE VIEW {ident('eval_table')} AS SELECT * FROM read_parquet("
        f"{sql_literal(str(table_path(home, ['eval_table'])))});\n"
        "-- Table 1 recomputed in SQL, long form: percent per (method, benchmark)\n"
        "CREATE OR REPLACE VIEW eval_scores AS SELECT method, benchmark, count(*) AS questions, 100 * avg(em) AS em,\n"
        "  100 * avg(coalesce(judge::INTEGER, 0)) AS judge FROM eval_predictions GROUP BY ALL ORDER BY ALL;\n"
    )


# -- the whole report ----------------------------------------------------------------------------------
def evaluation_report(
    ours: pd.DataFrame,
    paper: pd.DataFrame,
    *,
    analysis: pd.DataFrame | None = None,
    fidelity: pd.DataFrame | None = None,
    power: pd.DataFrame | None = None,
    judge_note: str = "",
) -> str:
    """One Markdown report: our Table 1, its intervals and paired tests, ours beside the paper's, Figure 3's
    numbers and world-model fidelity.

    Args:
        ours: :func:`table1`'s layout. paper: :func:`paper_table1`'s. analysis: :func:`action_analysis`'s
            rows. fidelity: ``world_model_fidelity`` rows (``method, source`` and the measures).
            power: :func:`table1_power`'s rows (the ``eval_comparisons`` table).
    """
    parts = [
        "# Evaluation report",
        "",
        table1_markdown(
            ours,
            intervals=power,
            caption=(
                "## Table 1 (ours)\n\nPercent"
                + ("; [95% Wilson interval]" if power is not None else "")
                + "; Avg = unweighted mean over the benchmarks; — = the method lacks that benchmark."
                + (f" {judge_note}" if judge_note else "")
            ),
        ),
    ]
    if power is not None:
        parts += ["## Table 1 with intervals and paired tests", "", power_markdown(power)]
    parts += ["## Ours beside the paper", "", ours_vs_paper_markdown(ours, paper)]
    if analysis is not None and len(analysis):
        cols = ["method", "label", "n", "n_correct", "share_of_correct", "success_rate"]
        parts += ["## Figure 3: answers by number of actions", "", _markdown_rows(analysis[cols]), ""]
    if fidelity is not None:
        agg = aggregate_fidelity(fidelity.to_dict("records"), by=["method", "source"]) if len(fidelity) else None
        parts += [
            "## World-model fidelity (simulated vs real search results)",
            "",
            _markdown_rows(agg) if agg is not None else "_(no SFT-3 or RL checkpoint simulated a search)_",
            "",
        ]
    return "\n".join(parts)


def _markdown_rows(df: pd.DataFrame, digits: int = 3) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v, digits) if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"
