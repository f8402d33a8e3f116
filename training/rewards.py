"""The RL reward: exact match of the boxed answer plus format penalties, kept apart so each is logged.

``total = em_weight * EM + missing_think + unbalanced + no_answer + over_budget`` where EM is the
HotpotQA exact match (:func:`qadata.answers.score`, best over the gold answers) of the last
``\\boxed{...}`` after the last ``</think>`` (:func:`qadata.answers.extract_boxed`, the same answer the
evaluation grades), and each penalty is ``-magnitude`` when its rule is broken, else 0:

- ``missing_think``: the reasoning block is not both opened and closed. The CoA prompt *prefills*
  ``<think>`` (``PromptTemplate.prefill``), so the completion alone never contains the opening tag:
  the opening is judged on prompt + completion (``think_open``: the prompt leaves a ``<think>``
  open), the closing on the completion. A ``</think>`` the rollout forced in (action budget spent)
  counts as closed; that case is penalised by ``over_budget`` instead.
- ``unbalanced``: action / observation tags nest, stay open, close without opening, or appear after
  ``</think>``, and ``<think>`` opens twice (:func:`agent.protocol.parse` issues). A stray
  ``</think>`` with no ``<think>`` anywhere is ``missing_think`` only, not both.
- ``no_answer``: no complete ``\\boxed{...}`` (or an empty one) in the answer position.
- ``over_budget``: the policy asked for an action over its budget T (the rollout refused it with
  ``agent.rollout.SEARCH_LIMIT`` and forced an answer).

Default magnitudes are 0.2 each: all four together (0.8) stay below one exact match, so a correct
answer always outranks a wrong one whatever its format, and within a GRPO group correctness
dominates the advantage while a clean format still breaks ties.

:func:`trl_reward_funcs` gives one TRL reward function per component (signed, already scaled, so
``reward_weights`` are all 1 and TRL's ``reward`` is the total): TRL logs ``rewards/<component>/mean``
for each. They read ``gold_answers`` and, when the AutoCoA rollout (``training.grpo``) produced the
completion, its exact text and trajectory statistics from ``kwargs``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from agent.protocol import THINK_CLOSE, THINK_OPEN, parse
from agent.rollout import SEARCH_LIMIT
from qadata.answers import extract_boxed, score

COMPONENTS = ("em", "missing_think", "unbalanced", "no_answer", "over_budget")
_TAG_ISSUES = ("nested", "unclosed", "stray")


@dataclass(frozen=True)
class RewardSettings:
    """Weight of exact match and the magnitude (>= 0, subtracted) of each format penalty."""

    em_weight: float = 1.0
    missing_think: float = 0.2
    unbalanced: float = 0.2
    no_answer: float = 0.2
    over_budget: float = 0.2

    def __post_init__(self) -> None:
        for name in COMPONENTS[1:]:
            if getattr(self, name) < 0:
                raise ValueError(
                    f"RewardSettings.{name} is a penalty magnitude and must be >= 0, got {getattr(self, name)}"
                )


@dataclass(frozen=True)
class RewardBreakdown:
    em: float  # 0/1 exact match (unweighted)
    missing_think: float  # signed contributions: 0 or -magnitude
    unbalanced: float
    no_answer: float
    over_budget: float
    total: float
    answer: str | None = None

    def component(self, name: str, settings: RewardSettings) -> float:
        """The signed contribution of one component to ``total`` (EM weighted)."""
        return self.em * settings.em_weight if name == "em" else getattr(self, name)

    def as_dict(self) -> dict:
        return asdict(self)


def think_left_open(prompt: str) -> bool:
    """Whether the prompt ends inside a reasoning block (the template prefilled ``<think>``).

    Few-shot prompts contain whole ``<think> ... </think>`` examples, so the last tag decides.
    """
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


def score_completion(
    completion: str,
    gold_answers: Sequence[str],
    *,
    think_open: bool,
    refused_actions: int | None = None,
    settings: RewardSettings = RewardSettings(),
) -> RewardBreakdown:
    """Score one completion (the text after the prompt, special tokens kept).

    ``refused_actions`` comes from the trajectory; when unknown it is counted from the
    environment's refusal notices in the text (exact for completions of :class:`agent.rollout.Rollout`).
    """
    parsed = parse(completion, think_open=think_open)
    opened = think_open or THINK_OPEN in completion
    missing_think = not (opened and parsed.think_closed)
    tag_issues = [
        i for i in parsed.issues if i.startswith(_TAG_ISSUES) or "inside unclosed" in i or "outside <think>" in i
    ]
    if not opened:  # a lone </think> is the missing opening, already penalised above
        tag_issues = [i for i in tag_issues if not i.startswith(f"stray {THINK_CLOSE}")]
    unbalanced = bool(tag_issues) or not all(s.closed for s in parsed.steps)
    answer = extract_boxed(completion)
    no_answer = answer is None or not answer.strip()
    em = 0.0 if no_answer else score(answer, list(gold_answers)).em
    if refused_actions is None:
        refused_actions = completion.count(SEARCH_LIMIT)
    parts = dict(
        missing_think=-settings.missing_think * missing_think,
        unbalanced=-settings.unbalanced * unbalanced,
        no_answer=-settings.no_answer * no_answer,
        over_budget=-settings.over_budget * (refused_actions > 0),
    )
    parts = {k: v + 0.0 for k, v in parts.items()}  # -0.0 -> 0.0 in logs
    return RewardBreakdown(em=em, **parts, total=em * settings.em_weight + sum(parts.values()), answer=answer)


def _text(completion) -> str:
    """A TRL completion: a string, or a conversational list of messages (the assistant content)."""
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] for m in completion if isinstance(m, dict) and isinstance(m.get("content"), str))


def breakdowns(
    prompts: Sequence, completions: Sequence, settings: RewardSettings = RewardSettings(), **kwargs
) -> list[RewardBreakdown]:
    """Score a TRL batch. ``kwargs`` must carry ``gold_answers`` (one list per completion: a dataset
    column); the AutoCoA rollout also adds ``completion_text`` (exact, special tokens kept, where
    TRL's ``completions`` are decoded without them), ``think_open`` and ``refused_actions``."""
    golds = kwargs.get("gold_answers")
    if golds is None:
        raise KeyError(
            "reward functions need `gold_answers` for every completion (a dataset column, as "
            "training.grpo.train_grpo builds it, or a rollout_func extra field)"
        )
    if len(golds) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(golds)} gold_answers entries")
    texts = kwargs.get("completion_text") or [_text(c) for c in completions]
    opens = kwargs.get("think_open") or [think_left_open(_text(p)) for p in prompts]
    refused = kwargs.get("refused_actions") or [None] * len(completions)
    return [
        score_completion(t, [g] if isinstance(g, str) else g, think_open=bool(o), refused_actions=r, settings=settings)
        for t, g, o, r in zip(texts, golds, opens, refused, strict=True)
    ]


def trl_reward_funcs(settings: RewardSettings = RewardSettings()) -> list[Callable[..., list[float]]]:
    """One TRL reward function per component, named after it (TRL logs ``rewards/<name>/mean``); use
    with :func:`trl_reward_weights`. Each returns the signed, scaled contribution, so they sum to the total."""

    def make(name: str) -> Callable[..., list[float]]:
        def reward(prompts, completions, **kwargs) -> list[float]:
            return [b.component(name, settings) for b in breakdowns(prompts, completions, settings, **kwargs)]

        reward.__name__ = reward.__qualname__ = name
        return reward

    return [make(name) for name in COMPONENTS]


def trl_reward_weights() -> list[float]:
    """``GRPOConfig.reward_weights`` for :func:`trl_reward_funcs` (the scaling is inside the functions)."""
    return [1.0] * len(COMPONENTS)
