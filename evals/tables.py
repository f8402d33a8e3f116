"""The evaluation's report tables, computed from the graded prediction rows with :mod:`evals.report`, and what is
shown beside each: Table 1 (``eval_table``), Table 1 with intervals and paired tests (``eval_comparisons``) and
Figure 3 (``action_analysis``). Plain Python: the Dagster assets (``assets/eval_reports.py``) store the tables,
write the figures and wrap the Markdown as metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa

from agent.models import EMBEDDED_MODEL
from evals import report
from evals.predict import EMBEDDED_JUDGE_NOTE, METHODS
from evals.report import TABLE1_METRICS

CORRECT_BY = {"em": "EM", "judge": "LLM judge"}  # what Figure 3 may count as a correct answer


def method_order(methods) -> list[str]:
    """The methods present, in Table 1's order (:data:`evals.predict.METHODS`), any other after them, sorted."""
    present = set(methods)
    return [m for m in METHODS if m in present] + sorted(present - set(METHODS))


# -- eval_table (Table 1) -----------------------------------------------------------------------------------
@dataclass
class Table1:
    """Table 1 (percent per method and benchmark, with averages), its Wilson intervals and its flat table."""

    t1: pd.DataFrame
    intervals: pd.DataFrame
    table: pa.Table  # eval_table: one row per method, one column per ``<metric>_<benchmark>``
    judge_models: list[str]

    @property
    def methods(self) -> list[str]:
        """The rows of Table 1, in order."""
        return list(self.t1.index)

    @property
    def n_benchmarks(self) -> int:
        """How many benchmark columns Table 1 has (the average not counted)."""
        return len(self.t1.columns) // len(TABLE1_METRICS) - 1

    @property
    def complete(self) -> list[str]:
        """The methods with every benchmark (only they have averages)."""
        return [m for m in self.methods if not math.isnan(self.t1.loc[m, (report.AVG, "em")])]

    def averages(self) -> dict[str, list[float]]:
        """EM and LLM-judged averages of the :attr:`complete` methods, by label."""
        return {
            label: [self.t1.loc[m, (report.AVG, metric)] for m in self.complete]
            for label, metric in (("EM", "em"), ("LLM", "judge"))
        }

    def markdown(self, paper: pd.DataFrame) -> dict[str, str]:
        """Our Table 1 with intervals, ours beside the paper's (:func:`evals.report.paper_table1`), the paper's."""
        judged_by = ", ".join(self.judge_models) + (
            f" ({EMBEDDED_JUDGE_NOTE})" if EMBEDDED_MODEL in self.judge_models else ""
        )
        caption = (
            "**Table 1 (ours)**: percent [95% Wilson interval]; Avg = unweighted mean over the benchmarks; — = the "
            f"method lacks that benchmark; paired tests in eval_comparisons. LLM = judged by {judged_by}."
        )
        return {
            "table1": report.table1_markdown(self.t1, intervals=self.intervals, caption=caption),
            "ours_vs_paper": report.ours_vs_paper_markdown(self.t1, paper),
            "paper_table1": report.table1_markdown(
                paper,
                caption=f"**The paper's Table 1** ({report.PAPER_TABLE1_SOURCE}; copied into {paper.attrs['path']})",
            )
            if len(paper.index)
            else f"The paper's Table 1 is not filled in yet ({paper.attrs['path']} holds no rows).",
        }


def table1(predictions: pd.DataFrame) -> Table1:
    """Table 1 from prediction rows (``method, benchmark, question_id``, the metrics and ``judge_model``)."""
    methods = method_order(predictions["method"])
    t1 = report.table1(predictions, metrics=TABLE1_METRICS, methods=methods)
    intervals = report.table1_power(predictions, metrics=TABLE1_METRICS, methods=methods, paired=False)
    table = report.flatten_table1(t1, predictions.groupby("method").size().to_dict())
    return Table1(t1, intervals, table, sorted(set(predictions["judge_model"])))


# -- eval_comparisons (Table 1 with power) -------------------------------------------------------------------
@dataclass
class Comparisons:
    """Per method, benchmark and metric: the Wilson interval and the paired tests (:func:`evals.report.table1_power`)."""

    power: pd.DataFrame
    table: pa.Table

    @property
    def compared(self) -> dict[str, int]:
        """Paired EM comparisons made, per relation (reference, predecessor)."""
        em = self.power[self.power["metric"] == "em"]
        return {r: int(em[r].notna().sum()) for r in report.POWER_RELATIONS}

    def summary(self) -> dict:
        """The numbers shown beside the table."""
        return {
            "reference": report.REFERENCE_METHOD,
            "predecessors": report.PREDECESSOR,
            "em_comparisons": self.compared,
            "min_questions_per_cell": int(self.power["n"].min()),
        }


def comparisons(predictions: pd.DataFrame, *, resamples: int, seed: int, confidence: float) -> Comparisons:
    """Table 1 with power from prediction rows; ValueError when paired methods answered different questions."""
    power = report.table1_power(
        predictions, metrics=TABLE1_METRICS, resamples=resamples, seed=seed, confidence=confidence
    )
    return Comparisons(power, report.power_table(power))


# -- action_analysis (Figure 3) ------------------------------------------------------------------------------
def figure3(predictions: pd.DataFrame, *, correct: str, cap: int) -> pd.DataFrame:
    """Figure 3's rows (:func:`evals.report.action_analysis`), methods in Table 1's order."""
    if correct not in CORRECT_BY:
        raise ValueError(f"'correct' must be 'em' or 'judge', got {correct!r}")
    order = {m: i for i, m in enumerate(METHODS)}
    ordered = predictions.sort_values("method", key=lambda s: s.map(lambda m: order.get(m, len(order))), kind="stable")
    return report.action_analysis(ordered, correct=correct, cap=cap)


def figure3_table(analysis: pd.DataFrame, correct: str) -> pa.Table:
    """The stored Figure 3 table: its rows and what counted as correct."""
    table = pa.Table.from_pandas(analysis, preserve_index=False)
    return table.append_column("correct_by", pa.array([correct] * table.num_rows, pa.string()))


def figure3_panel(analysis: pd.DataFrame, column: str) -> list[dict[str, str]]:
    """One panel of Figure 3 as rows: per method, the value per action bucket to two decimals (— where none)."""
    wide = analysis.pivot(index="method", columns="label", values=column).reindex(
        list(dict.fromkeys(analysis["method"]))
    )
    return [{"method": m, **{k: "—" if pd.isna(v) else f"{v:.2f}" for k, v in r.items()}} for m, r in wide.iterrows()]
