"""The ReAct baseline (Yao et al. 2022) as the paper runs it: the untrained base model, *prompted*
to alternate Thought / Action / Observation, over the same rollout loop and search engine.

ReAct here is only a prompt: :class:`ReActTemplate` is an :class:`agent.prompts.PromptTemplate`, so
``agent.synthesis.synthesize`` and :class:`agent.rollout.Rollout` run it unchanged. Its worked
examples write each Action in our tag protocol (``<begin_search> q </end_search>``) and show each
Observation exactly as the rollout inserts it (``render_observation``), so the stop string,
the query parser and the answer extraction are the ones every other method uses. Only the prompt
differs between ReAct and the trained agent models, which is the comparison Table 1 makes.

A template's id is stored with every trajectory: a change of wording is a new id, never an edit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from agent.prompts import PromptTemplate
from agent.rollout import RolloutConfig, render_observation

REACT_INSTRUCTIONS = (
    "Solve the question by interleaving Thought, Action and Observation steps.\n"
    "- Thought: reason about what you know and what is still missing.\n"
    "- Action: either search, written exactly as <begin_search> your query </end_search>, or finish.\n"
    "- Observation: the search results, which then appear inside <search_result> </search_result>.\n"
    "Repeat until you can answer. To finish, close your reasoning with </think> and give the final "
    "answer as \\boxed{answer}."
)


def _result(title: str, text: str) -> str:
    # the environment's rendering: retrieval.render.render_results, then rollout.render_observation
    return render_observation(f'result 1: "{title}"\n{text}')


# Worked examples about invented facts (no entity of the generated world or of any benchmark), so
# they leak no answer. Observations are byte-identical to what the rollout appends.
_REACT_SHOTS = (
    (
        'Which river flows through the birthplace of the painter of "Harbour at Dusk"?',
        '<think>Thought 1: I need the painter of "Harbour at Dusk", then their birthplace, then its river.\n'
        "Action 1: <begin_search> Harbour at Dusk painter </end_search>"
        + _result("Harbour at Dusk", "Harbour at Dusk is an 1884 oil painting by Mirela Osk.")
        + "Thought 2: The painter is Mirela Osk. Now I need her birthplace.\n"
        "Action 2: <begin_search> Mirela Osk birthplace </end_search>"
        + _result("Mirela Osk", "Mirela Osk (1851-1920) was a painter born in Tarnow-on-Vell.")
        + "Thought 3: She was born in Tarnow-on-Vell. Now I need the river through it.\n"
        "Action 3: <begin_search> Tarnow-on-Vell river </end_search>"
        + _result("Tarnow-on-Vell", "Tarnow-on-Vell is a market town on the river Vell.")
        + "Thought 4: The river Vell flows through Tarnow-on-Vell. I can answer.\n"
        "Action 4: finish</think>\n\nThe answer is \\boxed{Vell}.",
    ),
    (
        "Were the Brannock Lighthouse and the Corvel Mill built in the same century?",
        "<think>Thought 1: I need the construction dates of both.\n"
        "Action 1: <begin_search> Brannock Lighthouse built </end_search>"
        + _result("Brannock Lighthouse", "The Brannock Lighthouse was first lit in 1823.")
        + "Thought 2: The lighthouse is from 1823, the 19th century. Now the mill.\n"
        "Action 2: <begin_search> Corvel Mill built </end_search>"
        + _result("Corvel Mill", "Corvel Mill is a watermill built in 1768.")
        + "Thought 3: 1768 is the 18th century and 1823 the 19th, so not the same century.\n"
        "Action 3: finish</think>\n\nThe answer is \\boxed{no}.",
    ),
)


@dataclass(frozen=True)
class ReActTemplate(PromptTemplate):
    """A :class:`PromptTemplate` whose R1 form keeps its worked examples.

    The base class drops shots for the ``r1`` family, and DeepSeek-R1-Distill chat templates strip
    ``<think>`` content from earlier assistant turns, so for ``r1`` the examples go inline in the
    single user message, as in the original ReAct prompt. Other families get them as chat turns.
    """

    def messages(self, question: str) -> list[dict]:
        if self.family not in ("r1", "base"):
            return super().messages(question)
        return [{"role": "user", "content": self._inline(question)}]

    def _inline(self, question: str) -> str:
        examples = "\n\n".join(f"Question: {q}\n{a}" for q, a in self.shots)
        return f"{self.instructions}\n\nExamples:\n\n{examples}\n\nNow the real question.\n\nQuestion: {question}"

    def render(self, tokenizer, question: str) -> str:
        """A ``base`` model has no chat format: the prompt is plain text (instructions, worked examples, the
        question), continued after the prefill, as the original ReAct prompts a pretrained model."""
        if self.family == "base":
            return f"{self._inline(question)}\n{self.prefill}"
        return super().render(tokenizer, question)


# mode "coa": ReAct searches, so it runs wherever a tool-using template is accepted.
REACT_TEMPLATES: dict[str, ReActTemplate] = {
    t.id: t
    for t in [
        ReActTemplate("react-r1-v1", "coa", "r1", REACT_INSTRUCTIONS, _REACT_SHOTS, prefill="<think>\n"),
        ReActTemplate("react-smollm2-fewshot-v1", "coa", "smollm2", REACT_INSTRUCTIONS, _REACT_SHOTS),
        # a pretrained (base) model, e.g. the paper's Qwen-7B-Base: plain-text prompt, no chat template
        ReActTemplate("react-base-v1", "coa", "base", REACT_INSTRUCTIONS, _REACT_SHOTS),
    ]
}


def is_base_model(model_name: str) -> bool:
    """A pretrained model without instruction tuning (by its hub name: ``-Base`` or a Qwen id without a suffix)."""
    name = model_name.rsplit("/", 1)[-1].lower()
    if name.endswith("-base") or "-base-" in name:
        return True
    return name.startswith("qwen") and not any(k in name for k in ("instruct", "chat", "r1", "distill", "math"))


def react_template_for(model_name: str) -> ReActTemplate:
    """The ReAct template for a model: R1-distilled models get the ``r1`` form (``<think>\\n`` prefilled), a
    base model the plain-text form, the embedded SmolLM2 its chat form with the examples as turns."""
    if "r1" in model_name.lower():
        return REACT_TEMPLATES["react-r1-v1"]
    if is_base_model(model_name):
        return REACT_TEMPLATES["react-base-v1"]
    return REACT_TEMPLATES["react-smollm2-fewshot-v1"]


def react_rollout_config(config: RolloutConfig | None = None) -> RolloutConfig:
    """ReAct always acts in the real environment: the base model has no trained world model to simulate."""
    return replace(config or RolloutConfig(), tools=True, simulated=False)
