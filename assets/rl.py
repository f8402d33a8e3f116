"""RL stage: the GRPO checkpoints of the paper's Table 1 (simulated environment, real environment, or both)."""

import json
import math
from pathlib import Path

import dagster as dg
import pyarrow as pa
from pydantic import Field

from agent.engines import resolve_model
from agent.rollout import search_tool
from assets.pairs import NOT_MATERIALISED, _table
from assets.sft import _checkpoint_of, _loss_plot
from pipelines.metadata import markdown_table, table_metadata
from pipelines.resources import SearchEngineResource
from pipelines.storage import StorageResource
from training.grpo import GrpoSettings, train_grpo
from training.grpo_rollout import PAPER_SIMULATED_FRACTION

GROUP = "rl"
MANIFEST = pa.schema([
    ("path", pa.string()), ("stage", pa.string()), ("start_model", pa.string()), ("steps", pa.int32()),
    ("simulated_steps", pa.int32()), ("simulated_fraction", pa.float64()), ("questions", pa.int32()),
    ("reward_first", pa.float64()), ("reward_last", pa.float64()), ("search_calls", pa.int64()),
    ("simulated_observations", pa.int64()), ("generated_tokens", pa.int64()), ("environment_tokens", pa.int64()),
    ("trajectories", pa.int64()), ("wall_seconds", pa.float64())])


class RlConfig(dg.Config):
    base_model: str = Field("embedded", description="Start model of rl_stage2_only (paper: deepseek-ai/DeepSeek-R1-Distill-Qwen-7B).")
    max_steps: int = Field(2, description="GRPO steps (paper: 96; embedded: a handful, minutes on CPU).")
    extra_steps_base: float = Field(1.5, description="rl_stage2_only gets this many times max_steps (paper: 50% more).")
    simulated_fraction: float = Field(PAPER_SIMULATED_FRACTION, description=(
        "RL-1+2 (sft123_rl12): share of the steps in the simulated environment, the rest real (paper: 80 of 96)."))
    questions: int = Field(8, description="Training questions drawn from question_sample (paper: the HotpotQA RL set).")
    learning_rate: float = Field(1e-6, description="Learning rate (paper: 7e-7).")
    questions_per_step: int = Field(2, description="Questions per step (paper: 48).")
    num_generations: int = Field(2, description="Samples per question, GRPO's group (paper: 5).")
    beta: float = Field(0.001, description="KL coefficient, low-variance k3 estimator (paper: 0.001).")
    temperature: float = Field(0.6, description="Sampling temperature (paper: 0.6).")
    max_actions: int = Field(3, description="T: searches per trajectory (paper: 10).")
    max_completion_tokens: int = Field(160, description="Response budget (paper: 8192).")
    max_turn_tokens: int = Field(48, description="Tokens per generation call between actions.")
    use_vllm: bool = Field(False, description="TRL's colocated vLLM for generation (GPU only).")
    lora_r: int = Field(0, description="LoRA rank; 0 = full fine-tuning.")
    seed: int = Field(0, description="Seed of the question draw, sampling and training.")

    def settings(self, steps: int) -> GrpoSettings:
        lora = {"r": self.lora_r, "lora_alpha": 2 * self.lora_r, "target_modules": "all-linear"} if self.lora_r else None
        return GrpoSettings(max_steps=steps, learning_rate=self.learning_rate, questions_per_step=self.questions_per_step,
                            num_generations=self.num_generations, beta=self.beta, temperature=self.temperature,
                            max_actions=self.max_actions, max_completion_tokens=self.max_completion_tokens,
                            max_turn_tokens=self.max_turn_tokens, use_vllm=self.use_vllm, lora=lora, seed=self.seed)


def _questions(storage: StorageResource, config: RlConfig) -> list[dict]:
    """A seeded draw of the training sample (both pools): the RL prompts, never evaluation questions."""
    import random

    sample = _table(storage, "question_sample")
    if sample is None:
        raise dg.Failure("RL: question_sample is not materialised yet")
    rows = sorted(sample.select(["id", "question", "answers"]).to_pylist(), key=lambda r: r["id"])
    rows = [r for r in rows if r["answers"]]
    picked = random.Random(config.seed).sample(rows, min(config.questions, len(rows)))
    if len(picked) < config.questions_per_step:
        raise dg.Failure(f"RL: question_sample has {len(picked)} usable questions, fewer than questions_per_step="
                         f"{config.questions_per_step}")
    return [{"question_id": r["id"], "question": r["question"], "gold_answers": list(r["answers"])} for r in picked]


def _train(context, config: RlConfig, storage: StorageResource, search_engine: SearchEngineResource, *, asset: str,
           start: str, fraction: float, steps: int) -> dg.Output:
    questions = _questions(storage, config)
    search = search_tool(search_engine.get_engine(), 3) if fraction < 1.0 else None
    simulated = round(fraction * steps)
    context.log.info("%s: GRPO from %s, %d steps (%d simulated, %d real), %d questions x %d samples per step", asset,
                     start, steps, simulated, steps - simulated, config.questions_per_step, config.num_generations)
    result = train_grpo(start, questions, storage.artifact_dir(asset), config.settings(steps), search=search,
                        simulated_fraction=fraction, data_version=f"question_sample:{len(questions)}",
                        stage=asset.replace("_checkpoint", ""))
    totals = result.cost_totals
    curve = result.reward_curve
    row = {"path": result.path, "stage": asset.replace("_checkpoint", ""), "start_model": start, "steps": result.steps,
           "simulated_steps": result.simulated_steps, "simulated_fraction": fraction, "questions": len(questions),
           "reward_first": curve[0] if curve else float("nan"), "reward_last": curve[-1] if curve else float("nan"),
           **{k: int(totals.get(k, 0)) for k in ("search_calls", "simulated_observations", "generated_tokens",
                                                  "environment_tokens", "trajectories")},
           "wall_seconds": result.wall_seconds}
    table = pa.Table.from_pylist([row], schema=MANIFEST)
    context.log.info("%s: %d steps in %.0fs; real search calls %d, simulated observations %d, generated tokens %d",
                     asset, result.steps, result.wall_seconds, row["search_calls"], row["simulated_observations"],
                     row["generated_tokens"])
    cost_cols = ["step", "mode", "trajectories", "search_calls", "simulated_observations", "generated_tokens",
                 "environment_tokens", "wall_seconds"]
    md = {**table_metadata(table), "checkpoint": dg.MetadataValue.path(result.path), "steps": result.steps,
          "simulated_steps": result.simulated_steps, "real_steps": result.steps - result.simulated_steps,
          "real_search_calls": row["search_calls"], "simulated_observations": row["simulated_observations"],
          "generated_tokens": row["generated_tokens"], "wall_seconds": round(result.wall_seconds, 2),
          "cost_totals": dg.MetadataValue.json(totals),
          "cost_per_step": dg.MetadataValue.md(markdown_table(result.cost, cost_cols)),
          "reward_curve": _loss_plot({"reward": curve, **{f"reward/{k}": v for k, v in result.reward_components.items()},
                                      "kl": result.kl_curve}, f"{asset.replace('_checkpoint', '')} GRPO")}
    return dg.Output(table, metadata=md)


@dg.asset(group_name=GROUP, kinds={"pytorch", "safetensors"}, deps=["question_sample", "search_index"])
def rl_stage2_only_checkpoint(context: dg.AssetExecutionContext, config: RlConfig, storage: StorageResource,
                              search_engine: SearchEngineResource) -> dg.Output[pa.Table]:
    """Ablation (Table 1): GRPO in the real environment straight from the base model with the in-context CoA prompt."""
    start = resolve_model(config.base_model, storage.artifact_dir("models"))[0]
    return _train(context, config, storage, search_engine, asset="rl_stage2_only_checkpoint", start=start, fraction=0.0,
                  steps=max(1, round(config.max_steps * config.extra_steps_base)))


@dg.asset(group_name=GROUP, kinds={"pytorch", "safetensors"}, deps=["sft_stage3_checkpoint", "question_sample"])
def sft123_rl1_checkpoint(context: dg.AssetExecutionContext, config: RlConfig, storage: StorageResource,
                          search_engine: SearchEngineResource) -> dg.Output[pa.Table]:
    """RL-1 from SFT-3: GRPO in the simulated environment, the policy writing its own search results (no real call)."""
    return _train(context, config, storage, search_engine, asset="sft123_rl1_checkpoint",
                  start=_checkpoint_of(storage, "sft_stage3_checkpoint"), fraction=1.0, steps=config.max_steps)


@dg.asset(group_name=GROUP, kinds={"pytorch", "safetensors"}, deps=["sft_stage3_checkpoint", "question_sample", "search_index"])
def sft123_rl12_checkpoint(context: dg.AssetExecutionContext, config: RlConfig, storage: StorageResource,
                           search_engine: SearchEngineResource) -> dg.Output[pa.Table]:
    """RL-1 then RL-2 from SFT-3: one GRPO run, simulated for the configured share of steps, then real search."""
    return _train(context, config, storage, search_engine, asset="sft123_rl12_checkpoint",
                  start=_checkpoint_of(storage, "sft_stage3_checkpoint"), fraction=config.simulated_fraction,
                  steps=config.max_steps)


@dg.asset(group_name=GROUP, kinds={"pytorch", "safetensors"}, deps=["sft_stage2_checkpoint", "question_sample", "search_index"])
def sft12_rl2_checkpoint(context: dg.AssetExecutionContext, config: RlConfig, storage: StorageResource,
                         search_engine: SearchEngineResource) -> dg.Output[pa.Table]:
    """RL-2 from SFT-2 (no world-model stage): GRPO in the real environment."""
    return _train(context, config, storage, search_engine, asset="sft12_rl2_checkpoint",
                  start=_checkpoint_of(storage, "sft_stage2_checkpoint"), fraction=0.0, steps=config.max_steps)


RL_CHECKPOINTS = ["rl_stage2_only_checkpoint", "sft123_rl1_checkpoint", "sft123_rl12_checkpoint", "sft12_rl2_checkpoint"]


def _meta(storage: StorageResource, asset: str) -> tuple[dict, dict] | None:
    manifest = _table(storage, asset)
    if manifest is None:
        return None
    row = manifest.to_pylist()[0]
    return row, json.loads((Path(row["path"]) / "meta.json").read_text())


def _build_checks(asset: str):
    @dg.asset_check(asset=asset, name="loads_with_finite_logs", blocking=True, description=(
        "The checkpoint loads back with transformers and its reward, per-component reward, KL and loss logs are finite."))
    def loads_with_finite_logs(storage: StorageResource) -> dg.AssetCheckResult:
        from transformers import AutoModelForCausalLM

        found = _meta(storage, asset)
        if found is None:
            return NOT_MATERIALISED
        row, meta = found
        model = AutoModelForCausalLM.from_pretrained(row["path"])
        curves = {"reward": meta["reward_curve"], "kl": meta["kl_curve"], "loss": meta["loss_curve"],
                  **{f"reward/{k}": v for k, v in meta["reward_components"].items()}}
        bad = {k: v for k, v in curves.items() if not all(math.isfinite(x) for x in v)}
        empty = [k for k in ("reward", "kl") if not curves[k]]
        return dg.AssetCheckResult(passed=not bad and not empty, metadata={
            "parameters": sum(p.numel() for p in model.parameters()), "non_finite": ", ".join(bad) or "none",
            "empty_logs": ", ".join(empty) or "none", "reward_last": curves["reward"][-1] if curves["reward"] else -1.0,
            "kl_last": curves["kl"][-1] if curves["kl"] else -1.0})

    @dg.asset_check(asset=asset, name="real_calls_match_the_regime", blocking=True, description=(
        "Real search calls happen only in real-environment steps (none at all for RL-1) and simulated results only in simulated ones."))
    def real_calls_match_the_regime(storage: StorageResource) -> dg.AssetCheckResult:
        found = _meta(storage, asset)
        if found is None:
            return NOT_MATERIALISED
        _, meta = found
        cost = meta["cost"]
        sim_calls = sum(c["search_calls"] for c in cost if c["mode"] == "simulated")
        real_obs = sum(c["simulated_observations"] for c in cost if c["mode"] == "real")
        real_batches = [c for c in cost if c["mode"] == "real"]
        # a real batch where the policy never opened an action makes no call: that is not a regime error
        actions_real = sum(c["search_calls"] for c in real_batches)
        expected_real = meta["steps"] - meta["simulated_steps"]
        ok = sim_calls == 0 and real_obs == 0 and (expected_real == 0) == (not real_batches)
        return dg.AssetCheckResult(passed=ok, metadata={
            "simulated_steps": meta["simulated_steps"], "real_steps": expected_real,
            "search_calls_in_simulated_steps": sim_calls, "simulated_observations_in_real_steps": real_obs,
            "real_batches": len(real_batches), "search_calls_in_real_steps": actions_real})

    return [loads_with_finite_logs, real_calls_match_the_regime]


rl_checks = [c for a in RL_CHECKPOINTS for c in _build_checks(a)]
