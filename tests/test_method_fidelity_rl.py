"""Method fidelity, RL (issue 12 items 6, 7, 11): RL questions disjoint from SFT and evaluation, pure CoT in
the RL prompts rolled out with the tool off, and the RL batch layout (micro-batch, accumulation, checkpointing)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from types import SimpleNamespace

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agent.engines import cut_at_stop
from agent.protocol import OBS_CLOSE
from agent.rollout import RolloutConfig
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
from pipelines.paths import REPO_ROOT, table_path
from pipelines.storage import StorageResource
from qadata.text import normalise_question
from training.grpo import PAPER_COT_FRACTION, GrpoSettings, batch_layout, cot_per_step, grpo_config, step_rows
from training.grpo_rollout import CostLedger, make_rollout_func


# -- item 6: RL questions disjoint from SFT (and evaluation) questions -----------------------------------------
@pytest.fixture(scope="module")
def small_data():
    """A small generated world, its hotpotqa_raw and a 40-question sample, by direct asset invocation."""
    world = embedded_world(dg.build_asset_context(), EmbeddedWorldConfig(people=300, works=300, orgs=60, places=80,
                                                                         questions=200)).value
    raw = next(iter(hotpotqa_raw(dg.build_asset_context(), HotpotqaRawConfig(), world))).value
    sample = question_sample(dg.build_asset_context(), QuestionSampleConfig(total=40), raw).value
    return raw, sample


def _check(home, pool, sample, raw):
    return rl_questions_disjoint_from_sft(dg.build_asset_check_context(instance=dg.DagsterInstance.ephemeral()),
                                          StorageResource(home=str(home)), pool, sample, raw)


def test_item6_rl_pool_is_disjoint_from_sft_and_evaluation_and_the_check_blocks_an_overlap(small_data, tmp_path):
    raw, sample = small_data
    home = tmp_path / "home"
    # an SFT table on disk naming a training question that question_sample no longer holds (a redrawn sample)
    spare = sorted(r["id"] for r in raw.select(["id", "split"]).to_pylist()
                   if r["split"] == "train" and r["id"] not in set(sample.column("id").to_pylist()))[0]
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
    check = _check(home, pool, sample, raw)
    assert check.passed and check.metadata["overlap_sft"].value == 0

    # a pool sharing one question with the SFT sample and one with evaluation fails the check, which is blocking
    dev = next(r for r in raw.to_pylist() if r["split"] == "dev")
    leaked = pa.concat_tables([pool, pa.Table.from_pylist(
        [{k: r.get(k) for k in pool.schema.names} | {"stratum": "x/y"}
         for r in (sample.to_pylist()[0], dev)], schema=pool.schema)])
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
            turn = text[text.rfind("<|im_start|>assistant"):]
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


def _prompt(kind, i):
    return f"<|im_start|>user\n[{kind}] Question {i}?<|im_end|>\n<|im_start|>assistant\n<think>"


def test_item7_cot_rows_roll_out_with_the_tool_off_and_coa_rows_with_it_on(embedded_tokenizer):
    tok = embedded_tokenizer
    modes = {_prompt("cot", 0): "cot", _prompt("coa", 1): "coa", _prompt("coa", 2): "coa"}
    prompts = [p for p in modes for _ in range(2)]  # TRL's layout: each prompt num_generations times in a row
    calls, ledger = [], CostLedger()

    def search(queries):
        calls.extend(queries)
        return [(f'result 1: "Valdren"\nValdren is a town in Norsland ({q}).', ["p1"]) for q in queries]

    rf = make_rollout_func(search=search, schedule=lambda step: False, ledger=ledger, prompt_modes=modes,
                           rollout_config=RolloutConfig(max_actions=2, max_context=512, seed=0),
                           engine_factory=lambda trainer: nullcontext(Scripted(tok)))
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
        rf([_prompt("cot", 9)] * 2, trainer)


@pytest.mark.parametrize("per_step,fraction,steps,pool", [(48, PAPER_COT_FRACTION, 96, 4608), (2, 0.5, 3, 5),
                                                          (5, 0.2, 7, 12)])
def test_item7_every_step_holds_the_configured_cot_share(per_step, fraction, steps, pool):
    questions = [{"question_id": f"q{i}", "question": f"Q{i}?", "gold_answers": ["a"]} for i in range(pool)]
    settings = GrpoSettings(max_steps=steps, questions_per_step=per_step, num_generations=2, cot_fraction=fraction)
    plan = step_rows(questions, settings)
    assert len(plan) == steps * per_step
    want = cot_per_step(settings)
    assert want == round(fraction * per_step) and (per_step != 48 or want == 8)  # paper: 8 of 48, the SFT 1:5
    for s in range(steps):
        block = plan[s * per_step: (s + 1) * per_step]
        assert sum(mode == "cot" for _, mode in block) == want
        assert len({q["question_id"] for q, _ in block}) == per_step  # no question twice in one step
    # every question is used once before any is used again
    first = [q["question_id"] for q, _ in plan[: pool // per_step * per_step]]
    assert len(set(first)) == len(first)
    if steps * per_step <= pool:
        assert len({q["question_id"] for q, _ in plan}) == steps * per_step


def test_item7_trl_trains_each_step_on_its_block_with_the_cot_share(tiny_model, tmp_path):
    from training.grpo import train_grpo

    settings = GrpoSettings(max_steps=2, learning_rate=1e-3, questions_per_step=2, num_generations=2, max_actions=2,
                            max_completion_tokens=96, max_turn_tokens=32, answer_tokens=8, cot_fraction=0.5)
    questions = [{"question_id": f"q{i}", "question": f"Where is town {i}?", "gold_answers": ["Norsland"]}
                 for i in range(4)]
    seen = []

    def factory(trainer):
        seen.append(trainer.args.shuffle_dataset)
        return nullcontext(Scripted(trainer.processing_class))

    res = train_grpo(tiny_model, questions, tmp_path / "rl", settings, search=lambda qs: [("r", ["p"])] * len(qs),
                     simulated_fraction=0.5, engine_factory=factory)
    assert seen == [False, False]
    # each TRL generation batch: 1 CoT question x 2 samples (no search) + 1 CoA question x 2 samples
    assert [c["cot_trajectories"] for c in res.cost] == [2, 2]
    assert [c["trajectories"] for c in res.cost] == [4, 4]
    sim, real = res.cost
    assert sim["search_calls"] == 0 and sim["simulated_observations"] == 2
    assert real["search_calls"] == 2 and real["simulated_observations"] == 0


# -- item 11: RL memory: micro-batch, accumulation, checkpointing ----------------------------------------------
def test_item11_rl_config_passes_micro_batch_accumulation_and_checkpointing_to_trl(tmp_path):
    config = RlConfig(questions_per_step=3, num_generations=2, micro_batch=2, grad_accum=3,
                      gradient_checkpointing=True)
    args = grpo_config(config.settings(4), tmp_path, max_context=256)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 3)
    assert args.gradient_checkpointing is True
    # one TRL generation batch is exactly one optimizer step's 3 x 2 completions
    assert (args.generation_batch_size, args.steps_per_generation) == (6, 3)
    with pytest.raises(ValueError, match="must equal questions_per_step x num_generations"):
        batch_layout(RlConfig(questions_per_step=3, num_generations=2, micro_batch=4).settings(4))
    with pytest.raises(ValueError, match="num_processes=8 but this run has 1"):
        grpo_config(RlConfig(questions_per_step=4, num_generations=2, num_processes=8).settings(4), tmp_path,
                    max_context=256)


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
