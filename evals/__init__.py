"""Evaluation: datasets (benchmark loaders, sampling, leakage), questions (each benchmark's evaluation questions),
predict (the Table 1 methods: policy, template, rollout settings; graded predictions), judge (LLM judge), react
(the ReAct baseline prompt), report and tables (Table 1, Figure 3, the paper's numbers), stats, fidelity (world model
vs real search, and the run over checkpoints), validate (invariants of the evaluation tables). No Dagster imports."""
