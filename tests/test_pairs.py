"""Contrastive pair mining with a scripted policy (a unit-test fake) over the real SmolLM2 tokenizer."""

from agent.engine_api import cut_at_stop
from agent.rollout import RolloutConfig
from training.pairs import cot_juncture, first_action_juncture, first_sentence_juncture, mine_pairs

PROMPT = "<|im_start|>user\nIn which country is Valdren?<|im_end|>\n<|im_start|>assistant\n<think>"


class Scripted:
    """Searches when an action was opened, answers Norsland after a result or when told to reason alone."""

    name = "scripted"

    def __init__(self, tokenizer, correct=True, searches_anyway=False):
        self.tokenizer, self.correct, self.searches_anyway = tokenizer, correct, searches_anyway

    def generate(self, requests):
        out = []
        for r in requests:
            so_far = self.tokenizer.decode(r.prompt_ids)
            answer = "Norsland" if self.correct else "Brivia"
            if so_far.rstrip().endswith("<begin_search>"):
                text = " Valdren country </end_search>"
            elif so_far.endswith("\\boxed{"):
                text = f"{answer}}}"
            elif self.searches_anyway and "<search_result>" not in so_far:
                text = " Let me check. <begin_search> Valdren </end_search>"
            else:
                text = f" So it is {answer}.</think>\n\n\\boxed{{{answer}}}"
            ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
            out.append(cut_at_stop(ids, self.tokenizer.decode, r.stop, {self.tokenizer.eos_token_id}, r.max_new_tokens))
        return out


def _row(tok, kind, completion, em):
    prompt = tok.encode(PROMPT, add_special_tokens=False)
    comp = tok.encode(completion, add_special_tokens=False)
    spans = []
    if "<begin_search>" in completion:
        at = completion.index("<begin_search>")
        # the token covering the tag's first character, as the rollout records action spans
        start = next(n for n in range(len(comp)) if len(tok.decode(comp[: n + 1])) > at)
        spans = [{"kind": "action", "start": len(prompt) + start, "end": len(prompt) + start + 5}]
    mask = [0] * len(prompt) + [1] * len(comp)
    if "<search_result>" in completion:  # the environment's tokens: an observation span, policy_mask 0
        at = completion.index("<search_result>")
        a = next(n for n in range(len(comp)) if len(tok.decode(comp[: n + 1])) > at)
        b = next(n for n in range(len(comp)) if "</search_result>" in tok.decode(comp[: n + 1])) + 1
        spans.append({"kind": "observation", "start": len(prompt) + a, "end": len(prompt) + b})
        mask[len(prompt) + a : len(prompt) + b] = [0] * (b - a)
    return {
        "trajectory_id": f"r/{kind}/q1/0",
        "question_id": "q1",
        "question": "In which country is Valdren?",
        "gold_answers": ["Norsland"],
        "token_ids": prompt + comp,
        "policy_mask": mask,
        "prompt_tokens": len(prompt),
        "em": em,
        "spans": spans,
    }


def _search(queries):
    return [('result 1: "Valdren"\nValdren is a town in Norsland.', ["p2"]) for _ in queries]


def test_junctures(embedded_tokenizer):
    tok = embedded_tokenizer
    cot = _row(tok, "cot", " Valdren is a town. It is in Brivia.</think>\n\n\\boxed{Brivia}", 0.0)
    j = first_sentence_juncture(cot, tok.decode)
    assert tok.decode(cot["token_ids"][cot["prompt_tokens"] : cot["prompt_tokens"] + j]) == " Valdren is a town."
    coa = _row(tok, "coa", " I need it. <begin_search> Valdren </end_search>", 0.0)
    j = first_action_juncture(coa)
    assert tok.decode(coa["token_ids"][coa["prompt_tokens"] : coa["prompt_tokens"] + j]).strip() == "I need it."
    one = _row(tok, "cot", " no sentence end</think>", 0.0)
    j = first_sentence_juncture(one, tok.decode)  # one sentence: the juncture is the end of the reasoning
    assert tok.decode(one["token_ids"][one["prompt_tokens"] : one["prompt_tokens"] + j]) == " no sentence end"
    assert first_sentence_juncture(_row(tok, "cot", "</think> \\boxed{x}", 0.0), tok.decode) is None
    # an empty reasoning still has a juncture: the start of the reasoning (empty shared prefix)
    assert cot_juncture(_row(tok, "cot", "</think> \\boxed{x}", 0.0), tok.decode) == (0, "reasoning-start")
    assert cot_juncture(cot, tok.decode)[1] == "first-sentence"


def test_mining_builds_both_kinds_and_accounts_for_every_wrong_row(embedded_tokenizer):
    tok = embedded_tokenizer
    cot_wrong = _row(tok, "cot", " Valdren is a town. It is in Brivia.</think>\n\n\\boxed{Brivia}", 0.0)
    cot_right = _row(tok, "cot", " Valdren is in Norsland.</think>\n\n\\boxed{Norsland}", 1.0)
    coa_wrong = _row(
        tok,
        "coa",
        " I need it. <begin_search> Valdren </end_search>\n<search_result>x</search_result>"
        " It is Brivia.</think>\n\n\\boxed{Brivia}",
        0.0,
    )
    coa_no_action = _row(tok, "coa", " It is Brivia.</think>\n\n\\boxed{Brivia}", 0.0)
    prompt_ids = lambda q: tok.encode(PROMPT, add_special_tokens=False)  # noqa: E731
    cfg = RolloutConfig(max_actions=2, max_context=400, max_turn_tokens=40, answer_tokens=8)
    pairs, discarded = mine_pairs(
        [cot_wrong, cot_right],
        [coa_wrong, coa_no_action],
        engine=Scripted(tok),
        search=_search,
        coa_prompt_ids=prompt_ids,
        config=cfg,
        attempts=2,
    )
    assert len(pairs) + len(discarded) == 3  # the three wrong rows
    a = next(p for p in pairs if p.kind == "a")
    b = next(p for p in pairs if p.kind == "b")
    assert a.chosen_has_action and not a.rejected_has_action and a.chosen_correct and not a.rejected_correct
    assert b.rejected_has_action and not b.chosen_has_action and b.chosen_correct and not b.rejected_correct
    assert tok.decode(a.prefix_ids) == " Valdren is a town." and a.juncture_rule == "first-sentence"
    assert tok.decode(b.prefix_ids).strip() == "I need it." and b.juncture_rule == "first-action"
    # token-level: the shared prefix is the trajectory's own ids, and the chosen observation is recorded
    assert cot_wrong["token_ids"][cot_wrong["prompt_tokens"] :][: len(a.prefix_ids)] == a.prefix_ids
    ((s, e),) = a.chosen_observation_spans
    assert "Norsland" in tok.decode(a.chosen_ids[s:e])
    # loss masks: the search result is out, the inserted action and the policy's text are in
    assert a.chosen_mask[s:e] == [0] * (e - s) and a.chosen_mask[:s] == [1] * s and all(a.chosen_mask[e:])
    ((rs, re_),) = b.rejected_observation_spans
    assert b.rejected_mask == coa_wrong["policy_mask"][coa_wrong["prompt_tokens"] + len(b.prefix_ids) :]
    assert b.rejected_mask[rs:re_] == [0] * (re_ - rs) and "<search_result>" in tok.decode(b.rejected_ids[rs:re_])
    assert all(a.rejected_mask) and len(a.rejected_mask) == len(a.rejected_ids)
    assert [d.reason for d in discarded] == ["wrong CoA took no action: nothing to remove"]


def test_no_correct_continuation_is_discarded_with_a_reason(embedded_tokenizer):
    tok = embedded_tokenizer
    cot_wrong = _row(tok, "cot", " Valdren is a town. It is in Brivia.</think>\n\n\\boxed{Brivia}", 0.0)
    pairs, discarded = mine_pairs(
        [cot_wrong],
        [],
        engine=Scripted(tok, correct=False),
        search=_search,
        coa_prompt_ids=lambda q: tok.encode(PROMPT, add_special_tokens=False),
        config=RolloutConfig(max_context=400, max_turn_tokens=40, answer_tokens=8),
        attempts=3,
    )
    assert pairs == [] and discarded[0].reason == "no correct action continuation in 3 attempts"


def test_cap_discards_the_rest_with_a_reason(embedded_tokenizer):
    tok = embedded_tokenizer
    rows = []
    for i in range(3):
        r = _row(tok, "cot", " Valdren is a town. It is in Brivia.</think>\n\n\\boxed{Brivia}", 0.0)
        rows.append({**r, "question_id": f"q{i}", "trajectory_id": f"r/cot/q{i}/0"})
    pairs, discarded = mine_pairs(
        rows,
        [],
        engine=Scripted(tok),
        search=_search,
        coa_prompt_ids=lambda q: tok.encode(PROMPT, add_special_tokens=False),
        config=RolloutConfig(max_context=400, max_turn_tokens=40, answer_tokens=8),
        attempts=1,
        max_per_kind=1,
    )
    assert [p.question_id for p in pairs] == ["q0"]
    assert sorted((d.question_id, d.reason) for d in discarded) == [
        ("q1", "not mined: over max_per_kind=1"),
        ("q2", "not mined: over max_per_kind=1"),
    ]


def test_no_action_branch_cuts_an_action_and_forces_the_answer(embedded_tokenizer):
    tok = embedded_tokenizer
    coa_wrong = _row(
        tok,
        "coa",
        " I need it. <begin_search> Valdren </end_search>\n<search_result>x</search_result>"
        " It is Brivia.</think>\n\n\\boxed{Brivia}",
        0.0,
    )
    pairs, discarded = mine_pairs(
        [],
        [coa_wrong],
        engine=Scripted(tok, searches_anyway=True),
        search=_search,
        coa_prompt_ids=lambda q: tok.encode(PROMPT, add_special_tokens=False),
        config=RolloutConfig(max_context=400, max_turn_tokens=40, answer_tokens=8),
        attempts=1,
    )
    (b,) = pairs
    chosen = tok.decode(b.chosen_ids)
    # the policy opened an action with the tool off: it was cut where it began and the answer forced
    assert "<begin_search>" not in chosen and chosen.startswith(" Let me check.")
    assert b.chosen_answer == "Norsland" and not b.chosen_has_action and b.rejected_has_action
    # the forced answer prompt is the environment's: out of the loss mask; the policy's answer after it is in
    forced = tok.encode("\n</think>\n\nThe final answer is \\boxed{", add_special_tokens=False)
    at = next(i for i in range(len(b.chosen_ids)) if b.chosen_ids[i : i + len(forced)] == forced)
    assert b.chosen_mask[at : at + len(forced)] == [0] * len(forced)
    assert all(b.chosen_mask[:at]) and all(b.chosen_mask[at + len(forced) :])
