"""Versioned prompt templates for CoT (no tools) and CoA (search allowed) trajectories.

A template's id is stored with every trajectory, so a change of wording is a new id, never an edit.
Templates differ per model family: the embedded SmolLM2-135M follows the tag protocol only when
shown worked examples (measured: 0/32 samples reached ``</end_search>`` with a plain chat prompt,
32/32 with a few-shot prompt), while DeepSeek-R1-Distill models take one instruction and must have
``<think>\\n`` prefilled (otherwise they are known to emit only ``</think>``).
"""

from __future__ import annotations

from dataclasses import dataclass

COA_INSTRUCTIONS = (
    "You are a reasoning assistant with a search tool. Think inside <think> </think>. When you are "
    "missing a fact, search for it by writing <begin_search> your query </end_search>; the results "
    "then appear inside <search_result> </search_result>. You may search several times. After "
    "</think>, give the final answer as \\boxed{answer}."
)
COT_INSTRUCTIONS = (
    "You are a reasoning assistant. Think step by step inside <think> </think>, then give the final "
    "answer as \\boxed{answer}."
)

# Worked examples about invented facts, written in the protocol; they share no entity with the
# generated world or HotpotQA, so they leak no answer.
_COA_SHOTS = [
    (
        "In which country was the founder of the Marlow Clockworks born?",
        "<think>I need the founder of the Marlow Clockworks. <begin_search> Marlow Clockworks founder </end_search>\n"
        '<search_result>\nresult 1: "Marlow Clockworks"\nThe Marlow Clockworks was founded in 1871 by Edda Thorne.\n'
        "</search_result>\nThe founder is Edda Thorne. Now I need where she was born. "
        '<begin_search> Edda Thorne birthplace </end_search>\n<search_result>\nresult 1: "Edda Thorne"\n'
        "Edda Thorne (born 1840) was a clockmaker born in Valdren, a town in Norsland.\n</search_result>\n"
        "Valdren is in Norsland.</think>\n\nThe answer is \\boxed{Norsland}.",
    ),
    (
        "Which is older, the Kessit Bridge or the Omara Tower?",
        "<think>I need both construction dates. <begin_search> Kessit Bridge built </end_search>\n"
        '<search_result>\nresult 1: "Kessit Bridge"\nThe Kessit Bridge was completed in 1902.\n</search_result>\n'
        '<begin_search> Omara Tower built </end_search>\n<search_result>\nresult 1: "Omara Tower"\n'
        "The Omara Tower was built in 1787.\n</search_result>\n1787 is earlier than 1902.</think>\n\n"
        "The answer is \\boxed{Omara Tower}.",
    ),
]
_COT_SHOTS = [
    (
        "What is the capital of the country whose largest city is Lyon-sur-Mer, if that country is Brivia "
        "and Brivia's capital is Tessan?",
        "<think>The question says the country is Brivia and its capital is Tessan.</think>\n\n"
        "The answer is \\boxed{Tessan}.",
    ),
]


@dataclass(frozen=True)
class PromptTemplate:
    id: str
    mode: str  # "cot" | "coa"
    family: str  # "smollm2" (few-shot chat) | "r1" (instruction, <think> prefilled)
    instructions: str
    shots: tuple[tuple[str, str], ...] = ()
    prefill: str = "<think>"

    def messages(self, question: str) -> list[dict]:
        if self.family == "r1":
            return [{"role": "user", "content": f"{self.instructions}\n\nQuestion: {question}"}]
        msgs = [{"role": "system", "content": self.instructions}]
        for q, a in self.shots:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return msgs + [{"role": "user", "content": question}]

    def render(self, tokenizer, question: str) -> str:
        """The prompt text: chat template with the generation prompt, plus the prefilled ``<think>``.

        The prefill is added only when the rendered template does not already end with it: the
        DeepSeek-R1-Distill chat templates published since February 2025 end the generation prompt with
        ``<think>\\n`` themselves, and a second one would open the reasoning twice.
        """
        chat = tokenizer.apply_chat_template(self.messages(question), add_generation_prompt=True, tokenize=False)
        return chat + prefill_needed(chat, self.prefill)

    def prompt_ids(self, tokenizer, question: str) -> list[int]:
        return tokenizer.encode(self.render(tokenizer, question), add_special_tokens=False)


def prefill_needed(chat: str, prefill: str) -> str:
    """What to append to a rendered chat prompt so it ends with ``prefill``: nothing when the template already
    opened it (trailing whitespace aside), else the prefill (or the part of it the template has not written)."""
    if not prefill:
        return ""
    if chat.endswith(prefill):
        return ""
    if chat.rstrip().endswith(prefill.strip()):
        # the template opened the tag; add only the whitespace the prefill has and the template lacks
        return prefill[len(prefill.rstrip()) :] if chat == chat.rstrip() else ""
    return prefill


@dataclass(frozen=True)
class InlineShotsTemplate(PromptTemplate):
    """Worked examples inline in the single user message (for R1-distilled models, whose chat templates strip
    ``<think>`` content from earlier assistant turns, so examples as chat turns would lose their reasoning)."""

    def messages(self, question: str) -> list[dict]:
        examples = "\n\n".join(f"Question: {q}\n{a}" for q, a in self.shots)
        content = f"{self.instructions}\n\nExamples:\n\n{examples}\n\nNow the real question.\n\nQuestion: {question}"
        return [{"role": "user", "content": content}]


TEMPLATES: dict[str, PromptTemplate] = {
    t.id: t
    for t in [
        PromptTemplate("coa-smollm2-fewshot-v1", "coa", "smollm2", COA_INSTRUCTIONS, tuple(_COA_SHOTS)),
        PromptTemplate("cot-smollm2-fewshot-v1", "cot", "smollm2", COT_INSTRUCTIONS, tuple(_COT_SHOTS)),
        # the plain agent instruction, no worked examples: what a trained agent model is prompted with
        PromptTemplate("coa-smollm2-v1", "coa", "smollm2", COA_INSTRUCTIONS),
        PromptTemplate("cot-smollm2-v1", "cot", "smollm2", COT_INSTRUCTIONS),
        PromptTemplate("coa-r1-v1", "coa", "r1", COA_INSTRUCTIONS, prefill="<think>\n"),
        PromptTemplate("cot-r1-v1", "cot", "r1", COT_INSTRUCTIONS, prefill="<think>\n"),
        # in-context learning for RL from the untrained model (the paper's RL-stage2-only baseline)
        InlineShotsTemplate("coa-r1-fewshot-v1", "coa", "r1", COA_INSTRUCTIONS, tuple(_COA_SHOTS), prefill="<think>\n"),
    ]
}


def family_of(model_name: str) -> str:
    """The template family of a model: R1-distilled models get ``r1``, the embedded SmolLM2 ``smollm2``."""
    return "r1" if "r1" in model_name.lower() else "smollm2"


def template_for(mode: str, model_name: str, *, zero_shot: bool = False) -> PromptTemplate:
    """The default template of a mode for a model.

    The untrained embedded SmolLM2 follows the tag protocol only when shown worked examples, so its default is
    few-shot; ``zero_shot`` asks for the plain instruction (trained agent models, the expert teacher's
    demonstrations, which the student is trained on). R1-distilled models always get the plain instruction.
    """
    family = family_of(model_name)
    # the expert demonstrator's trajectories are what the student is trained on: they carry the plain instruction
    zero_shot = zero_shot or model_name.startswith("expert")
    if family == "r1" or zero_shot:
        return TEMPLATES[f"{mode}-{family}-v1"]
    return TEMPLATES[f"{mode}-{family}-fewshot-v1"]


def agent_template(model_name: str) -> PromptTemplate:
    """The prompt a trained agent model is evaluated with: the plain CoA instruction, no worked examples
    (the paper's claim is that acting is internal to the model, not prompted)."""
    return template_for("coa", model_name, zero_shot=True)
