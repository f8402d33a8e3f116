"""Evaluation: grading (EM/F1/cover-EM), benchmarks (loaders, sampling, leakage), judge (LLM judge),
report (Table 1, Figure 3, the paper's numbers), fidelity (world model vs real search), react (the
ReAct baseline prompt). Plain Python, no Dagster imports."""
