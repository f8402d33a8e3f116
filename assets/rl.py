"""RL stage: the GRPO checkpoints of the paper's Table 1 (simulated environment, real environment, or both)."""

import json
import math
from pathlib import Path

import dagster as dg
import pyarrow as pa
from pydantic import Field

from agent.engines import resolve_model
from agent.rollout import search_tool
from assets.metadata import markdown_table, table_metadata
from assets.resources import SearchEngineResource
from assets.sft import checkpoint_path, loss_plot
from assets.storage import StorageResource
from training.grpo import GrpoSettings, cot_per_step, train_grpo
from training.grpo_rollout import PAPER_SIMULATED_FRACTION

GROUP = "rl"
MANIFEST = pa.schema(
    [
        ("path", pa.string()),
        ("stage", pa.string()),
        ("start_model", pa.string()),
        ("steps", pa.int32()),
        ("simulated_steps", pa.int32()),
        ("simulated_fraction", pa.float64()),
        ("questions", pa.int32()),
        ("cot_per_step", pa.int32()),
        ("reward_first", pa.float64()),
        ("reward_last", pa.float64()),
        ("search_calls", pa.int64()),
        ("simulated_observations", pa.int64()),
        ("generated_tokens", pa.int64()),
        ("environment_tokens", pa.int64()),
        ("trajectories", pa.int64()),
        ("cot_trajectories", pa.int64()),
        ("wall_seconds", pa.float64()),
    ]
)


class RlConfig(dg.Config):
    base_model: str = Field(
        "embedded", description="Start model of rl_stage2_only (paper: deepseek-ai/DeepSeek-R1-Distill-Qwen-7B)."
    )
    max_steps: int = Field(2, description="GRPO steps (paper: 96; embedded: a handful, minutes on CPU).")
    extra_steps_base: float = Field(1.5, description="rl_stage2_only gets this many times max_steps (paper: 50% more).")
    simulated_fraction: float = Field(
        PAPER_SIMULATED_FRACTION,
        description=(
            "RL-1+2 (sft123_rl12): share of the steps in the simulated environment, the rest real (paper: 80 of 96)."
        ),
    )
    learning_rate: float = Field(1e-6, description="Learning rate (paper: 7e-7).")
    questions_per_step: int = Field(2, description="Questions per step (paper: 48).")
    num_generations: int = Field(2, description="Samples per question, GRPO's group (paper: 5).")
    cot_fraction: float = Field(
        0.5,
        description=(
            "Share of each step's questions prompted as pure CoT, rolled out with the tool off (paper profile: 1/6, the "
            "SFT mix's 1:5 CoT:CoA ratio, as the paper gives no RL share; embedded: one of the two questions per step)."
        ),
    )
    micro_batch: int | None = Field(
        None,
        description=(
            "Completions per forward/backward on each process, TRL's per_device_train_batch_size (None: the whole step; "
            "paper profile: 2, see README 'RL memory')."
        ),
    )
    grad_accum: int | None = Field(
        None,
        description=(
            "TRL's gradient_accumulation_steps (None: what completes the step); micro_batch x grad_accum x num_processes "
            "must equal questions_per_step x num_generations (paper: 2 x 15 x 8 = 240 = 48 x 5)."
        ),
    )
    num_processes: int = Field(
        1, description=("Processes (GPUs) the run is launched on; must be TRL's world size (paper: 8).")
    )
    gradient_checkpointing: bool = Field(
        False, description=("Recompute activations in the backward pass (paper profile: on).")
    )
    beta: float = Field(0.001, description="KL coefficient, low-variance k3 estimator (paper: 0.001).")
    temperature: float = Field(0.6, description="Sampling temperature (paper: 0.6).")
    max_actions: int = Field(5, description="T: searches per trajectory (4-hop questions need 4; paper: 10).")
    max_completion_tokens: int = Field(
        768, description="Response budget, search results included (embedded: four searches of k=2 fit; paper: 8192)."
    )
    max_turn_tokens: int = Field(96, description="Tokens per generation call between actions (as the evaluation).")
    use_vllm: bool = Field(False, description="TRL's colocated vLLM for generation (GPU only).")
    lora_r: int = Field(0, description="LoRA rank; 0 = full fine-tuning.")
    base_template_id: str | None = Field(
        None,
        description=(
            "CoA template of rl_stage2_only (RL from the untrained model, guided by in-context examples as in the paper); "
            "default: the few-shot template of the model's family. The chains after SFT use the plain agent instruction."
        ),
    )
    search_k: int = Field(2, description="Passages per real search (embedded 2, as the training data; paper 3).")
    seed: int = Field(0, description="Seed of the question order, the CoT/CoA split, sampling and training.")

    def settings(self, steps: int) -> GrpoSettings:
        lora = (
            {"r": self.lora_r, "lora_alpha": 2 * self.lora_r, "target_modules": "all-linear"} if self.lora_r else None
        )
        return GrpoSettings(
            max_steps=steps,
            learning_rate=self.learning_rate,
            questions_per_step=self.questions_per_step,
            num_generations=self.num_generations,
            beta=self.beta,
            temperature=self.temperature,
            max_actions=self.max_actions,
            max_completion_tokens=self.max_completion_tokens,
            max_turn_tokens=self.max_turn_tokens,
            use_vllm=self.use_vllm,
            lora=lora,
            seed=self.seed,
            cot_fraction=self.cot_fraction,
            micro_batch=self.micro_batch,
            grad_accum=self.grad_accum,
            num_processes=self.num_processes,
            gradient_checkpointing=self.gradient_checkpointing,
        )


def _questions(pool: pa.Table) -> list[dict]:
    """The RL prompts: every question of rl_questions (disjoint from SFT and evaluation), in id order."""
    rows = sorted(pool.select(["id", "question", "answers"]).to_pylist(), key=lambda r: r["id"])
    return [
        {"question_id": r["id"], "question": r["question"], "gold_answers": list(r["answers"])}
        for r in rows
        if r["answers"]
    ]


def _train(
    context,
    config: RlConfig,
    storage: StorageResource,
    search_engine: SearchEngineResource,
    pool: pa.Table,
    *,
    asset: str,
    start: str,
    fraction: float,
    steps: int,
) -> dg.Output:
    from agent.prompts import TEMPLATES, agent_template, template_for
    from training.sft import root_model

    root = Path(root_model(start)).name
    if asset == "rl_stage2_only_checkpoint":
        # RL from the untrained model: in-context examples guide it (the paper's RL-stage2-only baseline)
        template = TEMPLATES[config.base_template_id] if config.base_template_id else template_for("coa", root)
    else:  # a trained agent model is prompted as it is evaluated: the plain instruction, no examples
        template = agent_template(root)
    cot_template = template_for("cot", root, zero_shot=asset != "rl_stage2_only_checkpoint")
    questions = _questions(pool)
    if len(questions) < config.questions_per_step:
        raise dg.Failure(
            f"RL: rl_questions has {len(questions)} usable questions, fewer than questions_per_step="
            f"{config.questions_per_step}"
        )
    search = search_tool(search_engine.get_engine(), config.search_k) if fraction < 1.0 else None
    simulated = round(fraction * steps)
    settings = config.settings(steps)
    context.log.info(
        "%s: GRPO from %s, %d steps (%d simulated, %d real), %d questions (%d CoT) x %d samples per step",
        asset,
        start,
        steps,
        simulated,
        steps - simulated,
        config.questions_per_step,
        cot_per_step(settings),
        config.num_generations,
    )
    result = train_grpo(
        start,
        questions,
        storage.artifact_dir(asset),
        settings,
        search=search,
        simulated_fraction=fraction,
        data_version=f"rl_questions:{len(questions)}",
        stage=asset.replace("_checkpoint", ""),
        template=template,
        cot_template=cot_template,
    )
    totals = result.cost_totals
    curve = result.reward_curve
    row = {
        "path": result.path,
        "stage": asset.replace("_checkpoint", ""),
        "start_model": start,
        "steps": result.steps,
        "simulated_steps": result.simulated_steps,
        "simulated_fraction": fraction,
        "questions": len(questions),
        "cot_per_step": cot_per_step(settings),
        "reward_first": curve[0] if curve else float("nan"),
        "reward_last": curve[-1] if curve else float("nan"),
        **{
            k: int(totals.get(k, 0))
            for k in (
                "search_calls",
                "simulated_observations",
                "generated_tokens",
                "environment_tokens",
                "trajectories",
                "cot_trajectories",
            )
        },
        "wall_seconds": result.wall_seconds,
    }
    table = pa.Table.from_pylist([row], schema=MANIFEST)
    context.log.info(
        "%s: %d steps in %.0fs; real search calls %d, simulated observations %d, generated tokens %d",
        asset,
        result.steps,
        result.wall_seconds,
        row["search_calls"],
        row["simulated_observations"],
        row["generated_tokens"],
    )
    cost_cols = [
        "step",
        "mode",
        "trajectories",
        "cot_trajectories",
        "search_calls",
        "simulated_observations",
        "generated_tokens",
        "environment_tokens",
        "wall_seconds",
    ]
    md = {
        **table_metadata(table),
        "checkpoint": dg.MetadataValue.path(result.path),
        "steps": result.steps,
        "simulated_steps": result.simulated_steps,
        "real_steps": result.steps - result.simulated_steps,
        "real_search_calls": row["search_calls"],
        "simulated_observations": row["simulated_observations"],
        "generated_tokens": row["generated_tokens"],
        "wall_seconds": round(result.wall_seconds, 2),
        "cost_totals": dg.MetadataValue.json(totals),
        "cost_per_step": dg.MetadataValue.md(markdown_table(result.cost, cost_cols)),
        "reward_curve": loss_plot(
            {"reward": curve, **{f"reward/{k}": v for k, v in result.reward_components.items()}, "kl": result.kl_curve},
            f"{asset.replace('_checkpoint', '')} GRPO",
        ),
    }
    return dg.Output(table, metadata=md)


@dg.asset(group_name=GROUP, kinds={"pytorch", "safetensors"}, deps=["search_index"])
def rl_stage2_only_checkpoint(
    context: dg.AssetExecutionContext,
    config: RlConfig,
    storage: StorageResource,
    search_engine: SearchEngineResource,
    rl_questions: pa.Table,
) -> dg.Output[pa.Table]:
    """Ablation (Table 1): GRPO in the real environment straight from the base model with the in-context CoA prompt."""
    start = resolve_model(config.base_model, storage.artifact_dir("models"))[0]
    return _train(
        context,
        config,
        storage,
        search_engine,
        rl_questions,
        asset="rl_stage2_only_checkpoint",
        start=start,
        fraction=0.0,
        steps=max(1, round(config.max_steps * config.extra_steps_base)),
    )


@dg.asset(group_name=GROUP, kinds={"pytorch", "safetensors"})
def sft123_rl1_checkpoint(
    context: dg.AssetExecutionContext,
    config: RlConfig,
    storage: StorageResource,
    search_engine: SearchEngineResource,
    rl_questions: pa.Table,
    sft_stage3_checkpoint: pa.Table,
) -> dg.Output[pa.Table]:
    """RL-1 from SFT-3: GRPO in the simulated environment, the policy writing its own search results (no real call)."""
    return _train(
        context,
        config,
        storage,
        search_engine,
        rl_questions,
        asset="sft123_rl1_checkpoint",
        start=checkpoint_path(sft_stage3_checkpoint, "sft_stage3_checkpoint"),
        fraction=1.0,
        steps=config.max_steps,
    )


@dg.asset(group_name=GROUP, kinds={"pytorch", "safetensors"}, deps=["search_index"])
def sft123_rl12_checkpoint(
    context: dg.AssetExecutionContext,
    config: RlConfig,
    storage: StorageResource,
    search_engine: SearchEngineResource,
    rl_questions: pa.Table,
    sft_stage3_checkpoint: pa.Table,
) -> dg.Output[pa.Table]:
    """RL-1 then RL-2 from SFT-3: one GRPO run, simulated for the configured share of steps, then real search."""
    return _train(
        context,
        config,
        storage,
        search_engine,
        rl_questions,
        asset="sft123_rl12_checkpoint",
        start=checkpoint_path(sft_stage3_checkpoint, "sft_stage3_checkpoint"),
        fraction=config.simulated_fraction,
        steps=config.max_steps,
    )


@dg.asset(group_name=GROUP, kinds={"pytorch", "safetensors"}, deps=["search_index"])
def sft12_rl2_checkpoint(
    context: dg.AssetExecutionContext,
    config: RlConfig,
    storage: StorageResource,
    search_engine: SearchEngineResource,
    rl_questions: pa.Table,
    sft_stage2_checkpoint: pa.Table,
) -> dg.Output[pa.Table]:
    """RL-2 from SFT-2 (no world-model stage): GRPO in the real environment."""
    return _train(
        context,
        config,
        storage,
        search_engine,
        rl_questions,
        asset="sft12_rl2_checkpoint",
        start=checkpoint_path(sft_stage2_checkpoint, "sft_stage2_checkpoint"),
        fraction=0.0,
        steps=config.max_steps,
    )


RL_CHECKPOINTS = [
    "rl_stage2_only_checkpoint",
    "sft123_rl1_checkpoint",
    "sft123_rl12_checkpoint",
    "sft12_rl2_checkpoint",
]


def _meta(manifest: pa.Table) -> tuple[dict, dict]:
    row = manifest.to_pylist()[0]
    return row, json.loads((Path(row["path"]) / "meta.json").read_text())


def _build_checks(asset: str):
    @dg.asset_check(
        asset=asset,
        name="loads_with_finite_logs",
        blocking=True,
        description=(
            "The checkpoint loads back with transformers and its reward, per-component reward, KL and loss logs are finite."
        ),
    )
    def loads_with_finite_logs(manifest: pa.Table) -> dg.AssetCheckResult:
        from transformers import AutoModelForCausalLM

        found = _meta(manifest)
        row, meta = found
        model = AutoModelForCausalLM.from_pretrained(row["path"])
        curves = {
            "reward": meta["reward_curve"],
            "kl": meta["kl_curve"],
            "loss": meta["loss_curve"],
            **{f"reward/{k}": v for k, v in meta["reward_components"].items()},
        }
        bad = {k: v for k, v in curves.items() if not all(math.isfinite(x) for x in v)}
        empty = [k for k in ("reward", "kl") if not curves[k]]
        return dg.AssetCheckResult(
            passed=not bad and not empty,
            metadata={
                "parameters": sum(p.numel() for p in model.parameters()),
                "non_finite": ", ".join(bad) or "none",
                "empty_logs": ", ".join(empty) or "none",
                "reward_last": curves["reward"][-1] if curves["reward"] else -1.0,
                "kl_last": curves["kl"][-1] if curves["kl"] else -1.0,
            },
        )

    @dg.asset_check(
        asset=asset,
        name="real_calls_match_the_regime",
        blocking=True,
        description=(
            "Real search calls happen only in real-environment steps (none at all for RL-1) and simulated results only in simulated ones."
        ),
    )
    def real_calls_match_the_regime(manifest: pa.Table) -> dg.AssetCheckResult:
        found = _meta(manifest)
        _, meta = found
        cost = meta["cost"]
        sim_calls = sum(c["search_calls"] for c in cost if c["mode"] == "simulated")
        real_obs = sum(c["simulated_observations"] for c in cost if c["mode"] == "real")
        real_batches = [c for c in cost if c["mode"] == "real"]
        # a real batch where the policy never opened an action makes no call: that is not a regime error
        actions_real = sum(c["search_calls"] for c in real_batches)
        expected_real = meta["steps"] - meta["simulated_steps"]
        ok = sim_calls == 0 and real_obs == 0 and (expected_real == 0) == (not real_batches)
        return dg.AssetCheckResult(
            passed=ok,
            metadata={
                "simulated_steps": meta["simulated_steps"],
                "real_steps": expected_real,
                "search_calls_in_simulated_steps": sim_calls,
                "simulated_observations_in_real_steps": real_obs,
                "real_batches": len(real_batches),
                "search_calls_in_real_steps": actions_real,
            },
        )

    @dg.asset_check(
        asset=asset,
        name="cot_share_matches_the_config",
        blocking=True,
        description=(
            "Every generation batch rolled out exactly round(cot_fraction x questions_per_step) pure-CoT questions "
            "(x num_generations trajectories, tool off); the rest CoA."
        ),
    )
    def cot_share_matches_the_config(manifest: pa.Table) -> dg.AssetCheckResult:
        found = _meta(manifest)
        _, meta = found
        want = meta["cot_per_step"] * meta["settings"]["num_generations"]
        got = [c.get("cot_trajectories", -1) for c in meta["cost"]]
        bad = [f"step {c['step']}: {n}" for c, n in zip(meta["cost"], got) if n != want]
        return dg.AssetCheckResult(
            passed=bool(got) and not bad,
            metadata={
                "cot_per_step": meta["cot_per_step"],
                "expected_cot_trajectories_per_batch": want,
                "batches": len(got),
                "mismatched": "\n".join(bad[:5]) or "none",
            },
        )

    return [loads_with_finite_logs, real_calls_match_the_regime, cot_share_matches_the_config]


rl_checks = [c for a in RL_CHECKPOINTS for c in _build_checks(a)]
