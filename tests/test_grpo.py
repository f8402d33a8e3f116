"""The RL layer: the reward on tricky completions, the TRL rollout_func (token-aligned ids, env_mask and
log-probs in the simulated and the real environment), and a 2-step GRPO run on a tiny random Llama that
switches from the simulated to the real environment."""

import json
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from types import SimpleNamespace

import pytest

from agent.engine_api import cut_at_stop
from agent.protocol import OBS_CLOSE
from agent.rollout import FORCE_ANSWER, FORCE_BOX, SEARCH_LIMIT, RolloutConfig, render_observation
from training.grpo_rollout import CostLedger, SimulationSchedule, check_groups, make_rollout_func
from training.rewards import (
    COMPONENTS,
    RewardSettings,
    breakdowns,
    score_completion,
    think_left_open,
    trl_reward_funcs,
    trl_reward_weights,
)

GOLD = ["Norsland"]


# -- reward ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "completion,think_open,want",
    [
        # well-formed, prefilled <think>: full marks
        (" I know it.</think>\n\nThe answer is \\boxed{Norsland}.", True, dict(em=1.0, total=1.0)),
        # a boxed guess inside the reasoning does not count, the one after </think> does
        (" maybe \\boxed{Brivia}? no.</think> \\boxed{Norsland}", True, dict(em=1.0, total=1.0)),
        (" it is \\boxed{Norsland}.</think> I am not sure.", True, dict(em=0.0, no_answer=-0.2, total=-0.2)),
        # nested braces inside the box; case, articles and punctuation are normalised away
        ("</think> \\boxed{The {Norsland}}", True, dict(em=1.0, total=1.0)),
        ("</think> \\boxed{ the NORSLAND! }", True, dict(em=1.0, total=1.0)),
        # the reasoning never closes: the answer still counts (the evaluation grades it too) but is penalised
        (" so \\boxed{Norsland}", True, dict(em=1.0, missing_think=-0.2, total=0.8)),
        # no prefill and no <think>: only missing_think, the lone </think> is not also "unbalanced"
        (" Norsland.</think> \\boxed{Norsland}", False, dict(em=1.0, missing_think=-0.2, total=0.8)),
        # unbalanced action tags: nested, stray closer, a search after </think>
        (
            " <begin_search> a <begin_search> b </end_search></think> \\boxed{Norsland}",
            True,
            dict(em=1.0, unbalanced=-0.2, total=0.8),
        ),
        (" x </search_result> y</think> \\boxed{Norsland}", True, dict(em=1.0, unbalanced=-0.2, total=0.8)),
        (" x</think> <begin_search> q </end_search> \\boxed{Norsland}", True, dict(em=1.0, unbalanced=-0.2, total=0.8)),
        # an empty or unclosed box is no answer
        (" x</think> \\boxed{}", True, dict(em=0.0, no_answer=-0.2, total=-0.2)),
        (" x</think> \\boxed{Norsland", True, dict(em=0.0, no_answer=-0.2, total=-0.2)),
        # the environment refused an action over the budget (counted from its notice in the text)
        (
            f" <begin_search> q </end_search>{render_observation(SEARCH_LIMIT)}{FORCE_ANSWER}Norsland}}",
            True,
            dict(em=1.0, over_budget=-0.2, total=0.8),
        ),
        # everything wrong at once
        (" <begin_search> q", True, dict(em=0.0, missing_think=-0.2, unbalanced=-0.2, no_answer=-0.2, total=-0.6)),
    ],
)
def test_reward_components(completion, think_open, want):
    b = score_completion(completion, GOLD, think_open=think_open)
    expected = {name: 0.0 for name in COMPONENTS} | {"total": 0.0} | want
    assert {k: getattr(b, k) for k in expected} == pytest.approx(expected)


def test_refused_actions_from_the_trajectory_and_custom_magnitudes():
    text = " x</think> \\boxed{Norsland}"
    settings = RewardSettings(em_weight=2.0, over_budget=0.5)
    b = score_completion(text, GOLD, think_open=True, refused_actions=1, settings=settings)
    assert (b.em, b.over_budget, b.total) == (1.0, -0.5, 1.5)
    with pytest.raises(ValueError, match="RewardSettings.unbalanced"):
        RewardSettings(unbalanced=-1)


def test_think_prefill_is_read_from_the_prompt():
    shots = "<|im_start|>assistant\n<think>a</think> \\boxed{b}<|im_end|>\n"
    assert think_left_open(shots + "<|im_start|>assistant\n<think>")
    assert not think_left_open(shots + "<|im_start|>assistant\n")


def test_trl_reward_funcs_sum_to_the_total_and_need_gold():
    funcs = trl_reward_funcs()
    assert [f.__name__ for f in funcs] == list(COMPONENTS) and trl_reward_weights() == [1.0] * len(COMPONENTS)
    prompts = ["Q?<think>", "Q?<think>", "Q?"]
    # TRL decodes completions without special tokens; the rollout's exact text wins when given
    completions = ["ignored", " x</think> \\boxed{Brivia}", " x</think> \\boxed{Norsland}"]
    kwargs = dict(
        gold_answers=[GOLD, GOLD, ["Norsland", "Norsland Republic"]],
        completion_text=[" x</think> \\boxed{norsland}", completions[1], completions[2]],
    )
    per_func = [f(prompts, completions, **kwargs) for f in funcs]
    totals = [sum(col) for col in zip(*per_func)]
    assert totals == pytest.approx([b.total for b in breakdowns(prompts, completions, **kwargs)])
    assert totals == pytest.approx([1.0, 0.0, 0.8])  # the last prompt opened no <think>
    with pytest.raises(KeyError, match="gold_answers"):
        funcs[0](prompts, completions)


# -- rollout_func ---------------------------------------------------------------------------------
def fake_logprob(position: int, token: int) -> float:
    return -((position * 31 + token) % 97) / 10


class Scripted:
    """Searches ``actions`` times, then answers (alternating right/wrong within a batch); reports
    log-probs that depend only on (position, token), as a real policy's depend only on the prefix."""

    name = "scripted"

    def __init__(self, tok, actions: int, logprobs: bool = True):
        self.tokenizer, self.actions, self.with_logprobs = tok, actions, logprobs

    def script(self, prompt_ids, stop, index):
        text = self.tokenizer.decode(prompt_ids)
        turn = text[text.rfind("<|im_start|>assistant") :]
        done = turn.count("</end_search>")
        if OBS_CLOSE in stop:
            return " Valdren is a town in Norsland. </search_result>"
        if done < self.actions:
            return f" I look it up. <begin_search> query {done} </end_search> junk"
        answer = "Norsland" if index % 2 == 0 else "Brivia"
        return f" So {answer}.</think>\n\nThe answer is \\boxed{{{answer}}}"

    def generate(self, requests, prefixes=None):
        out = []
        for k, r in enumerate(requests):
            head = prefixes[k] if prefixes else []
            tok = self.tokenizer
            ids = head + tok.encode(self.script(r.prompt_ids + head, r.stop, k), add_special_tokens=False)
            res = cut_at_stop(ids + [tok.eos_token_id], tok.decode, r.stop, {tok.eos_token_id}, r.max_new_tokens)
            if self.with_logprobs:
                res.meta["logprobs"] = [fake_logprob(len(r.prompt_ids) + j, t) for j, t in enumerate(res.token_ids)]
            out.append(res)
        return out


def fake_trainer(tok, step=0, num_generations=2):
    return SimpleNamespace(
        state=SimpleNamespace(global_step=step), num_generations=num_generations, processing_class=tok, model=None
    )


def prompts_for(n_questions, g):
    return [
        f"<|im_start|>user\nQuestion {i}?<|im_end|>\n<|im_start|>assistant\n<think>"
        for i in range(n_questions)
        for _ in range(g)
    ]


def expected_mask(tok, out, i, traj_spans_of):
    """1 everywhere but observation blocks and the environment's forced-answer prompt."""
    n = len(out["completion_ids"][i])
    mask = [1] * n
    for kind, start, end in traj_spans_of(i):
        if kind == "observation":
            mask[start:end] = [0] * (end - start)
        if kind == "forced":
            forced = tok.decode(out["completion_ids"][i][start:end])
            prefix = FORCE_ANSWER if forced.startswith(FORCE_ANSWER) else FORCE_BOX
            k = len(tok.encode(prefix, add_special_tokens=False))
            mask[start : start + k] = [0] * k
    return mask


@pytest.mark.parametrize("simulated", [True, False])
def test_rollout_func_returns_aligned_ids_masks_and_logprobs(embedded_tokenizer, simulated, monkeypatch):
    tok = embedded_tokenizer
    calls = []

    def search(queries):
        calls.extend(queries)
        return [(f'result 1: "Doc"\nabout {q}', [f"p-{q}"]) for q in queries]

    spans, sampled = {}, {}
    ledger = CostLedger()
    engine = Scripted(tok, actions=3)
    rf = make_rollout_func(
        search=search,
        schedule=lambda step: simulated,
        ledger=ledger,
        # the (T+1)-th action refused, so refused_actions is exercised too
        rollout_config=RolloutConfig(max_actions=2, max_context=1024, seed=1, after_last_action="refuse"),
        engine_factory=lambda trainer: nullcontext(engine),
    )
    # keep the trajectories' spans to check the mask against them independently of policy_mask
    import training.grpo_rollout as gr

    original = gr.rollout_outputs

    def spy(trajs, prompts, recorder, mask_sim):
        for i, t in enumerate(trajs):
            spans[i] = [(s.kind, s.start - t.prompt_len, s.end - t.prompt_len) for s in t.spans]
            sampled[i] = t.policy_mask[t.prompt_len :]
        return original(trajs, prompts, recorder, mask_sim)

    monkeypatch.setattr(gr, "rollout_outputs", spy)
    out = rf(prompts_for(2, 3), fake_trainer(tok, step=5, num_generations=3))
    assert len(out["completion_ids"]) == 6 and out["simulated"] == [simulated] * 6
    for i in range(6):
        ids, mask, lp = out["completion_ids"][i], out["env_mask"][i], out["logprobs"][i]
        assert len(ids) == len(mask) == len(lp) > 0
        assert mask == expected_mask(tok, out, i, spans.get)
        # the sampled log-prob on every token the policy sampled (simulated result bodies included,
        # though they are masked from the loss), 0.0 on the environment's
        assert lp == [
            fake_logprob(len(out["prompt_ids"][i]) + j, t) if m else 0.0
            for j, (t, m) in enumerate(zip(ids, sampled[i]))
        ]
        assert (sampled[i] == mask) is (not simulated)
        assert tok.decode(out["prompt_ids"][i]).endswith("<think>") and out["think_open"][i]
        assert out["refused_actions"][i] == 1 and out["n_actions"][i] == 2
        text = tok.decode(ids)
        assert text == out["completion_text"][i] and SEARCH_LIMIT in text
        obs = [(s, e) for k, s, e in spans[i] if k == "observation"]
        if not simulated:
            assert all(tok.decode(ids[s:e]).startswith("\n<search_result>\nresult 1") for s, e in obs[:2])
    rec = ledger.records[0]
    assert rec.step == 5 and rec.trajectories == 6 and rec.distinct_prompts == 2
    if simulated:
        assert calls == [] and rec.mode == "simulated" and rec.search_calls == 0 and rec.simulated_observations == 12
    else:
        assert len(calls) == 12 == rec.search_calls and rec.mode == "real" and rec.simulated_observations == 0
    assert rec.trained_tokens == sum(map(sum, out["env_mask"])) and rec.refused_actions == 6


def test_rollout_func_without_engine_logprobs_returns_none(embedded_tokenizer):
    tok = embedded_tokenizer
    rf = make_rollout_func(engine_factory=lambda trainer: nullcontext(Scripted(tok, 1, logprobs=False)))
    out = rf(prompts_for(1, 2), fake_trainer(tok))
    assert out["logprobs"] is None and len(out["completion_ids"]) == 2


def test_rollout_func_checks_trl_prompt_layout_and_search(embedded_tokenizer):
    tok = embedded_tokenizer
    rf = make_rollout_func(engine_factory=lambda trainer: nullcontext(Scripted(tok, 1)))
    with pytest.raises(RuntimeError, match="RepeatSampler layout"):
        rf(["a", "b", "a", "b"], fake_trainer(tok))
    with pytest.raises(RuntimeError, match="not a multiple"):
        rf(["a", "a", "a"], fake_trainer(tok))
    real = make_rollout_func(schedule=lambda step: False, engine_factory=lambda t: nullcontext(Scripted(tok, 1)))
    with pytest.raises(ValueError, match="search"):
        real(prompts_for(1, 2), fake_trainer(tok))
    assert check_groups(["a", "a", "b", "b"], 2) == 2


def test_simulation_schedule():
    paper = SimulationSchedule.from_fraction(80 / 96, 96)
    assert paper.simulated_steps == 80 and paper(79) and not paper(80)
    # a short two-phase run keeps a real step (80/96 of 2 would round to 2 simulated, 0 real) and a simulated one
    assert SimulationSchedule.from_fraction(80 / 96, 2).simulated_steps == 1
    assert SimulationSchedule.from_fraction(0.05, 3).simulated_steps == 1
    assert [SimulationSchedule.from_fraction(f, 4).simulated_steps for f in (0.0, 1.0)] == [0, 4]
    assert SimulationSchedule.from_fraction(0.5, 1).simulated_steps in (0, 1)
    with pytest.raises(ValueError, match="simulated_fraction"):
        SimulationSchedule.from_fraction(1.5, 10)


# -- GRPO end to end ------------------------------------------------------------------------------
torch = pytest.importorskip("torch")


QUESTIONS = [
    {"question_id": "q0", "question": "Where is Valdren?", "gold_answers": ["Norsland"]},
    {
        "question_id": "q1",
        "question": "Which country is Valdren in?",
        "gold_answers": ["Norsland", "Norsland Republic"],
    },
]


def test_grpo_switches_from_simulated_to_real_and_updates_the_policy(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from training.grpo import GrpoSettings, train_grpo
    from training.grpo_rollout import policy_engine

    searched = []

    def search(queries):
        searched.extend(queries)
        return [(f'result 1: "Valdren"\nValdren is a town in Norsland ({q}).', ["p1"]) for q in queries]

    live = []

    @contextmanager
    def live_then_scripted(trainer):
        """The live policy samples the first tokens of every turn, the script writes the protocol (a random
        tiny model never would), so rewards differ within each group and the rollout searches."""
        with policy_engine(trainer) as engine:
            assert engine.model is trainer.accelerator.unwrap_model(trainer.model) and not engine.model.training
            script = Scripted(engine.tokenizer, actions=1, logprobs=False)

            class Hybrid:
                name, tokenizer = "hybrid", engine.tokenizer

                def generate(self, requests):
                    firsts = engine.generate([replace(r, max_new_tokens=2, stop=()) for r in requests])
                    heads = [r.token_ids for r in firsts]
                    live.extend(heads)
                    return script.generate(requests, prefixes=heads)

            yield Hybrid()
        assert trainer.model.training  # the trainer's mode is restored after the rollout

    settings = GrpoSettings(
        max_steps=2,
        learning_rate=1e-3,
        questions_per_step=2,
        num_generations=2,
        max_actions=3,
        max_completion_tokens=160,
        max_turn_tokens=48,
        answer_tokens=8,
        beta=0.001,
    )
    with pytest.raises(ValueError, match="need a `search`"):
        train_grpo(tiny_model, QUESTIONS, tmp_path / "x", settings, simulated_fraction=0.5)
    out = tmp_path / "rl"
    res = train_grpo(
        tiny_model, QUESTIONS, out, settings, search=search, simulated_fraction=0.5, engine_factory=live_then_scripted
    )

    assert res.steps == 2 and res.simulated_steps == 1 and live
    sim, real = res.cost
    # TRL handed the rollout one prompt per completion: 2 questions x 2 samples, 2 distinct prompts
    assert (sim["trajectories"], sim["distinct_prompts"], real["trajectories"]) == (4, 2, 4)
    assert sim["mode"] == "simulated" and sim["search_calls"] == 0 and sim["simulated_observations"] == 4
    assert real["mode"] == "real" and real["search_calls"] == len(searched) == 4
    assert res.cost_totals["search_calls"] == 4 and res.cost_totals["simulated_batches"] == 1
    assert len(res.reward_curve) == 2 and len(res.kl_curve) == 2
    assert set(res.reward_components) == set(COMPONENTS) and all(len(v) == 2 for v in res.reward_components.values())
    # half of each group answers right: EM 0.5 on average, and the advantages were not all zero
    assert res.reward_components["em"] == pytest.approx([0.5, 0.5])
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["root_model"] == tiny_model and meta["simulated_steps"] == 1 and len(meta["cost"]) == 2
    assert meta["settings"]["num_generations"] == 2 and meta["cost_totals"]["trajectories"] == 8
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
