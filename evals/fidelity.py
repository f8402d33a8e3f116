"""World-model fidelity: how close the policy's simulated ``<search_result>`` is to the real one.

For one query we have the text the policy wrote as its own search result (the internal world model,
used in RL stage 1) and the text the real search engine returns for the same query. We measure:

* ``token_f1`` — bag-of-tokens F1 between the two texts, tokens from ``qadata.answers.normalise_answer``
  (the SQuAD/HotpotQA normalisation: lower-case, no punctuation, no articles);
* ``rouge_l`` — ROUGE-L F1 (longest common token subsequence; P = LCS/|simulated|,
  R = LCS/|real|, F = 2PR/(P+R), as the ``rouge-score`` package computes it), same tokens;
* ``sim_has_gold`` / ``real_has_gold`` — the text contains a gold answer (see :func:`contains_answer`);
* ``hallucination`` — the simulated result *states an answer the real one does not support*:
  it contains a gold answer that the real result lacks (``unsupported_gold``), or it contains the
  policy's final answer while the real result does not (``unsupported_prediction``). Either way
  the world model handed the policy an answer the real environment would not have.

Answers that normalise to ``yes``/``no``/``noanswer`` (comparison questions) never count as
contained: those words occur in ordinary prose, so a match would say nothing.

Two sources of simulated results: the searches a policy opens by itself in a simulated-environment
rollout (``simulated_observations``; each checkpoint asks its own queries, and one that never acts
gives none), and *probes* (``probe_simulated_results``): the same held-out queries for every
checkpoint, each written into the policy's context as an action it took, followed by the opened
result block the policy then fills in. Probes make checkpoints comparable query by query.

:func:`fidelity_run` is the whole measurement (the ``world_model_fidelity`` asset calls it): each checkpoint in
turn rolls out the held-out questions in the simulated environment, and every simulated result (its own searches,
then the probes) is compared with the real search engine's result for the same query.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import pandas as pd
import pyarrow as pa

from agent.engine_api import GenRequest
from agent.protocol import ACTION_CLOSE, ACTION_OPEN, OBS_CLOSE, OBS_OPEN
from agent.rollout import Rollout, RolloutConfig, close_simulated_block
from evals.datasets import EvalQuestion
from evals.predict import checkpoint_template
from qadata.answers import normalise_answer, score

_UNCHECKABLE = ("", "yes", "no", "noanswer")
# checkpoints trained with search results in the loss (SFT-3) and the RL ones: they have a world model to probe
FIDELITY_METHODS = ("sft_stage3", "sft123_rl1", "sft123_rl12", "rl_stage2_only", "sft12_rl2")
FIDELITY_SCHEMA = pa.schema(
    [
        ("method", pa.string()),
        ("checkpoint", pa.string()),
        ("source", pa.string()),
        ("question_id", pa.string()),
        ("question", pa.string()),
        ("golden_answers", pa.list_(pa.string())),
        ("prediction", pa.string()),
        ("em", pa.float64()),
        ("query", pa.string()),
        ("simulated", pa.string()),
        ("real", pa.string()),
        ("token_f1", pa.float64()),
        ("rouge_l", pa.float64()),
        ("sim_has_gold", pa.bool_()),
        ("real_has_gold", pa.bool_()),
        ("sim_has_prediction", pa.bool_()),
        ("real_has_prediction", pa.bool_()),
        ("unsupported_gold", pa.bool_()),
        ("unsupported_prediction", pa.bool_()),
        ("hallucination", pa.bool_()),
    ]
)


def tokens(text: str) -> list[str]:
    return normalise_answer(text).split()


def token_f1(candidate: str, reference: str) -> float:
    """Bag-of-tokens F1 (1.0 when both texts are empty, 0.0 when only one is).

    Not ``qadata.answers.f1``: that one zeroes any pair where one side is yes/no, right for short answers
    and wrong for passages.
    """
    cand, ref = tokens(candidate), tokens(reference)
    if not cand or not ref:
        return float(cand == ref)
    same = sum((Counter(cand) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(cand), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of ``candidate`` against ``reference`` (1.0 when both are empty, 0.0 when one is)."""
    cand, ref = tokens(candidate), tokens(reference)
    if not cand or not ref:
        return float(cand == ref)
    lcs = lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains_answer(text: str, answers: Iterable[str | None]) -> bool:
    """Whether the normalised text contains a normalised answer as whole tokens.

    Like cover-EM, but on token boundaries: plain substring matching would find "no" in "north"
    and "1" in "1990". Answers normalising to yes/no/noanswer or to nothing are skipped.
    """
    padded = f" {normalise_answer(text)} "
    for answer in answers:
        if answer is None:
            continue
        norm = normalise_answer(answer)
        if norm not in _UNCHECKABLE and f" {norm} " in padded:
            return True
    return False


@dataclass(frozen=True)
class ObservationFidelity:
    token_f1: float
    rouge_l: float
    sim_has_gold: bool
    real_has_gold: bool
    sim_has_prediction: bool
    real_has_prediction: bool
    unsupported_gold: bool
    unsupported_prediction: bool

    @property
    def hallucination(self) -> bool:
        return self.unsupported_gold or self.unsupported_prediction

    def as_row(self) -> dict:
        return {**asdict(self), "hallucination": self.hallucination}


def compare_observation(
    simulated: str, real: str, golden_answers: Sequence[str], prediction: str | None = None
) -> ObservationFidelity:
    """Fidelity of one simulated search result against the real result for the same query.

    Args:
        golden_answers: the question's gold answers.
        prediction: the policy's final answer for the trajectory (None when it gave none).
    """
    sim_gold, real_gold = contains_answer(simulated, golden_answers), contains_answer(real, golden_answers)
    sim_pred, real_pred = contains_answer(simulated, [prediction]), contains_answer(real, [prediction])
    return ObservationFidelity(
        token_f1=token_f1(simulated, real),
        rouge_l=rouge_l(simulated, real),
        sim_has_gold=sim_gold,
        real_has_gold=real_gold,
        sim_has_prediction=sim_pred,
        real_has_prediction=real_pred,
        unsupported_gold=sim_gold and not real_gold,
        unsupported_prediction=sim_pred and not real_pred,
    )


def simulated_observations(trajectory) -> list[tuple[str, str]]:
    """``(query, simulated result text)`` for each executed action of a simulated-environment
    :class:`agent.rollout.Trajectory`: the pairs to replay against the real search engine."""
    pairs: list[tuple[str, str]] = []
    spans = list(trajectory.spans)
    for i, span in enumerate(spans):
        if span.kind != "action" or span.refused or i + 1 >= len(spans):
            continue
        obs = spans[i + 1]
        if obs.kind == "observation" and obs.simulated:
            pairs.append((span.text, obs.text))
    return pairs


def probe_suffix(query: str) -> str:
    """The text after the prompt for a probe: the action as the policy writes it, then the opened result block
    exactly as the simulated-environment rollout appends it."""
    return f" {ACTION_OPEN} {query} {ACTION_CLOSE}\n{OBS_OPEN}\n"


def probe_simulated_results(
    engine,
    prompts: Sequence[list[int]],
    queries: Sequence[str],
    *,
    max_tokens: int = 128,
    temperature: float = 0.0,
    seed: int | None = 0,
) -> list[str]:
    """The policy's own search result for each given query, in one batched ``generate`` call.

    Each prompt (the policy's template, ``<think>`` prefilled) is followed by :func:`probe_suffix`, and the
    policy writes until ``</search_result>`` (or ``max_tokens``); the text comes back without the closing
    tag, as :class:`agent.rollout.Rollout` stores a simulated observation.
    """
    if len(prompts) != len(queries):
        raise ValueError(f"{len(prompts)} prompts for {len(queries)} queries")
    tok = engine.tokenizer
    reqs = [
        GenRequest(
            list(ids) + tok.encode(probe_suffix(q), add_special_tokens=False),
            max_tokens,
            (OBS_CLOSE,),
            temperature,
            1.0,
            seed,
        )
        for ids, q in zip(prompts, queries)
    ]
    results = engine.generate(reqs) if reqs else []
    if len(results) != len(reqs):
        raise RuntimeError(f"engine returned {len(results)} results for {len(reqs)} probes")
    # the rollout's rule for a block the policy does not close itself (EOS or length): the environment closes it,
    # the EOS is dropped, and only what the policy wrote before it is the simulated result
    eos = set(getattr(engine, "eos_ids", ())) | set(tok.all_special_ids)
    texts = []
    for r in results:
        kept, _, _ = close_simulated_block(r, eos)
        texts.append(tok.decode(kept, skip_special_tokens=False).replace(OBS_CLOSE, "").strip())
    return texts


FIDELITY_COLUMNS = (
    "token_f1",
    "rouge_l",
    "sim_has_gold",
    "real_has_gold",
    "hallucination",
    "unsupported_gold",
    "unsupported_prediction",
)


def aggregate_fidelity(
    rows: Iterable[Mapping | ObservationFidelity], by: str | Sequence[str] = "checkpoint"
) -> pd.DataFrame:
    """Mean of every fidelity measure per group (e.g. per checkpoint), with the number of queries.

    Boolean measures become rates (``hallucination`` -> share of queries whose simulated result
    states an unsupported answer). Rows are :meth:`ObservationFidelity.as_row` dicts plus the
    ``by`` column(s).
    """
    keys = [by] if isinstance(by, str) else list(by)
    records = [r.as_row() if isinstance(r, ObservationFidelity) else dict(r) for r in rows]
    if not records:
        return pd.DataFrame(columns=[*keys, "n_queries", *FIDELITY_COLUMNS])
    df = pd.DataFrame(records)
    missing = set(keys) - set(df.columns)
    if missing:
        raise ValueError(f"fidelity rows lack grouping columns {sorted(missing)}")
    cols = [c for c in FIDELITY_COLUMNS if c in df.columns]
    df[cols] = df[cols].astype(float)
    out = df.groupby(keys, sort=True)[cols].mean()
    out.insert(0, "n_queries", df.groupby(keys, sort=True).size())
    return out.reset_index()


# -- the fidelity run over checkpoints ---------------------------------------------------------------------
def policy_rows(method: str, checkpoint: str, questions: Sequence[EvalQuestion], trajs, search) -> list[dict]:
    """:data:`FIDELITY_SCHEMA` rows for the searches the policy opened itself (source "policy")."""
    pairs = [(q, t, query, sim) for q, t in zip(questions, trajs) for query, sim in simulated_observations(t)]
    real = search([p[2] for p in pairs]) if pairs else []
    rows = []
    for (q, t, query, sim), (real_text, _) in zip(pairs, real):
        f = compare_observation(sim, real_text, q.golden_answers, t.answer)
        rows.append(
            {
                "method": method,
                "checkpoint": checkpoint,
                "source": "policy",
                "question_id": q.question_id,
                "question": q.question,
                "golden_answers": list(q.golden_answers),
                "prediction": t.answer,
                "em": score(t.answer, q.golden_answers).em,
                "query": query,
                "simulated": sim,
                "real": real_text,
                **f.as_row(),
            }
        )
    return rows


def probe_rows(
    method: str, checkpoint: str, questions: Sequence[EvalQuestion], simulated: Sequence[str], search
) -> list[dict]:
    """:data:`FIDELITY_SCHEMA` rows for the probes (source "probe"): the query is the question, no prediction."""
    real = search([q.question for q in questions]) if questions else []
    return [
        {
            "method": method,
            "checkpoint": checkpoint,
            "source": "probe",
            "question_id": q.question_id,
            "question": q.question,
            "golden_answers": list(q.golden_answers),
            "prediction": None,
            "em": None,
            "query": q.question,
            "simulated": sim,
            "real": real_text,
            **compare_observation(sim, real_text, q.golden_answers).as_row(),
        }
        for q, sim, (real_text, _) in zip(questions, simulated, real)
    ]


@dataclass
class FidelityRun:
    """What :func:`fidelity_run` measured: the rows, one summary per checkpoint run, the checkpoints missing."""

    rows: list[dict] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def fidelity_run(
    checkpoints: Mapping[str, str | None],
    questions: Sequence[EvalQuestion],
    *,
    load_policy: Callable[[str], object],
    search,
    config: RolloutConfig,
    probe: bool = True,
    on_run: Callable[[dict], None] | None = None,
) -> FidelityRun:
    """World-model fidelity of each checkpoint (``{method: directory}``, None = not materialised) on ``questions``.

    Each checkpoint, loaded by ``load_policy(directory)``, rolls out every question in the simulated environment
    (``config.simulated``) with its evaluation prompt (:func:`evals.predict.checkpoint_template`); the searches it
    opens, and with ``probe`` the questions as probes, are compared with ``search`` (the real engine).
    ``on_run`` receives each checkpoint's summary as soon as it is done.
    """
    if not config.simulated:
        raise ValueError("the fidelity run rolls out in the simulated environment: config.simulated must be True")
    out = FidelityRun()
    for method, ckpt in checkpoints.items():
        if ckpt is None:
            out.missing.append(f"{method}_checkpoint")
            continue
        engine = load_policy(ckpt)
        template = checkpoint_template(ckpt)
        rollout = Rollout(engine, None, config)
        prompts = [template.prompt_ids(rollout.tokenizer, q.question) for q in questions]
        trajs = rollout.run([(q.key, ids) for q, ids in zip(questions, prompts)])
        new = policy_rows(method, ckpt, questions, trajs, search)
        probes = []
        if probe:
            sims = probe_simulated_results(
                engine,
                prompts,
                [q.question for q in questions],
                max_tokens=config.max_turn_tokens,
                temperature=config.temperature,
                seed=config.seed,
            )
            probes = probe_rows(method, ckpt, questions, sims, search)
        run = {
            "method": method,
            "trajectories": len(trajs),
            "simulated_searches": len(new),
            "probes": len(probes),
            "em_simulated_env": round(
                sum(score(t.answer, q.golden_answers).em for q, t in zip(questions, trajs)) / max(1, len(trajs)), 3
            ),
        }
        out.runs.append(run)
        out.rows += new + probes
        if on_run is not None:
            on_run(run)
    return out
