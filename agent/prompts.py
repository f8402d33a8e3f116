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
    ("In which country was the founder of the Marlow Clockworks born?",
     "<think>I need the founder of the Marlow Clockworks. <begin_search> Marlow Clockworks founder </end_search>\n"
     "<search_result>\nresult 1: \"Marlow Clockworks\"\nThe Marlow Clockworks was founded in 1871 by Edda Thorne.\n"
     "</search_result>\nThe founder is Edda Thorne. Now I need where she was born. "
     "<begin_search> Edda Thorne birthplace </end_search>\n<search_result>\nresult 1: \"Edda Thorne\"\n"
     "Edda Thorne (born 1840) was a clockmaker born in Valdren, a town in Norsland.\n</search_result>\n"
     "Valdren is in Norsland.</think>\n\nThe answer is \\boxed{Norsland}."),
    ("Which is older, the Kessit Bridge or the Omara Tower?",
     "<think>I need both construction dates. <begin_search> Kessit Bridge built </end_search>\n"
     "<search_result>\nresult 1: \"Kessit Bridge\"\nThe Kessit Bridge was completed in 1902.\n</search_result>\n"
     "<begin_search> Omara Tower built </end_search>\n<search_result>\nresult 1: \"Omara Tower\"\n"
     "The Omara Tower was built in 1787.\n</search_result>\n1787 is earlier than 1902.</think>\n\n"
     "The answer is \\boxed{Omara Tower}."),
]
_COT_SHOTS = [
    ("What is the capital of the country whose largest city is Lyon-sur-Mer, if that country is Brivia "
     "and Brivia's capital is Tessan?",
     "<think>The question says the country is Brivia and its capital is Tessan.</think>\n\n"
     "The answer is \\boxed{Tessan}."),
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
        """The prompt text: chat template with the generation prompt, plus the prefilled ``<think>``."""
        chat = tokenizer.apply_chat_template(self.messages(question), add_generation_prompt=True, tokenize=False)
        return chat + self.prefill

    def prompt_ids(self, tokenizer, question: str) -> list[int]:
        return tokenizer.encode(self.render(tokenizer, question), add_special_tokens=False)


TEMPLATES: dict[str, PromptTemplate] = {t.id: t for t in [
    PromptTemplate("coa-smollm2-fewshot-v1", "coa", "smollm2", COA_INSTRUCTIONS, tuple(_COA_SHOTS)),
    PromptTemplate("cot-smollm2-fewshot-v1", "cot", "smollm2", COT_INSTRUCTIONS, tuple(_COT_SHOTS)),
    PromptTemplate("coa-r1-v1", "coa", "r1", COA_INSTRUCTIONS, prefill="<think>\n"),
    PromptTemplate("cot-r1-v1", "cot", "r1", COT_INSTRUCTIONS, prefill="<think>\n"),
]}


def template_for(mode: str, model_name: str) -> PromptTemplate:
    """The default template of a mode for a model: R1-distilled models get the ``r1`` family."""
    family = "r1" if "r1" in model_name.lower() else "smollm2"
    return TEMPLATES[f"{mode}-{family}-{'v1' if family == 'r1' else 'fewshot-v1'}"]
