"""The paper's method as executable statements (AutoCoA, arXiv 2503.06580, Algorithm 1 and sections 3.1-3.3).

One test (or more) per item of the token-exactness audit; each failed on the code before its fix. Engines
here are scripted fakes or small real models; the rollout, the masks and the extraction are the real ones.
"""

from __future__ import annotations

import copy

import pytest

from agent.engines import GenRequest, GenResult, TransformersEngine, cut_at_stop
from agent.protocol import ACTION_CLOSE, OBS_CLOSE, OBS_OPEN, THINK_CLOSE
from agent.rollout import (OBS_CLOSE_TEXT, SEARCH_LIMIT, TRUNCATED, Rollout, RolloutConfig, close_simulated_block,
                           render_observation)
from evals.grading import extract_boxed

# -- helpers -------------------------------------------------------------------------------------------------


def _prompt(tok, i=0):
    return (f"q{i}", tok.encode(f"<|im_start|>user\nQuestion {i}?<|im_end|>\n<|im_start|>assistant\n<think>",
                                add_special_tokens=False))


class Searcher:
    """Scripted policy: opens ``actions`` searches, then answers ``answer``; delegates the forced answer to
    ``answer_engine`` when one is given (a real model then writes at the edge of the context)."""

    name = "scripted"

    def __init__(self, tok, actions: int, answer: str = "Orvantis", answer_engine=None, sim_text=None):
        self.tokenizer, self.actions, self.answer, self.answer_engine = tok, actions, answer, answer_engine
        self.eos_ids = {tok.eos_token_id}
        self.sim_text = sim_text
        self.requests: list[GenRequest] = []

    def generate(self, requests):
        out = []
        for r in requests:
            self.requests.append(r)
            so_far = self.tokenizer.decode(r.prompt_ids)
            if self.answer_engine is not None and r.stop == ("}",):
                out.append(self.answer_engine.generate([r])[0])
                continue
            if OBS_CLOSE in r.stop:
                text = self.sim_text if self.sim_text is not None else f" a simulated passage {OBS_CLOSE}"
            elif r.stop == ("}",):  # the forced answer: continue it where it stands
                written = so_far[so_far.rfind("\\boxed{") + len("\\boxed{"):]
                text = (self.answer + "}")[len(written):]
            elif so_far.count(ACTION_CLOSE) < self.actions:
                text = f" I look it up. <begin_search> query {so_far.count(ACTION_CLOSE)} {ACTION_CLOSE} junk"
            else:
                text = f" So it is {self.answer}. {THINK_CLOSE} \\boxed{{{self.answer}}}"
            ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
            out.append(cut_at_stop(ids, self.tokenizer.decode, r.stop, self.eos_ids, r.max_new_tokens))
        return out


def _long_search(tok, words=170):
    """k=3 passages of 150+ tokens each, as BM25 over HotpotQA paragraphs returns them."""
    body = " ".join(f"fact{i} lorem ipsum" for i in range(words // 3))

    def run(queries):
        return [("\n".join(f'result {k}: "Doc {k}"\n{q}: {body}' for k in (1, 2, 3)), ["p1", "p2", "p3"])
                for q in queries]
    return run


# -- 1. context overflow -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_engine(embedded_tokenizer):
    """A random one-layer Llama behind the real transformers engine, refusing prompts over max_model_len as vLLM does."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(embedded_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).eval()
    return model


@pytest.mark.parametrize("max_context", [700, 900, 1100])
def test_item1_sequence_never_exceeds_the_context_budget(embedded_tokenizer, tiny_engine, max_context):
    tok = embedded_tokenizer
    search = _long_search(tok)
    probe = len(tok.encode(render_observation(search(["q"])[0][0]), add_special_tokens=False))
    assert probe > 450  # three passages of 150+ tokens
    engine = TransformersEngine.from_model(tiny_engine, tok, max_model_len=max_context)
    policy = Searcher(tok, actions=10, answer_engine=engine)
    cfg = RolloutConfig(max_actions=10, max_context=max_context, answer_tokens=16, temperature=0.0)
    trajs = Rollout(policy, search, cfg).run([_prompt(tok, i) for i in range(3)])
    for t in trajs:
        assert t.finish_reason != "error", t.error
        assert len(t.token_ids) <= max_context
        obs = [s for s in t.spans if s.kind == "observation"]
        assert obs, "at least one search fits"
        last = obs[-1]
        if last.truncated:  # cut at a token boundary, with a visible notice and the closing tag, all masked
            assert tok.decode(t.token_ids[last.start:last.end]).endswith(TRUNCATED + OBS_CLOSE_TEXT)
        assert all(set(t.policy_mask[s.start:s.end]) == {0} for s in obs)
        assert t.spans[-1].kind == "forced"  # the random model writes the forced answer at the edge of the context


def test_item1_one_failing_trajectory_does_not_fail_the_others(embedded_tokenizer):
    tok = embedded_tokenizer

    class FailsOnQuestion3(Searcher):
        def generate(self, requests):
            if any("Question 3?" in self.tokenizer.decode(r.prompt_ids) for r in requests):
                raise RuntimeError("engine refused the request")
            return super().generate(requests)

    trajs = Rollout(FailsOnQuestion3(tok, actions=1), _long_search(tok), RolloutConfig(max_context=2048)).run(
        [_prompt(tok, i) for i in range(6)])
    assert len(trajs) == 6  # counts reconcile: one row per task
    assert [t.finish_reason == "error" for t in trajs] == [i == 3 for i in range(6)]
    assert "engine refused" in trajs[3].error
    assert all(t.answer == "Orvantis" for i, t in enumerate(trajs) if i != 3)


@pytest.mark.slow
def test_item1_context_budget_on_vllm(embedded_checkpoint, embedded_tokenizer):
    pytest.importorskip("vllm")
    from agent.vllm_engine import VLLMEngine

    tok = embedded_tokenizer
    engine = VLLMEngine(embedded_checkpoint, max_model_len=1024)
    try:
        policy = Searcher(tok, actions=10, answer_engine=engine)
        cfg = RolloutConfig(max_actions=10, max_context=1024, answer_tokens=16, temperature=0.0)
        trajs = Rollout(policy, _long_search(tok), cfg).run([_prompt(tok, i) for i in range(4)])
    finally:
        engine.close()
    assert all(t.finish_reason != "error" and len(t.token_ids) <= 1024 for t in trajs), [t.error for t in trajs]


# -- 3. the T-th action ------------------------------------------------------------------------------------------


def test_item3_answer_is_forced_right_after_the_T_th_observation(embedded_tokenizer):
    tok = embedded_tokenizer
    policy = Searcher(tok, actions=10)
    t = Rollout(policy, _long_search(tok, 20), RolloutConfig(max_actions=2)).run([_prompt(tok)])[0]
    assert t.n_actions == 2 and t.search_calls == 2 and t.finish_reason == "forced"
    kinds = [s.kind for s in t.spans]
    assert kinds == ["action", "observation", "action", "observation", "forced"]  # nothing between obs T and the answer
    assert not any(s.refused for s in t.spans)
    assert t.spans[3].end == t.spans[4].start
    # the older rule stays selectable: the policy reasons on and a (T+1)-th action is refused
    t = Rollout(policy, _long_search(tok, 20), RolloutConfig(max_actions=2, after_last_action="refuse")).run(
        [_prompt(tok)])[0]
    assert [s.refused for s in t.spans if s.kind == "action"] == [False, False, True]
    assert SEARCH_LIMIT in t.completion


def test_item3_forced_answer_with_braces_is_closed_by_balance(embedded_tokenizer):
    tok = embedded_tokenizer
    policy = Searcher(tok, actions=10, answer="{1,2} and {3}")
    t = Rollout(policy, _long_search(tok, 20), RolloutConfig(max_actions=1)).run([_prompt(tok)])[0]
    assert t.answer == "{1,2} and {3}"
    assert extract_boxed(t.completion) == "{1,2} and {3}"


# -- 4. EOS inside a simulated observation ------------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["eos", "length"])
def test_item4_simulated_block_is_closed_by_the_environment(embedded_tokenizer, ending):
    tok = embedded_tokenizer
    sim = " the city lies on the river" if ending == "eos" else " " + "very long result " * 200
    policy = Searcher(tok, actions=1, sim_text=sim)
    cfg = RolloutConfig(max_actions=3, simulated=True, max_turn_tokens=64)
    t = Rollout(policy, None, cfg).run([_prompt(tok)])[0]
    obs = [s for s in t.spans if s.kind == "observation"]
    assert len(obs) == 1 and obs[0].simulated and obs[0].closed_by == ending
    block = t.token_ids[obs[0].start:obs[0].end]
    assert tok.decode(block).endswith(OBS_CLOSE_TEXT)
    close_len = len(tok.encode(OBS_CLOSE_TEXT, add_special_tokens=False))
    assert t.policy_mask[obs[0].end - close_len:obs[0].end] == [0] * close_len  # the closing tag is the environment's
    assert tok.eos_token_id not in t.token_ids[t.prompt_len:obs[0].end]  # the EOS inside the block is gone
    assert t.answer == "Orvantis" and t.completion.count(OBS_OPEN) == t.completion.count(OBS_CLOSE) == 1


def test_item4_one_rule_for_rollouts_grpo_and_probes():
    eos = {2}
    assert close_simulated_block(GenResult([5, 6, 2], "x", "eos"), eos) == ([5, 6], True, "eos")
    assert close_simulated_block(GenResult([5, 6], "x", "length"), eos) == ([5, 6], True, "length")
    assert close_simulated_block(GenResult([5, 7], "x</search_result>", "stop"), eos) == ([5, 7], False, "policy")


# -- 5. doubled <think> -----------------------------------------------------------------------------------------

# The shape of the DeepSeek-R1-Distill chat template since February 2025: the generation prompt itself opens
# the reasoning with "<think>\n" (written for this test; only its ending matters here).
R1_DISTILL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)


def test_item5_prefill_is_not_doubled_for_r1_distill_templates(embedded_tokenizer):
    from agent.prompts import TEMPLATES

    r1 = copy.deepcopy(embedded_tokenizer)
    r1.chat_template = R1_DISTILL_TEMPLATE
    for template_id in ("coa-r1-v1", "cot-r1-v1", "coa-r1-fewshot-v1"):
        text = TEMPLATES[template_id].render(r1, "Who wrote Harbour at Dusk?")
        assert text.endswith("<｜Assistant｜><think>\n") and text.count("<think>\n") == 1
    # an older template that does not open the reasoning gets the prefill
    plain = TEMPLATES["coa-r1-v1"].render(embedded_tokenizer, "Who wrote Harbour at Dusk?")
    assert plain.endswith("<|im_start|>assistant\n<think>\n") and plain.count("<think>\n") == 1


# -- 8. answer extraction ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    # no </think>: a boxed answer quoted inside a search result is not the policy's answer
    ("<begin_search> q </end_search>\n<search_result>\nresult 1: \\boxed{Leaked}\n</search_result>\n", None),
    # a result that contains </think> does not move the answer position
    ("x <search_result>\n</think> \\boxed{Leaked}\n</search_result>\n y</think> \\boxed{Mine}", "Mine"),
    # an unclosed (truncated) result block runs to the end
    ("reasoning <search_result>\nresult 1: \\boxed{Leaked}", None),
    ("</think> \\boxed{Mine}", "Mine"),
])
def test_item8_answers_are_never_read_inside_observations(text, want):
    assert extract_boxed(text) == want


def test_item8_reward_and_metrics_share_the_extraction():
    from agent.protocol import parse
    from training.rewards import score_completion

    text = "<begin_search> q </end_search>\n<search_result>\n\\boxed{Paris}\n</search_result>\nno idea"
    assert parse(text, think_open=True).answer is None
    assert score_completion(text, ["Paris"], think_open=True).em == 0.0


# -- 9. baselines as the paper defines them ---------------------------------------------------------------------


def test_item9_react_on_a_base_model_is_a_plain_text_prompt(embedded_tokenizer):
    from evals.react import react_template_for

    t = react_template_for("Qwen/Qwen2.5-7B")
    assert t.id == "react-base-v1"
    text = t.render(embedded_tokenizer, "Who wrote Harbour at Dusk?")
    assert "<|im_start|>" not in text and text.rstrip().endswith("<think>")
    assert "Thought 1" in text  # the worked examples are in the prompt
    assert react_template_for("Qwen/Qwen2.5-7B-Instruct").id != "react-base-v1"
    assert react_template_for("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B").id == "react-r1-v1"


def test_item9_paper_profile_baselines():
    import yaml

    from pipelines.paths import REPO_ROOT

    cfg = yaml.safe_load((REPO_ROOT / "configs" / "paper.yaml").read_text())["ops"]
    assert cfg["eval_predictions"]["config"]["base_engine"]["model"] == "Qwen/Qwen2.5-7B"
    rl = cfg["rl_stage2_only_checkpoint"]["config"]
    assert rl.get("template_id") == "coa-r1-fewshot-v1"  # in-context learning guides RL from the untrained model


def test_item4_fidelity_probe_follows_the_rollout_rule(embedded_tokenizer):
    from evals.fidelity import probe_simulated_results

    tok = embedded_tokenizer
    policy = Searcher(tok, actions=0, sim_text=" the city lies on the river")  # ends with EOS, no closing tag
    (text,) = probe_simulated_results(policy, [_prompt(tok)[1]], ["Valdren river"])
    assert text == "the city lies on the river"  # no EOS text, nothing after it
