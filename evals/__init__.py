"""Evaluation (benchmarks, metrics, Table 1 / Figure 3); arrives with the evaluation issue. No Dagster imports."""
