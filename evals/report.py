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
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa

from evals.benchmarks import benchmark_sort_key
from evals.fidelity import aggregate_fidelity

AVG = "avg"
METRIC_LABELS = {"em": "EM", "judge": "LLM", "f1": "F1", "cover_em": "CEM"}
BENCHMARK_LABELS = {"nq": "NQ", "triviaqa": "TriviaQA", "popqa": "PopQA", "hotpotqa": "HotpotQA",
                    "2wikimultihopqa": "2Wiki", "musique": "MuSiQue", "bamboogle": "Bamboogle",
                    "fanout": "Fanout", AVG: "Avg"}
TABLE1_BENCHMARKS = ("nq", "triviaqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle", "fanout")


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
def table1(predictions: pd.DataFrame | Iterable[Mapping], *, metrics: Sequence[str] = ("em", "judge"),
           benchmarks: Sequence[str] | None = None, methods: Sequence[str] | None = None) -> pd.DataFrame:
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


def recompute_averages(predictions: Iterable[Mapping], metrics: Sequence[str] = ("em", "judge"),
                       benchmarks: Sequence[str] | None = None) -> dict[tuple[str, str], float]:
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
            out[(method, m)] = (float("nan") if any(c is None for c in cells)
                                else sum(100.0 * s / n for s, n in cells) / len(cells))
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


def table1_markdown(table: pd.DataFrame, *, digits: int = 1, caption: str | None = None) -> str:
    """Table 1 as a Markdown table (``—`` for a missing cell)."""
    cols = list(table.columns)
    lines = [f"| Method | {_header(cols)} |", "|" + "---|" * (len(cols) + 1)]
    for method, row in table.iterrows():
        lines.append(f"| {method} | " + " | ".join(_fmt(row[c], digits) for c in cols) + " |")
    return (f"{caption}\n\n" if caption else "") + "\n".join(lines) + "\n"


# -- Table 1 as a flat Parquet table ------------------------------------------------------------------
def flatten_table1(table: pd.DataFrame, questions: dict[str, int]) -> pa.Table:
    """Table 1 with one column per (benchmark, metric), named ``<metric>_<benchmark>`` (``em_nq``, ``judge_avg``)."""
    cols = [f"{m}_{b}" for b, m in table.columns]
    schema = pa.schema([("method", pa.string()), ("questions", pa.int64()), *[(c, pa.float64()) for c in cols]])
    rows = [{"method": method, "questions": int(questions.get(method, 0)),
             **{f"{m}_{b}": None if math.isnan(v) else float(v) for (b, m), v in row.items()}}
            for method, row in table.iterrows()]
    return pa.Table.from_pylist(rows, schema=schema)


def unflatten_table1(table: pa.Table) -> pd.DataFrame:
    """The inverse of :func:`flatten_table1`: :func:`evals.report.table1`'s layout (NaN for null)."""
    df = table.to_pandas().set_index("method").drop(columns=["questions"])
    df.columns = pd.MultiIndex.from_tuples([tuple(reversed(c.split("_", 1))) for c in df.columns],
                                           names=["benchmark", "metric"])
    return df.astype(float)


# -- the paper's numbers --------------------------------------------------------------------------------
PAPER_TABLE1_SOURCE = ("Zhang et al. 2025, 'Agent models: Internalizing Chain-of-Action Generation into "
                       "Reasoning models', arXiv:2503.06580, Table 1")
# The paper's numbers live in a CSV a person fills from the PDF (arXiv:2503.06580, or CoA_paper.pdf in
# github.com/ADaM-BJTU/AutoCoA). The shipped file holds only its header: the per-benchmark numbers could not
# be read from any source available offline, and numbers that are not the paper's must never be labelled
# as the paper's. Until it is filled, paper_table1() is empty and every comparison says so.
PAPER_TABLE1_FILE = Path(__file__).resolve().parents[1] / "configs" / "paper_table1.csv"
PAPER_TABLE1_COLUMNS = ("paper_row", "method", "benchmark", "metric", "value")


def _read_paper_rows(path: Path, metrics: Sequence[str]) -> tuple[list[dict], list[str]]:
    """The CSV's data rows (``#`` lines are comments) and every problem found, each naming file and line."""
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
            problems.append(f"{where}: paper_row {row['paper_row']!r} maps to method {row['method']!r} here "
                            f"but to {row_methods[row['paper_row']]!r} earlier")
        rows.append({**row, "value": value})
    return rows, problems


def paper_table1(metrics: Sequence[str] = ("em", "judge"), path: str | Path | None = None) -> pd.DataFrame:
    """The paper's Table 1 (percent) in :func:`table1`'s layout, read from ``path`` (default
    ``configs/paper_table1.csv``: columns ``paper_row, method, benchmark, metric, value``).

    ``method`` names our method that a paper row corresponds to (empty: none); the mapping is in
    ``attrs["method_map"]`` (our method -> paper row). Averages are the paper's own numbers, never
    recomputed (the paper may average over other benchmarks). A malformed file raises ``ValueError``
    naming every bad line; the shipped header-only file (or a missing default file) gives no rows.
    """
    columns = pd.MultiIndex.from_product([[*TABLE1_BENCHMARKS, AVG], list(metrics)], names=["benchmark", "metric"])
    explicit = path is not None
    path = Path(path) if explicit else PAPER_TABLE1_FILE
    rows: list[dict] = []
    if path.is_file():
        rows, problems = _read_paper_rows(path, metrics)
        if problems:
            raise ValueError(f"{len(problems)} problem(s) in the paper's Table 1 file:\n" + "\n".join(problems[:20]))
    elif explicit:
        raise FileNotFoundError(f"the paper's Table 1 file {path} does not exist")
    order = list(dict.fromkeys(r["paper_row"] for r in rows))
    table = pd.DataFrame(index=pd.Index(order, name="method"), columns=columns, dtype=float)
    for r in rows:
        table.loc[r["paper_row"], (r["benchmark"], r["metric"])] = r["value"]
    table.attrs.update(source=PAPER_TABLE1_SOURCE, path=str(path),
                       method_map={r["method"]: r["paper_row"] for r in rows if r["method"]})
    return table


def ours_vs_paper_markdown(ours: pd.DataFrame, paper: pd.DataFrame | None = None, *,
                           method_map: Mapping[str, str] | None = None, digits: int = 1) -> str:
    """Our Table 1 beside the paper's: per our method, a row of ours, the paper's and the difference.

    Args:
        method_map: our method name -> the paper's row label (e.g. ``{"react": "ReAct"}``); a method
            without a counterpart shows only our row. Default: the paper table's ``attrs["method_map"]``
            (the CSV's ``method`` column).
    """
    paper = paper_table1(sorted({m for _, m in ours.columns})) if paper is None else paper
    method_map = paper.attrs.get("method_map", {}) if method_map is None else method_map
    cols = list(ours.columns)
    lines = [f"| Method | {_header(cols)} |", "|" + "---|" * (len(cols) + 1)]
    for method, row in ours.iterrows():
        lines.append(f"| ours: {method} | " + " | ".join(_fmt(row[c], digits) for c in cols) + " |")
        theirs = method_map.get(method)
        if theirs is not None and theirs in paper.index:
            prow = paper.loc[theirs]
            pvals = [prow[c] if c in paper.columns else float("nan") for c in cols]
            lines.append(f"| paper: {theirs} | " + " | ".join(_fmt(v, digits) for v in pvals) + " |")
            lines.append("| Δ (ours − paper) | " + " | ".join(_fmt(row[c] - v, digits) for c, v in zip(cols, pvals)) + " |")
    where = paper.attrs.get("path", str(PAPER_TABLE1_FILE))
    note = (f"Paper numbers: {PAPER_TABLE1_SOURCE} (copied into {where})." if len(paper.index) else
            f"The paper's Table 1 numbers are not filled in yet ({where} holds no rows; TODO: copy them from "
            "the PDF); only our numbers are shown.")
    return "\n".join(lines) + f"\n\n{note}\n"


# -- Figure 3: action analysis -------------------------------------------------------------------------
def action_analysis(predictions: pd.DataFrame | Iterable[Mapping], *, correct: str = "em",
                    cap: int = 5) -> pd.DataFrame:
    """Per method and number of actions: how many answers, how many correct, and the two Figure 3 panels.

    ``share_of_correct`` (panel a) is the fraction of a method's correct answers that took that many
    actions (sums to 1 per method); ``success_rate`` (panel b) is the accuracy of the answers that
    took that many actions (NaN where there were none). Action counts of ``cap`` or more share one
    bucket labelled ``"{cap}+"``; every bucket 0..cap is present for every method, so plots align.
    """
    df = _frame(predictions)
    if "n_actions" not in df.columns or correct not in df.columns:
        raise ValueError(f"action analysis needs columns 'n_actions' and {correct!r}")
    work = pd.DataFrame({"method": df["method"],
                         "n_actions": df["n_actions"].astype(int).clip(lower=0, upper=cap),
                         "correct": df[correct].map(_metric_value) > 0.5})
    rows = []
    for method in dict.fromkeys(work["method"]):
        sub = work[work["method"] == method]
        total_correct = int(sub["correct"].sum())
        for k in range(cap + 1):
            bucket = sub[sub["n_actions"] == k]
            n, n_ok = len(bucket), int(bucket["correct"].sum())
            rows.append({"method": method, "n_actions": k, "label": f"{k}+" if k == cap else str(k), "n": n,
                         "n_correct": n_ok,
                         "share_of_correct": n_ok / total_correct if total_correct else float("nan"),
                         "success_rate": n_ok / n if n else float("nan")})
    return pd.DataFrame(rows)


def plot_action_analysis(analysis: pd.DataFrame, path: str | Path | None = None, *,
                         title: str = "Action analysis") -> bytes:
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
    for ax, column, name in zip(fig.subplots(1, 2), ("share_of_correct", "success_rate"),
                                ("(a) share of correct answers", "(b) success rate")):
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


# -- the whole report ----------------------------------------------------------------------------------
def evaluation_report(ours: pd.DataFrame, paper: pd.DataFrame, *, analysis: pd.DataFrame | None = None,
                      fidelity: pd.DataFrame | None = None, judge_note: str = "") -> str:
    """One Markdown report: our Table 1, ours beside the paper's, Figure 3's numbers and world-model fidelity.

    Args:
        ours: :func:`table1`'s layout. paper: :func:`paper_table1`'s. analysis: :func:`action_analysis`'s
            rows. fidelity: ``world_model_fidelity`` rows (``method, source`` and the measures).
    """
    parts = ["# Evaluation report", "",
             table1_markdown(ours, caption="## Table 1 (ours)\n\nPercent; Avg = unweighted mean over the benchmarks; "
                                           "— = the method lacks that benchmark." + (f" {judge_note}" if judge_note else "")),
             "## Ours beside the paper", "", ours_vs_paper_markdown(ours, paper)]
    if analysis is not None and len(analysis):
        cols = ["method", "label", "n", "n_correct", "share_of_correct", "success_rate"]
        parts += ["## Figure 3: answers by number of actions", "", _markdown_rows(analysis[cols]), ""]
    if fidelity is not None:
        agg = aggregate_fidelity(fidelity.to_dict("records"), by=["method", "source"]) if len(fidelity) else None
        parts += ["## World-model fidelity (simulated vs real search results)", "",
                  _markdown_rows(agg) if agg is not None else "_(no SFT-3 or RL checkpoint simulated a search)_", ""]
    return "\n".join(parts)


def _markdown_rows(df: pd.DataFrame, digits: int = 3) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v, digits) if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"
