"""SFT stage: the three SFT checkpoints of the paper (and the stage-2-only ablation of its Table 1)."""

import json
import math
from pathlib import Path

import dagster as dg
import pyarrow as pa
from pydantic import Field

from agent.engines import resolve_model
from assets.metadata import plot_markdown, table_metadata
from assets.storage import StorageResource
from training.sft import TrainSettings, train_stage1, train_trajectory_sft

GROUP = "sft"
MANIFEST = pa.schema(
    [
        ("path", pa.string()),
        ("stage", pa.string()),
        ("base_model", pa.string()),
        ("steps", pa.int32()),
        ("loss_first", pa.float64()),
        ("loss_last", pa.float64()),
        ("wall_seconds", pa.float64()),
        ("examples", pa.int32()),
    ]
)


class SftConfig(dg.Config):
    base_model: str = Field(
        "embedded",
        description="Start checkpoint for stage 1 / the ablation: 'embedded', a path or a hub id "
        "(paper: deepseek-ai/DeepSeek-R1-Distill-Qwen-7B).",
    )
    max_steps: int | None = Field(
        None, description="Optimiser steps; None: from epochs (the paper profile sets steps)."
    )
    epochs: float = Field(
        1.0, description="Passes over the data when max_steps is None (steps = ceil(epochs x rows / batch))."
    )
    learning_rate: float = Field(
        3e-4,
        description=(
            "Peak learning rate (embedded: 3e-4 for a 135M model on a few hundred demonstrations; paper: 1e-5)."
        ),
    )
    lr_scheduler: str = Field("cosine", description="transformers scheduler name (cosine with warmup; 'constant').")
    warmup_ratio: float = Field(0.05, description="Share of the steps spent warming up.")
    trainable_layers: int | None = Field(
        10,
        description=(
            "Train only the top N decoder layers (embeddings and lower layers frozen): on a CPU the backward pass stops "
            "N layers down. None: every layer (the paper profile)."
        ),
    )
    batch_size: int = Field(8, description="Per-device batch size.")
    grad_accum: int = Field(1, description="Gradient accumulation steps.")
    max_length: int = Field(2048, description="Longest training sequence.")
    packing: bool = Field(False, description="Pack sequences (stages 2/3; TRL's bfd packing).")
    length_buckets: bool = Field(
        True,
        description=(
            "Batches of rows of similar length, in a shuffled order (cuts padding: random batches of the embedded data "
            "were 36% padding, bucketed 10%; measured 1.5x tokens/s on 2 cores). False: uniform random order."
        ),
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    alpha: float = Field(1.0, description="SFT-1: weight of the chosen-side NLL term.")
    lora_r: int = Field(0, description="LoRA rank; 0 = full fine-tuning.")
    seed: int = Field(0, description="Training seed.")
    launcher: str = Field(
        "inprocess",
        description=(
            "'inprocess' (train inside the Dagster step), or run training.launch as a subprocess: 'python', "
            "'accelerate' (multi-GPU / DeepSpeed, see accelerate_config) or 'torchrun'."
        ),
    )
    num_processes: int = Field(1, description="Processes (GPUs) for the 'accelerate' / 'torchrun' launchers.")
    accelerate_config: str | None = Field(
        None,
        description=(
            "Accelerate config: a path or a name under configs/accelerate/ (multi_gpu, deepspeed_zero2, deepspeed_zero3); "
            "default multi_gpu on CUDA, cpu otherwise."
        ),
    )

    def steps_for(self, rows: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * rows / (self.batch_size * self.grad_accum)))

    def settings(self, rows: int = 0) -> TrainSettings:
        lora = (
            {"r": self.lora_r, "lora_alpha": 2 * self.lora_r, "target_modules": "all-linear"} if self.lora_r else None
        )
        steps = self.steps_for(rows)
        return TrainSettings(
            max_steps=steps,
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            lr_scheduler=self.lr_scheduler,
            warmup_steps=math.ceil(self.warmup_ratio * steps),
            trainable_layers=None if self.lora_r else self.trainable_layers,
            grad_accum=self.grad_accum,
            max_length=self.max_length,
            packing=self.packing,
            gradient_checkpointing=self.gradient_checkpointing,
            alpha=self.alpha,
            lora=lora,
            seed=self.seed,
            length_buckets=self.length_buckets,
        )


class Sft1Config(SftConfig):
    epochs: float = Field(
        0.5,
        description=(
            "Passes over the pairs when max_steps is None (embedded: half a pass; each pair is two sequences, and the "
            "chosen side carries the search results the action brought)."
        ),
    )


class Sft3Config(SftConfig):
    epochs: float = Field(
        0.5,
        description=(
            "Passes over the data when max_steps is None: SFT-3 continues SFT-2 on the same trajectories, now with the "
            "search results in the loss (the world model), so a shorter pass suffices on CPU."
        ),
    )


def loss_plot(curves: dict[str, list[float]], title: str) -> dg.MetadataValue:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return plot_markdown(fig)


def _output(context, result, stage: str, base: str, examples: int, extra_curves: dict | None = None) -> dg.Output:
    curve = result.loss_curve
    row = {
        "path": result.path,
        "stage": stage,
        "base_model": base,
        "steps": result.steps,
        "loss_first": curve[0] if curve else float("nan"),
        "loss_last": curve[-1] if curve else float("nan"),
        "wall_seconds": result.wall_seconds,
        "examples": examples,
    }
    table = pa.Table.from_pylist([row], schema=MANIFEST)
    context.log.info(
        "%s: %d steps in %.0fs, loss %.4f -> %.4f, saved to %s",
        stage,
        result.steps,
        result.wall_seconds,
        row["loss_first"],
        row["loss_last"],
        result.path,
    )
    md = {
        **table_metadata(table),
        "checkpoint": dg.MetadataValue.path(result.path),
        "steps": result.steps,
        "loss_first": row["loss_first"],
        "loss_last": row["loss_last"],
        "wall_seconds": round(result.wall_seconds, 2),
        "examples": examples,
        **{k: round(float(v), 4) for k, v in result.metrics.items() if k.startswith("probe_loss")},
        "loss_curve": loss_plot({"loss": curve, **(extra_curves or {})}, f"{stage} training"),
    }
    return dg.Output(table, metadata=md)


def _train(
    context,
    config: SftConfig,
    storage: StorageResource,
    *,
    stage: int,
    model: str,
    data: pa.Table,
    data_asset: str,
    out: str,
    labels: str | None = None,
):
    """Train in this process, or run ``training.launch`` as a subprocess whose output lands in the run log."""
    version = f"{data_asset}:{data.num_rows}"
    if config.launcher == "inprocess":
        if stage == 1:
            return train_stage1(model, data.to_pylist(), out, config.settings(data.num_rows), data_version=version)
        return train_trajectory_sft(
            model, data.to_pylist(), labels, out, config.settings(data.num_rows), stage=stage, data_version=version
        )
    from qadata.paths import table_path
    from training.launch import launch_command, run_launcher

    argv = launch_command(
        stage,
        model,
        table_path(storage.home, [data_asset]),
        out,
        config.settings(data.num_rows),
        launcher=config.launcher,
        num_processes=config.num_processes,
        accelerate_config=config.accelerate_config,
        labels=labels,
        data_version=version,
    )
    context.log.info("launching: %s", " ".join(argv))
    return run_launcher(argv, log=context.log.info)


def _base(storage: StorageResource, model: str) -> str:
    return resolve_model(model, storage.artifact_dir("models"))[0]


def checkpoint_path(manifest: pa.Table, asset: str) -> str:
    """The checkpoint directory a manifest row points at (one row: path)."""
    if manifest.num_rows != 1:
        raise dg.Failure(f"{asset}: its manifest has {manifest.num_rows} rows, expected one; re-materialise it")
    path = manifest.column("path")[0].as_py()
    if not Path(path).is_dir():
        raise dg.Failure(f"{asset}: its manifest points at {path}, which does not exist; re-materialise it")
    return path


@dg.asset(group_name=GROUP, kinds={"pytorch", "safetensors"})
def sft_stage1_checkpoint(
    context: dg.AssetExecutionContext, config: Sft1Config, storage: StorageResource, sft_stage1_data: pa.Table
) -> dg.Output[pa.Table]:
    """SFT-1: the base model trained on the contrastive pairs (−logσ(P̄c − P̄r) + α·(−P̄c)); also the stage-1-only ablation."""
    data = sft_stage1_data
    if data.num_rows == 0:
        raise dg.Failure(
            "sft_stage1_checkpoint: sft_stage1_data has no pairs to train on (see contrastive_pairs_discarded)"
        )
    base = _base(storage, config.base_model)
    result = _train(
        context,
        config,
        storage,
        stage=1,
        model=base,
        data=data,
        data_asset="sft_stage1_data",
        out=storage.artifact_dir("sft_stage1_checkpoint"),
    )
    return _output(
        context,
        result,
        "sft_stage1",
        base,
        data.num_rows,
        {"logp chosen": result.logps_chosen, "logp rejected": result.logps_rejected},
    )


def _trajectory_stage(
    context, config: SftConfig, storage: StorageResource, asset: str, base: str, labels: str, stage: int, data: pa.Table
) -> dg.Output:
    if data.num_rows == 0:
        raise dg.Failure(f"{asset}: sft_stage23_data has no correct trajectories to train on")
    result = _train(
        context,
        config,
        storage,
        stage=stage,
        model=base,
        data=data,
        data_asset="sft_stage23_data",
        out=storage.artifact_dir(asset),
        labels=labels,
    )
    return _output(context, result, asset.replace("_checkpoint", ""), base, data.num_rows)


@dg.asset(group_name=GROUP, kinds={"pytorch", "safetensors"})
def sft_stage2_checkpoint(
    context: dg.AssetExecutionContext,
    config: SftConfig,
    storage: StorageResource,
    sft_stage1_checkpoint: pa.Table,
    sft_stage23_data: pa.Table,
) -> dg.Output[pa.Table]:
    """SFT-2: from the stage-1 checkpoint, trajectory SFT with the search results masked out of the loss."""
    return _trajectory_stage(
        context,
        config,
        storage,
        "sft_stage2_checkpoint",
        checkpoint_path(sft_stage1_checkpoint, "sft_stage1_checkpoint"),
        "labels_stage2",
        2,
        sft_stage23_data,
    )


@dg.asset(group_name=GROUP, kinds={"pytorch", "safetensors"})
def sft_stage3_checkpoint(
    context: dg.AssetExecutionContext,
    config: Sft3Config,
    storage: StorageResource,
    sft_stage2_checkpoint: pa.Table,
    sft_stage23_data: pa.Table,
) -> dg.Output[pa.Table]:
    """SFT-3: from the stage-2 checkpoint, the same data with search results in the loss (the internal world model)."""
    return _trajectory_stage(
        context,
        config,
        storage,
        "sft_stage3_checkpoint",
        checkpoint_path(sft_stage2_checkpoint, "sft_stage2_checkpoint"),
        "labels_stage3",
        3,
        sft_stage23_data,
    )


@dg.asset(group_name=GROUP, kinds={"pytorch", "safetensors"})
def sft_stage2_only_checkpoint(
    context: dg.AssetExecutionContext, config: SftConfig, storage: StorageResource, sft_stage23_data: pa.Table
) -> dg.Output[pa.Table]:
    """Ablation (Table 1): stage-2 trajectory SFT straight from the base model, without the contrastive stage."""
    return _trajectory_stage(
        context,
        config,
        storage,
        "sft_stage2_only_checkpoint",
        _base(storage, config.base_model),
        "labels_stage2",
        2,
        sft_stage23_data,
    )


CHECKPOINTS = ["sft_stage1_checkpoint", "sft_stage2_checkpoint", "sft_stage3_checkpoint", "sft_stage2_only_checkpoint"]


def _build_checks(asset: str):
    @dg.asset_check(
        asset=asset,
        name="loads_and_learned",
        blocking=True,
        description=(
            "The checkpoint loads back with transformers, its loss on a fixed probe set is finite and lower after "
            "training than before, and its parameters differ from the start model's."
        ),
    )
    def loads_and_learned(manifest: pa.Table) -> dg.AssetCheckResult:
        import torch
        from transformers import AutoModelForCausalLM

        row = manifest.to_pylist()[0]
        meta = json.loads((Path(row["path"]) / "meta.json").read_text())
        curve = meta["loss_curve"]
        # the fixed probe (same examples before and after) decides "learned"; the logged curve is per batch
        start_loss, end_loss = meta.get("probe_loss_start"), meta.get("probe_loss_end")
        if start_loss is None:
            start_loss, end_loss = (curve[0], curve[-1]) if curve else (float("nan"), float("nan"))
        trained = AutoModelForCausalLM.from_pretrained(row["path"]).state_dict()
        start = AutoModelForCausalLM.from_pretrained(meta["base_model"]).state_dict()
        changed = sum(1 for k, v in trained.items() if k in start and not torch.equal(v, start[k]))
        finite = bool(curve) and all(math.isfinite(x) for x in curve + [start_loss, end_loss])
        lower = finite and end_loss < start_loss
        return dg.AssetCheckResult(
            passed=finite and lower and changed > 0,
            metadata={
                "probe_loss_start": float(start_loss),
                "probe_loss_end": float(end_loss),
                "loss_first_batch": curve[0] if curve else -1.0,
                "loss_last_batch": curve[-1] if curve else -1.0,
                "finite": finite,
                "lower_at_end": lower,
                "tensors_changed": changed,
                "tensors": len(trained),
            },
        )

    @dg.asset_check(
        asset=asset,
        name="answers_a_smoke_prompt",
        description=("Greedy generation on a smoke question yields a parsable trajectory with a boxed answer (WARN)."),
    )
    def answers_a_smoke_prompt(manifest: pa.Table) -> dg.AssetCheckResult:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from agent.models import EMBEDDED_MODEL
        from agent.prompts import agent_template
        from agent.protocol import parse

        path = manifest.column("path")[0].as_py()
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        root = json.loads((Path(path) / "meta.json").read_text()).get("root_model", EMBEDDED_MODEL)
        template = agent_template(root)  # trained checkpoints answer the plain instruction
        ids = template.prompt_ids(tok, "In which country is the city of Valdren?")
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=96,
                do_sample=False,
                pad_token_id=tok.pad_token_id or tok.eos_token_id,
            )
        text = tok.decode(out[0, len(ids) :], skip_special_tokens=False)
        parsed = parse(text, think_open=template.prefill.strip() == "<think>")
        return dg.AssetCheckResult(
            passed=parsed.answer is not None,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"answer": str(parsed.answer), "issues": "; ".join(parsed.issues[:3]), "text": text[:500]},
        )

    return [loads_and_learned, answers_a_smoke_prompt]


sft_checks = [c for a in CHECKPOINTS for c in _build_checks(a)]
