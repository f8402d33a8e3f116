"""The paper's method as executable statements (AutoCoA, arXiv 2503.06580, Algorithm 1 and sections 3.1-3.3).

Items 1-11 of the token-exactness audit, in the order: rollout (1, 3, 4), prompts (5), extraction (8), baselines (9),
SFT-1 (2, 10), RL (6, 7, 11).

One test (or more) per item of the token-exactness audit; each failed on the code before its fix. Engines
here are scripted fakes or small real models; the rollout, the masks and the extraction are the real ones.
"""

from __future__ import annotations

import copy
import math
import random
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from agent.engine_api import GenRequest, GenResult, cut_at_stop
from agent.protocol import ACTION_CLOSE, OBS_CLOSE, OBS_OPEN, THINK_CLOSE
from agent.rollout import (
    FORCE_ANSWER,
    OBS_CLOSE_TEXT,
    SEARCH_LIMIT,
    TRUNCATED,
    Rollout,
    RolloutConfig,
    close_simulated_block,
    render_observation,
)
from agent.transformers_engine import TransformersEngine
from assets.data import (
    EmbeddedWorldConfig,
    HotpotqaRawConfig,
    QuestionSampleConfig,
    RlQuestionsConfig,
    embedded_world,
    hotpotqa_raw,
    question_sample,
    rl_questions,
    rl_questions_disjoint_from_sft,
)
from assets.rl import RlConfig
from assets.storage import StorageResource
from qadata.answers import extract_boxed
from qadata.paths import REPO_ROOT, table_path
from qadata.text import normalise_question
from training.grpo import PAPER_COT_FRACTION, GrpoSettings, batch_layout, cot_per_step, grpo_config, step_rows
from training.grpo_rollout import CostLedger, make_rollout_func
from training.pairs import Pair, budget_pairs, mine_pairs
from training.sft_data import stage1_rows

torch = pytest.importorskip("torch")


# -- helpers -------------------------------------------------------------------------------------------------


def _prompt(tok, i=0):
    return (
        f"q{i}",
        tok.encode(
            f"<|im_start|>user\nQuestion {i}?<|im_end|>\n<|im_start|>assistant\n<think>", add_special_tokens=False
        ),
    )


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
                written = so_far[so_far.rfind("\\boxed{") + len("\\boxed{") :]
                text = (self.answer + "}")[len(written) :]
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
        return [
            ("\n".join(f'result {k}: "Doc {k}"\n{q}: {body}' for k in (1, 2, 3)), ["p1", "p2", "p3"]) for q in queries
        ]

    return run


# -- 1. context overflow -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_engine(embedded_tokenizer):
    """A random one-layer Llama behind the real transformers engine, refusing prompts over max_model_len as vLLM does."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(embedded_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
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
            assert tok.decode(t.token_ids[last.start : last.end]).endswith(TRUNCATED + OBS_CLOSE_TEXT)
        assert all(set(t.policy_mask[s.start : s.end]) == {0} for s in obs)
        assert t.spans[-1].kind == "forced"  # the random model writes the forced answer at the edge of the context


def test_item1_one_failing_trajectory_does_not_fail_the_others(embedded_tokenizer):
    tok = embedded_tokenizer

    class FailsOnQuestion3(Searcher):
        def generate(self, requests):
            if any("Question 3?" in self.tokenizer.decode(r.prompt_ids) for r in requests):
                raise RuntimeError("engine refused the request")
            return super().generate(requests)

    trajs = Rollout(FailsOnQuestion3(tok, actions=1), _long_search(tok), RolloutConfig(max_context=2048)).run(
        [_prompt(tok, i) for i in range(6)]
    )
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
        [_prompt(tok)]
    )[0]
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
    block = t.token_ids[obs[0].start : obs[0].end]
    assert tok.decode(block).endswith(OBS_CLOSE_TEXT)
    close_len = len(tok.encode(OBS_CLOSE_TEXT, add_special_tokens=False))
    assert t.policy_mask[obs[0].end - close_len : obs[0].end] == [0] * close_len  # the closing tag is the environment's
    assert tok.eos_token_id not in t.token_ids[t.prompt_len : obs[0].end]  # the EOS inside the block is gone
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


@pytest.mark.parametrize(
    "text, want",
    [
        # no </think>: a boxed answer quoted inside a search result is not the policy's answer
        ("<begin_search> q </end_search>\n<search_result>\nresult 1: \\boxed{Leaked}\n</search_result>\n", None),
        # a result that contains </think> does not move the answer position
        ("x <search_result>\n</think> \\boxed{Leaked}\n</search_result>\n y</think> \\boxed{Mine}", "Mine"),
        # an unclosed (truncated) result block runs to the end
        ("reasoning <search_result>\nresult 1: \\boxed{Leaked}", None),
        ("</think> \\boxed{Mine}", "Mine"),
    ],
)
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

    from qadata.paths import REPO_ROOT

    cfg = yaml.safe_load((REPO_ROOT / "configs" / "paper.yaml").read_text())["ops"]
    assert cfg["eval_predictions"]["config"]["base_engine"]["model"] == "Qwen/Qwen2.5-7B"
    rl = cfg["rl_stage2_only_checkpoint"]["config"]
    assert rl.get("base_template_id") == "coa-r1-fewshot-v1"  # in-context learning guides RL from the untrained model
    from assets.rl import RlConfig

    RlConfig(**rl)  # the profile parses


def test_item4_fidelity_probe_follows_the_rollout_rule(embedded_tokenizer):
    from evals.fidelity import probe_simulated_results

    tok = embedded_tokenizer
    policy = Searcher(tok, actions=0, sim_text=" the city lies on the river")  # ends with EOS, no closing tag
    (text,) = probe_simulated_results(policy, [_prompt(tok)[1]], ["Valdren river"])
    assert text == "the city lies on the river"  # no EOS text, nothing after it


# == items 2 and 10: SFT-1 over the policy tokens, the pair budget ==========================================

SFT1_PROMPT = "<|im_start|>user\nIn which country is Valdren?<|im_end|>\n<|im_start|>assistant\n<think>"


class _Sft1Scripted:
    """A scripted policy: searches when an action was opened, answers Norsland after a result or when told to
    reason alone, and opens an action anyway (cut, then the answer is forced) when ``searches_anyway``."""

    name = "scripted"

    def __init__(self, tokenizer, searches_anyway=False):
        self.tokenizer, self.searches_anyway = tokenizer, searches_anyway

    def generate(self, requests):
        out = []
        for r in requests:
            so_far = self.tokenizer.decode(r.prompt_ids)
            if so_far.rstrip().endswith("<begin_search>"):
                text = " Valdren country </end_search>"
            elif so_far.endswith("\\boxed{"):
                text = "Norsland}"
            elif self.searches_anyway and "<search_result>" not in so_far:
                text = " Let me check. <begin_search> Valdren </end_search>"
            else:
                text = " So it is Norsland.</think>\n\n\\boxed{Norsland}"
            ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
            out.append(cut_at_stop(ids, self.tokenizer.decode, r.stop, {self.tokenizer.eos_token_id}, r.max_new_tokens))
        return out


def _sft1_row(tok, kind, completion):
    """A wrong trajectory as the synthesis tables store it: ids, policy_mask (0 on the search result), spans."""
    prompt = tok.encode(SFT1_PROMPT, add_special_tokens=False)
    comp = tok.encode(completion, add_special_tokens=False)

    def token_at(char):
        return next(n for n in range(len(comp)) if len(tok.decode(comp[: n + 1])) > char)

    spans, mask = [], [0] * len(prompt) + [1] * len(comp)
    if "<begin_search>" in completion:
        a = token_at(completion.index("<begin_search>"))
        spans.append({"kind": "action", "start": len(prompt) + a, "end": len(prompt) + a + 5})
    if "<search_result>" in completion:
        a = token_at(completion.index("<search_result>"))
        b = token_at(completion.index("</search_result>") + len("</search_result>") - 1) + 1
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
        "em": 0.0,
        "spans": spans,
    }


def _sft1_search(queries):
    return [('result 1: "Valdren"\nValdren is a town in Norsland.', ["p2"]) for _ in queries]


@pytest.fixture(scope="module")
def sft1_mined(embedded_tokenizer):
    """One (a) pair whose chosen side holds a real search result and one (b) pair whose chosen side holds the
    forced answer prompt and whose rejected side (the CoA's own continuation) holds a real search result."""
    tok = embedded_tokenizer
    cot = _sft1_row(tok, "cot", " Valdren is a town. It is in Brivia.</think>\n\n\\boxed{Brivia}")
    coa = _sft1_row(
        tok,
        "coa",
        " I need it. <begin_search> Valdren </end_search>\n<search_result>\nValdren is in "
        "Brivia.\n</search_result>\n It is Brivia.</think>\n\n\\boxed{Brivia}",
    )
    cfg = RolloutConfig(max_actions=2, max_context=400, max_turn_tokens=40, answer_tokens=8)
    prompt_ids = lambda q: tok.encode(SFT1_PROMPT, add_special_tokens=False)  # noqa: E731
    (a,), _ = mine_pairs(
        [cot], [], engine=_Sft1Scripted(tok), search=_sft1_search, coa_prompt_ids=prompt_ids, config=cfg, attempts=1
    )
    (b,), _ = mine_pairs(
        [],
        [coa],
        engine=_Sft1Scripted(tok, searches_anyway=True),
        search=_sft1_search,
        coa_prompt_ids=prompt_ids,
        config=cfg,
        attempts=1,
    )
    return a, b, coa


def _environment_positions(tok, ids, observation_spans):
    """Where the environment wrote (found independently of the masks): observation spans and the forced prompt."""
    env = {i for s, e in observation_spans for i in range(s, e)}
    for text in (FORCE_ANSWER, FORCE_ANSWER.split("\n", 2)[-1]):  # with or without the closing </think>
        forced = tok.encode(text, add_special_tokens=False)
        env |= {i + k for i in range(len(ids)) if ids[i : i + len(forced)] == forced for k in range(len(forced))}
    return env


def test_item2_sft1_pair_masks_exclude_search_results_and_forced_text(sft1_mined, embedded_tokenizer):
    tok = embedded_tokenizer
    a, b, coa = sft1_mined
    assert a.chosen_observation_spans and b.rejected_observation_spans
    assert "\\boxed{" in tok.decode(b.chosen_ids) and b.chosen_has_action is False
    for p in (a, b):
        for side in ("chosen", "rejected"):
            ids, mask = getattr(p, f"{side}_ids"), getattr(p, f"{side}_mask")
            env = _environment_positions(tok, ids, getattr(p, f"{side}_observation_spans"))
            assert len(mask) == len(ids)
            assert [i for i, m in enumerate(mask) if not m] == sorted(env), (p.kind, side, tok.decode(ids))
    assert any(not m for m in b.chosen_mask)  # the forced prompt is there, and masked
    # the inserted <begin_search> is the chosen decision itself: in the loss
    action = tok.encode(" <begin_search>", add_special_tokens=False)
    assert a.chosen_ids[: len(action)] == action and a.chosen_mask[: len(action)] == [1] * len(action)
    # rejected (b): the source CoA's own policy_mask, sliced at the juncture
    assert b.rejected_mask == coa["policy_mask"][coa["prompt_tokens"] + len(b.prefix_ids) :]


def _as_table_row(p: Pair, tok) -> dict:
    return {
        "pair_id": p.pair_id,
        "question_id": p.question_id,
        "kind": p.kind,
        "prompt_ids": p.prompt_ids,
        "prefix_ids": p.prefix_ids,
        "chosen_ids": p.chosen_ids,
        "rejected_ids": p.rejected_ids,
        "chosen_mask": p.chosen_mask,
        "rejected_mask": p.rejected_mask,
        "prompt_text": tok.decode(p.prompt_ids),
        "prefix_text": tok.decode(p.prefix_ids),
        "chosen_text": tok.decode(p.chosen_ids),
        "rejected_text": tok.decode(p.rejected_ids),
    }


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_item2_sft1_trainer_loss_is_the_paper_formula_over_exactly_the_policy_tokens(
    sft1_mined, embedded_tokenizer, tiny_model, tmp_path, alpha
):
    from transformers import AutoModelForCausalLM

    from training.sft import TrainSettings, stage1_trainer

    tok = embedded_tokenizer
    mined = sft1_mined[:2]
    rows = stage1_rows([_as_table_row(p, tok) for p in mined], max_length=512)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    trainer = stage1_trainer(model, tok, rows, TrainSettings(batch_size=2, max_length=512, alpha=alpha), tmp_path)
    with torch.no_grad():
        loss, out = trainer.compute_loss(model, trainer.data_collator(rows), return_outputs=True)

    def by_hand(context, ids, env):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([context + ids])).logits[0].double(), dim=-1)
        picked = [float(logp[len(context) + i - 1, t]) for i, t in enumerate(ids) if i not in env]
        return sum(picked) / len(picked)

    want = {}
    for side in ("chosen", "rejected"):
        want[side] = [
            by_hand(
                r["context_ids"],
                r[f"{side}_ids"],
                _environment_positions(tok, r[f"{side}_ids"], getattr(p, f"{side}_observation_spans")),
            )
            for r, p in zip(rows, mined)
        ]
    assert out["logps_chosen"].tolist() == pytest.approx(want["chosen"], abs=1e-5)
    assert out["logps_rejected"].tolist() == pytest.approx(want["rejected"], abs=1e-5)
    formula = [-math.log(1 / (1 + math.exp(r - c))) - alpha * c for c, r in zip(want["chosen"], want["rejected"])]
    assert float(loss) == pytest.approx(sum(formula) / len(formula), abs=1e-5)


def test_item2_sft1_trains_on_ids_and_refuses_text_rows(tiny_model, tmp_path):
    from training.sft import TrainSettings, train_stage1

    text_rows = [
        {
            "prompt": "Q: where is Valdren?\n<think>",
            "chosen": " <begin_search> Valdren </end_search>",
            "rejected": " Brivia.</think> \\boxed{Brivia}",
        }
    ] * 2
    with pytest.raises(ValueError, match="token ids"):
        train_stage1(tiny_model, text_rows, tmp_path / "s1", TrainSettings(max_steps=1, max_length=64))


def _budget_pairs(n_a, n_b):
    return [
        Pair(
            pair_id=f"t{k}{i}#{k}",
            question_id=f"q{k}{i}",
            kind=k,
            juncture_rule="",
            prompt_ids=[],
            prefix_ids=[],
            chosen_ids=[1],
            rejected_ids=[2],
            chosen_correct=True,
            rejected_correct=False,
        )
        for k, n in (("a", n_a), ("b", n_b))
        for i in range(n)
    ]


@pytest.mark.parametrize(
    "n_a, n_b, max_pairs, share, kept_a, kept_b",
    [
        (10, 5, 6, 0.5, 3, 3),
        (10, 5, 6, 0.8, 5, 1),  # round(4.8) = 5 action-chosen
        (2, 10, 6, 0.8, 2, 4),  # too few action-chosen: the think-chosen fill the budget
        (10, 0, 6, 0.5, 6, 0),
        (3, 2, None, 0.8, 3, 2),  # no budget: everything kept
        (3, 2, 100, 0.8, 3, 2),
    ],
)
def test_item10_pair_budget_caps_with_the_kind_balance(n_a, n_b, max_pairs, share, kept_a, kept_b):
    pairs = _budget_pairs(n_a, n_b)
    kept, dropped, stats = budget_pairs(pairs, max_pairs, share, seed=0)
    assert [p.kind for p in kept].count("a") == kept_a and [p.kind for p in kept].count("b") == kept_b
    assert stats["kept"] == {"a": kept_a, "b": kept_b} and stats["available"] == {"a": n_a, "b": n_b}
    if max_pairs is not None:
        assert stats["requested"] == {"a": round(max_pairs * share), "b": max_pairs - round(max_pairs * share)}
    # counts reconcile: every mined pair is kept or discarded with the reason
    assert len(kept) + len(dropped) == len(pairs)
    assert {p.question_id for p in kept} | {d.question_id for d in dropped} == {p.question_id for p in pairs}
    assert all(d.reason.startswith("over max_pairs budget (kind balance") for d in dropped)


def test_item10_pair_budget_is_deterministic_and_seeded():
    pairs = _budget_pairs(20, 20)
    kept = {p.pair_id for p in budget_pairs(pairs, 10, 0.8, seed=0)[0]}
    shuffled = list(pairs)
    random.Random(1).shuffle(shuffled)
    assert {p.pair_id for p in budget_pairs(shuffled, 10, 0.8, seed=0)[0]} == kept  # independent of input order
    assert {p.pair_id for p in budget_pairs(pairs, 10, 0.8, seed=1)[0]} != kept  # the seed chooses
    with pytest.raises(ValueError, match="action_chosen_share"):
        budget_pairs(pairs, 10, 1.5)


def test_item10_pair_budget_paper_profile_and_default():
    from assets.pairs import PairsConfig

    default = PairsConfig()
    assert default.max_pairs == 400 and default.action_chosen_share == 0.8
    paper = yaml.safe_load((Path(__file__).parents[1] / "configs" / "paper.yaml").read_text())
    cfg = PairsConfig(**paper["ops"]["contrastive_pairs"]["config"])
    assert cfg.max_pairs == 1500 and 0.5 < cfg.action_chosen_share < 1.0  # the paper: 1,500 pairs, mostly action-chosen


# == items 6, 7 and 11: RL ====================================================================================


# -- item 6: RL questions disjoint from SFT (and evaluation) questions -----------------------------------------
@pytest.fixture(scope="module")
def small_data():
    """A small generated world, its hotpotqa_raw and a 40-question sample, by direct asset invocation."""
    world = embedded_world(
        dg.build_asset_context(), EmbeddedWorldConfig(people=300, works=300, orgs=60, places=80, questions=200)
    ).value
    raw = next(iter(hotpotqa_raw(dg.build_asset_context(), HotpotqaRawConfig(), world))).value
    sample = question_sample(dg.build_asset_context(), QuestionSampleConfig(total=40), raw).value
    return raw, sample


def _check(home, pool, sample, raw):
    """The check as Dagster runs it: it reads the three tables from the home."""
    for name, table in (("rl_questions", pool), ("question_sample", sample), ("hotpotqa_raw", raw)):
        path = table_path(home, [name])
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
    return rl_questions_disjoint_from_sft(
        dg.build_asset_check_context(instance=dg.DagsterInstance.ephemeral()), StorageResource(home=str(home))
    )


def test_item6_rl_pool_is_disjoint_from_sft_and_evaluation_and_the_check_blocks_an_overlap(small_data, tmp_path):
    raw, sample = small_data
    home = tmp_path / "home"
    # an SFT table on disk naming a training question that question_sample no longer holds (a redrawn sample)
    spare = sorted(
        r["id"]
        for r in raw.select(["id", "split"]).to_pylist()
        if r["split"] == "train" and r["id"] not in set(sample.column("id").to_pylist())
    )[0]
    sft = table_path(home, ["sft_stage23_data"])
    sft.parent.mkdir(parents=True)
    pq.write_table(pa.table({"question_id": [spare]}), sft)

    ctx = dg.build_asset_context(instance=dg.DagsterInstance.ephemeral())
    pool = rl_questions(ctx, RlQuestionsConfig(total=100), StorageResource(home=str(home)), raw, sample).value
    rows = pool.to_pylist()
    assert len(rows) == 100 and len({r["id"] for r in rows}) == 100
    sample_ids = set(sample.column("id").to_pylist())
    sample_texts = {normalise_question(q) for q in sample.column("question").to_pylist()}
    assert not {r["id"] for r in rows} & (sample_ids | {spare})
    assert not {normalise_question(r["question"]) for r in rows} & sample_texts
    assert {r["split"] for r in rows} == {"train"}  # the dev split is evaluation: never an RL prompt
    absent = rl_questions_disjoint_from_sft(
        dg.build_asset_check_context(instance=dg.DagsterInstance.ephemeral()), StorageResource(home=str(home))
    )
    assert absent.passed and "skipped" in absent.metadata  # rl_questions not materialised: skipped, not failed
    check = _check(home, pool, sample, raw)
    assert check.passed and check.metadata["overlap_sft"].value == 0

    # a pool sharing one question with the SFT sample and one with evaluation fails the check, which is blocking
    dev = next(r for r in raw.to_pylist() if r["split"] == "dev")
    leaked = pa.concat_tables(
        [
            pool,
            pa.Table.from_pylist(
                [{k: r.get(k) for k in pool.schema.names} | {"stratum": "x/y"} for r in (sample.to_pylist()[0], dev)],
                schema=pool.schema,
            ),
        ]
    )
    bad = _check(home, leaked, sample, raw)
    assert not bad.passed
    assert bad.metadata["overlap_sft"].value == 1 and bad.metadata["overlap_evaluation"].value == 1
    (spec,) = rl_questions_disjoint_from_sft.check_specs
    assert spec.blocking
    # the RL assets read their prompts from the pool, not from question_sample
    from assets.rl import sft123_rl12_checkpoint

    assert dg.AssetKey("rl_questions") in sft123_rl12_checkpoint.dependency_keys
    assert dg.AssetKey("question_sample") not in sft123_rl12_checkpoint.dependency_keys


def test_item6_paper_profile_pool_size():
    import yaml

    ops = yaml.safe_load((REPO_ROOT / "configs" / "paper.yaml").read_text())["ops"]
    rl = ops["sft123_rl12_checkpoint"]["config"]
    assert ops["rl_questions"]["config"]["total"] == 4608 == rl["max_steps"] * rl["questions_per_step"]


# -- item 7: pure CoT in RL ------------------------------------------------------------------------------------
class Scripted:
    """Opens one search, then answers; a CoT rollout (tool off, cut_actions) cuts at the opened action."""

    name = "scripted"

    def __init__(self, tok):
        self.tokenizer = tok

    def generate(self, requests):
        tok, out = self.tokenizer, []
        for r in requests:
            text = tok.decode(r.prompt_ids)
            turn = text[text.rfind("<|im_start|>assistant") :]
            if text.endswith("\\boxed{"):  # the environment forced the answer
                script = "Norsland}"
            elif OBS_CLOSE in r.stop:
                script = " Valdren is in Norsland. </search_result>"
            elif "</end_search>" not in turn:
                script = " Let me look. <begin_search> Valdren </end_search>"
            else:
                script = " So Norsland.</think>\n\nThe answer is \\boxed{Norsland}"
            ids = tok.encode(script, add_special_tokens=False) + [tok.eos_token_id]
            out.append(cut_at_stop(ids, tok.decode, r.stop, {tok.eos_token_id}, r.max_new_tokens))
        return out


def _rl_prompt(kind, i):
    return f"<|im_start|>user\n[{kind}] Question {i}?<|im_end|>\n<|im_start|>assistant\n<think>"


def test_item7_cot_rows_roll_out_with_the_tool_off_and_coa_rows_with_it_on(embedded_tokenizer):
    tok = embedded_tokenizer
    modes = {_rl_prompt("cot", 0): "cot", _rl_prompt("coa", 1): "coa", _rl_prompt("coa", 2): "coa"}
    prompts = [p for p in modes for _ in range(2)]  # TRL's layout: each prompt num_generations times in a row
    calls, ledger = [], CostLedger()

    def search(queries):
        calls.extend(queries)
        return [(f'result 1: "Valdren"\nValdren is a town in Norsland ({q}).', ["p1"]) for q in queries]

    rf = make_rollout_func(
        search=search,
        schedule=lambda step: False,
        ledger=ledger,
        prompt_modes=modes,
        rollout_config=RolloutConfig(max_actions=2, max_context=512, seed=0),
        engine_factory=lambda trainer: nullcontext(Scripted(tok)),
    )
    trainer = SimpleNamespace(state=SimpleNamespace(global_step=0), num_generations=2, processing_class=tok, model=None)
    out = rf(prompts, trainer)
    assert out["mode"] == ["cot"] * 2 + ["coa"] * 4
    for i in range(6):
        text = out["completion_text"][i]
        if i < 2:  # CoT: the opened action is cut, nothing is searched, no observation is appended
            assert out["n_actions"][i] == 0 and out["search_calls"][i] == 0 and "<search_result>" not in text
            assert "<begin_search>" not in text and text.endswith("\\boxed{Norsland}")
            assert all(out["env_mask"][i][: len(tok.encode(" Let me look.", add_special_tokens=False))])
        else:  # CoA: the search runs for real and its result is an environment block
            assert out["n_actions"][i] == 1 and out["search_calls"][i] == 1 and "<search_result>" in text
            assert "\\boxed{Norsland}" in text
    assert len(calls) == 4
    (rec,) = ledger.records
    assert (rec.trajectories, rec.cot_trajectories, rec.search_calls) == (6, 2, 4)
    with pytest.raises(KeyError, match="prompt_modes"):
        rf([_rl_prompt("cot", 9)] * 2, trainer)


@pytest.mark.parametrize(
    "per_step,fraction,steps,pool", [(48, PAPER_COT_FRACTION, 96, 4608), (2, 0.5, 3, 5), (5, 0.2, 7, 12)]
)
def test_item7_every_step_holds_the_configured_cot_share(per_step, fraction, steps, pool):
    questions = [{"question_id": f"q{i}", "question": f"Q{i}?", "gold_answers": ["a"]} for i in range(pool)]
    settings = GrpoSettings(max_steps=steps, questions_per_step=per_step, num_generations=2, cot_fraction=fraction)
    plan = step_rows(questions, settings)
    assert len(plan) == steps * per_step
    want = cot_per_step(settings)
    assert want == round(fraction * per_step) and (per_step != 48 or want == 8)  # paper: 8 of 48, the SFT 1:5
    for s in range(steps):
        block = plan[s * per_step : (s + 1) * per_step]
        assert sum(mode == "cot" for _, mode in block) == want
        assert len({q["question_id"] for q, _ in block}) == per_step  # no question twice in one step
    # every question is used once before any is used again
    first = [q["question_id"] for q, _ in plan[: pool // per_step * per_step]]
    assert len(set(first)) == len(first)
    if steps * per_step <= pool:
        assert len({q["question_id"] for q, _ in plan}) == steps * per_step


def test_item7_trl_trains_each_step_on_its_block_with_the_cot_share(tiny_model, tmp_path):
    from training.grpo import train_grpo

    settings = GrpoSettings(
        max_steps=2,
        learning_rate=1e-3,
        questions_per_step=2,
        num_generations=2,
        max_actions=2,
        max_completion_tokens=96,
        max_turn_tokens=32,
        answer_tokens=8,
        cot_fraction=0.5,
    )
    questions = [
        {"question_id": f"q{i}", "question": f"Where is town {i}?", "gold_answers": ["Norsland"]} for i in range(4)
    ]
    seen = []

    def factory(trainer):
        seen.append(trainer.args.shuffle_dataset)
        return nullcontext(Scripted(trainer.processing_class))

    res = train_grpo(
        tiny_model,
        questions,
        tmp_path / "rl",
        settings,
        search=lambda qs: [("r", ["p"])] * len(qs),
        simulated_fraction=0.5,
        engine_factory=factory,
    )
    assert seen == [False, False]
    # each TRL generation batch: 1 CoT question x 2 samples (no search) + 1 CoA question x 2 samples
    assert [c["cot_trajectories"] for c in res.cost] == [2, 2]
    assert [c["trajectories"] for c in res.cost] == [4, 4]
    sim, real = res.cost
    assert sim["search_calls"] == 0 and sim["simulated_observations"] == 2
    assert real["search_calls"] == 2 and real["simulated_observations"] == 0


# -- item 11: RL memory: micro-batch, accumulation, checkpointing ----------------------------------------------
def test_item11_rl_config_passes_micro_batch_accumulation_and_checkpointing_to_trl(tmp_path):
    config = RlConfig(questions_per_step=3, num_generations=2, micro_batch=2, grad_accum=3, gradient_checkpointing=True)
    args = grpo_config(config.settings(4), tmp_path, max_context=256)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 3)
    assert args.gradient_checkpointing is True
    # one TRL generation batch is exactly one optimizer step's 3 x 2 completions
    assert (args.generation_batch_size, args.steps_per_generation) == (6, 3)
    with pytest.raises(ValueError, match="must equal questions_per_step x num_generations"):
        batch_layout(RlConfig(questions_per_step=3, num_generations=2, micro_batch=4).settings(4))
    with pytest.raises(ValueError, match="num_processes=8 but this run has 1"):
        grpo_config(
            RlConfig(questions_per_step=4, num_generations=2, num_processes=8).settings(4), tmp_path, max_context=256
        )


def test_item11_paper_profile_satisfies_trl_batch_rules(tmp_path, monkeypatch):
    import yaml
    from transformers import TrainingArguments

    cfg = yaml.safe_load((REPO_ROOT / "configs" / "paper.yaml").read_text())["ops"]["sft123_rl12_checkpoint"]["config"]
    settings = RlConfig(**cfg).settings(96)
    assert settings.gradient_checkpointing and settings.num_processes == 8
    assert batch_layout(settings) == (2, 15)
    # TRL's GRPOConfig rules, as an 8-process launch sees them (vLLM off: this machine has no GPU)
    monkeypatch.setattr("training.grpo.launched_processes", lambda: 8)
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 8))
    args = grpo_config(replace(settings, use_vllm=False), tmp_path, max_context=9000)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * 8 == 240 == 48 * 5
    assert args.generation_batch_size == 240 and args.steps_per_generation == 15
    assert args.generation_batch_size % args.num_generations == 0 and args.gradient_checkpointing
