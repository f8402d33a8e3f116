"""The rollout loop with a scripted policy (a unit-test fake) over the real SmolLM2 tokenizer, and the
real transformers engine on the real embedded model."""

import time

import pytest

from agent.engine_api import GenRequest, GenResult, cut_at_stop
from agent.protocol import parse
from agent.rollout import SEARCH_LIMIT, Rollout, RolloutConfig, render_observation
from agent.transformers_engine import TransformersEngine


class ScriptedPolicy:
    """Fake engine for unit tests: searches ``actions`` times, then answers; records what it generated."""

    name = "scripted"

    def __init__(self, tokenizer, actions: int, answer: str = "Orvantis"):
        self.tokenizer, self.actions, self.answer = tokenizer, actions, answer
        self.generated: list[list[int]] = []
        self.calls: list[int] = []

    def generate(self, requests):
        self.calls.append(len(requests))
        out = []
        for r in requests:
            so_far = self.tokenizer.decode(r.prompt_ids)
            done = so_far.count("</end_search>")
            if "</search_result>" in r.stop:
                text = " a simulated passage about the city </search_result>"
            elif done < self.actions:
                text = f" I should look this up. <begin_search> query {done} </end_search> trailing junk"
            else:
                text = f" So it is {self.answer}. </think> \\boxed{{{self.answer}}}"
            ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
            res = cut_at_stop(ids, self.tokenizer.decode, r.stop, {self.tokenizer.eos_token_id}, r.max_new_tokens)
            self.generated.append(res.token_ids)
            out.append(res)
        return out


def fake_search(queries):
    return [(f'result 1: "Doc"\nabout {q}', [f"p-{q}"]) for q in queries]


def prompt(tok, i):
    return (
        f"q{i}",
        tok.encode(
            f"<|im_start|>user\nQuestion {i}?<|im_end|>\n<|im_start|>assistant\n<think>", add_special_tokens=False
        ),
    )


def test_real_environment_is_token_exact(embedded_tokenizer):
    tok = embedded_tokenizer
    policy = ScriptedPolicy(tok, actions=2)
    trajs = Rollout(policy, fake_search, RolloutConfig(max_actions=5)).run([prompt(tok, i) for i in range(6)])
    for t in trajs:
        assert t.n_actions == 2 and t.search_calls == 2 and t.answer == "Orvantis"
        assert t.queries == ["query 0", "query 1"]
        obs = [s for s in t.spans if s.kind == "observation"]
        for s in obs:
            assert tok.decode(t.token_ids[s.start : s.end]) == render_observation(s.text)
            assert s.passage_ids == [f"p-{s.text.split('about ')[1]}"]
            assert set(t.policy_mask[s.start : s.end]) == {0}
        # every token the policy generated is in the mask, nothing else is
        assert sum(t.policy_mask) == t.generated_tokens
        assert set(t.policy_mask[: t.prompt_len]) == {0}
        acts = [s for s in t.spans if s.kind == "action"]
        assert all(tok.decode(t.token_ids[a.start : a.end]).strip().startswith("<begin_search>") for a in acts)
        assert "trailing junk" not in t.completion  # generation stopped at </end_search>
        p = parse(t.completion, think_open=True)
        assert p.balanced and p.queries == t.queries
    # the six trajectories were batched together on the engine
    assert max(policy.calls) == 6


def test_action_budget_forces_an_answer(embedded_tokenizer):
    tok = embedded_tokenizer
    cfg = RolloutConfig(max_actions=2, after_last_action="refuse")  # the default ("force") is in test_method_fidelity
    t = Rollout(ScriptedPolicy(tok, actions=10), fake_search, cfg).run([prompt(tok, 0)])[0]
    # the third action is refused (over T): it gets the limit notice, is not executed and not counted
    assert t.search_calls == 2 and t.n_actions == 2 and t.finish_reason == "forced"
    assert [s.refused for s in t.spans if s.kind == "action"] == [False, False, True]
    kinds = [s.kind for s in t.spans]
    assert kinds == ["action", "observation", "action", "observation", "action", "observation", "forced"]
    assert t.spans[-2].text == SEARCH_LIMIT
    assert "</think>" in t.completion


def test_simulated_environment_makes_no_search_call(embedded_tokenizer):
    tok = embedded_tokenizer
    t = Rollout(ScriptedPolicy(tok, actions=2), None, RolloutConfig(simulated=True)).run([prompt(tok, 0)])[0]
    assert t.search_calls == 0 and t.n_actions == 2
    sims = [s for s in t.spans if s.kind == "observation"]
    assert all(s.simulated and "simulated passage" in s.text for s in sims)
    # the result block's body was written by the policy
    assert all(sum(t.policy_mask[s.start : s.end]) > 0 for s in sims)


def test_context_budget_forces_an_answer(embedded_tokenizer):
    tok = embedded_tokenizer
    cfg = RolloutConfig(max_actions=50, max_context=140, answer_tokens=8)
    t = Rollout(ScriptedPolicy(tok, actions=50), fake_search, cfg).run([prompt(tok, 0)])[0]
    assert t.finish_reason == "forced" and len(t.token_ids) <= cfg.max_context + cfg.answer_tokens + 16


def test_search_is_micro_batched_across_trajectories(embedded_tokenizer):
    tok = embedded_tokenizer
    calls = []

    def slow_search(queries):
        calls.append(len(queries))
        time.sleep(0.3)
        return fake_search(queries)

    start = time.perf_counter()
    Rollout(ScriptedPolicy(tok, actions=1), slow_search).run([prompt(tok, i) for i in range(8)])
    assert calls == [8] and time.perf_counter() - start < 8 * 0.3


def test_real_engine_on_the_embedded_model(embedded_checkpoint):
    engine = TransformersEngine(embedded_checkpoint, max_batch=4)
    tok = engine.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Count from one to ten in words."}], add_generation_prompt=True, tokenize=False
    )
    ids = tok.encode(text, add_special_tokens=False)
    reqs = [GenRequest(list(ids), 40, ("\n3.",), temperature=0.0), GenRequest(list(ids), 5, (), temperature=0.0)]
    a, b = engine.generate(reqs)  # greedy: "1. 1\n2. 2\n3. 3\n..."
    assert isinstance(a, GenResult) and a.text == tok.decode(a.token_ids)
    assert a.finish_reason == "stop" and a.text.endswith("\n3.") and a.text.count("\n3.") == 1
    assert b.finish_reason == "length" and len(b.token_ids) == 5
    # mixed stop strings in one call: each request halts on its own stop only
    c, d = engine.generate(
        [GenRequest(list(ids), 40, ("\n3.",), temperature=0.0), GenRequest(list(ids), 40, ("\n5.",), temperature=0.0)]
    )
    assert c.text.endswith("\n3.") and d.text.endswith("\n5.") and "\n3." in d.text


@pytest.mark.parametrize(
    "raw,stop,want,reason",
    [
        ("abc</end_search>def", ("</end_search>",), "abc</end_search>", "stop"),
        ("abc", ("</end_search>",), "abc", "length"),
    ],
)
def test_cut_at_stop(embedded_tokenizer, raw, stop, want, reason):
    tok = embedded_tokenizer
    ids = tok.encode(raw, add_special_tokens=False)
    res = cut_at_stop(ids, tok.decode, stop, {tok.eos_token_id}, len(ids))
    assert res.text == want and res.finish_reason == reason


def test_search_tool_over_the_real_index():
    from agent.rollout import search_tool
    from retrieval.bm25 import BM25Index

    index = BM25Index.build(
        [{"id": "a", "contents": "Alpha\nAlpha is a poet."}, {"id": "b", "contents": "Beta\nBeta is a city."}],
        show_progress=False,
    )
    rendered, ids = search_tool(index, 2)(["poet"])[0]
    assert ids == ["a"] and rendered == 'result 1: "Alpha"\nAlpha is a poet.'


class UnansweredPolicy:
    """Fake engine: reasons without a box and stops (EOS); with tools off it may open an action; after a
    forced box prompt it writes the answer."""

    name = "unanswered"

    def __init__(self, tokenizer, opens_action: bool = False):
        self.tokenizer, self.opens_action = tokenizer, opens_action

    def generate(self, requests):
        out = []
        for r in requests:
            so_far = self.tokenizer.decode(r.prompt_ids)
            if so_far.endswith("\\boxed{"):
                text = "Orvantis}"
            elif self.opens_action:
                text = " I am not sure. <begin_search> city of Orvantis </end_search> more"
            else:
                text = " It is probably Orvantis.</think>"
            ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
            out.append(cut_at_stop(ids, self.tokenizer.decode, r.stop, {self.tokenizer.eos_token_id}, r.max_new_tokens))
        return out


def test_force_answer_on_an_unanswered_end(embedded_tokenizer):
    tok = embedded_tokenizer
    plain = Rollout(UnansweredPolicy(tok), None, RolloutConfig(tools=False)).run([prompt(tok, 0)])[0]
    assert plain.answer is None and plain.finish_reason == "eos"  # default: an unanswered end stays unanswered
    t = Rollout(UnansweredPolicy(tok), None, RolloutConfig(tools=False, force_answer=True)).run([prompt(tok, 0)])[0]
    assert t.answer == "Orvantis" and t.finish_reason == "forced"
    assert tok.eos_token_id not in t.token_ids[t.prompt_len :]  # the EOS the policy wrote was dropped
    forced = [s for s in t.spans if s.kind == "forced"][0]
    # the reasoning was closed by the policy, so only the box prompt is environment text
    assert tok.decode(t.token_ids[forced.start : forced.end]).startswith("\n\nThe final answer is \\boxed{")
    assert all(m == 0 for m in t.policy_mask[forced.start : forced.start + 3])
    assert len(t.token_ids) == len(t.policy_mask)


def test_cut_actions_keeps_a_no_tool_trajectory_action_free(embedded_tokenizer):
    tok = embedded_tokenizer
    kept = Rollout(UnansweredPolicy(tok, opens_action=True), None, RolloutConfig(tools=False)).run([prompt(tok, 0)])[0]
    assert "<begin_search>" in kept.completion  # default: the text is kept (and not executed)
    t = Rollout(UnansweredPolicy(tok, opens_action=True), None, RolloutConfig(tools=False, cut_actions=True)).run(
        [prompt(tok, 0)]
    )[0]
    assert "<begin_search>" not in t.completion and t.n_actions == 0
    assert t.completion.startswith(" I am not sure.") and t.answer == "Orvantis"
    assert t.finish_reason == "action_cut" and len(t.token_ids) == len(t.policy_mask)
    assert t.generated_tokens == sum(t.policy_mask)
