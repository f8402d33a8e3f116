"""The three SFT stages with TRL, one function per stage, configs built from small overrides.

- :func:`train_stage1`: the contrastive loss (``CPOTrainer``, see :mod:`training.losses`) on the pairs.
- :func:`train_trajectory_sft`: SFT on pre-tokenised trajectories (``SFTTrainer`` with our own
  ``labels``): stage 2 with observations masked (``labels_stage2``), stage 3 unmasked (``labels_stage3``).

Every stage writes a checkpoint directory atomically: safetensors + tokenizer + ``meta.json`` (base
model, data version, config, steps, loss curve, wall time). Full fine-tuning by default, LoRA via
``lora`` (peft), packing where TRL supports it (pre-tokenised SFT data), gradient checkpointing, bf16
on GPU.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qadata.io import atomic_directory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    max_steps: int = 8
    learning_rate: float = 1e-5
    batch_size: int = 2
    grad_accum: int = 1
    max_length: int = 2048
    packing: bool = False
    gradient_checkpointing: bool = False
    warmup_steps: int = 0
    weight_decay: float = 0.0
    seed: int = 0
    alpha: float = 1.0  # SFT-1 only: weight of the NLL term on the chosen side
    lora: dict | None = None  # e.g. {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}
    save_steps: int | None = None  # mid-training checkpoints (resume) every N steps


@dataclass
class TrainResult:
    path: str
    steps: int
    loss_curve: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    metrics: dict = field(default_factory=dict)
    logps_chosen: list[float] = field(default_factory=list)
    logps_rejected: list[float] = field(default_factory=list)


def _common_args(s: TrainSettings, out: Path) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return dict(output_dir=str(out), max_steps=s.max_steps, learning_rate=s.learning_rate,
                per_device_train_batch_size=s.batch_size, gradient_accumulation_steps=s.grad_accum,
                warmup_steps=s.warmup_steps, weight_decay=s.weight_decay, seed=s.seed, logging_steps=1,
                report_to=[], bf16=cuda, use_cpu=not cuda, gradient_checkpointing=s.gradient_checkpointing,
                save_strategy="steps" if s.save_steps else "no", save_steps=s.save_steps or 500,
                disable_tqdm=False, dataloader_num_workers=0, lr_scheduler_type="constant",
                include_num_input_tokens_seen="non_padding")  # real tokens trained on: tokens/s, packing gains


def _load(model_path: str, s: TrainSettings):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path)
    if s.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **s.lora))
    return model, tok


def _save(trainer, model, tok, out: Path, meta: dict) -> None:
    # Multi-process launches (training.launch): ZeRO-3 shards are gathered on every rank (a collective),
    # then only the main process writes, and the others wait for it.
    acc = trainer.accelerator
    plugin = acc.state.deepspeed_plugin if acc.distributed_type == "DEEPSPEED" else None
    state = acc.get_state_dict(trainer.model_wrapped) if plugin is not None and plugin.zero_stage == 3 else None
    if acc.is_main_process:
        with atomic_directory(out) as tmp:
            final = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
            final.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    acc.wait_for_everyone()


def root_model(model_path: str) -> str:
    """The model a chain of our checkpoints started from (``meta.json`` records it), else the path itself."""
    meta = Path(model_path) / "meta.json"
    if meta.is_file():
        return json.loads(meta.read_text()).get("root_model", model_path)
    return model_path


PROBE_EXAMPLES = 8


def probe_loss_trajectories(model, rows: Sequence[dict], labels_key: str, max_length: int) -> float:
    """Mean token cross-entropy over the first ``PROBE_EXAMPLES`` rows' labelled tokens: the same examples
    before and after training, so "the loss fell" is not an artefact of which batch came last."""
    import torch

    from training.losses import mean_logprob

    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for r in list(rows)[:PROBE_EXAMPLES]:
            ids = torch.tensor([list(r["input_ids"])[:max_length]], device=model.device)
            labels = torch.tensor([list(r[labels_key])[:max_length]], device=model.device)
            n = int((labels[:, 1:] != -100).sum())
            if n:
                total += float(-mean_logprob(model(input_ids=ids).logits, ids, labels)[0]) * n
                tokens += n
    model.train(was_training)
    return total / max(tokens, 1)


def probe_loss_pairs(model, tok, pairs: Sequence[dict], alpha: float, max_length: int) -> float:
    """The paper's SFT-1 loss (:func:`training.losses.sft1_loss`) averaged over the first ``PROBE_EXAMPLES``
    pairs, tokenised as CPOTrainer tokenises them (prompt, then continuation)."""
    import torch

    from training.losses import mean_logprob, sft1_loss

    was_training = model.training
    model.eval()
    losses = []
    with torch.no_grad():
        for p in list(pairs)[:PROBE_EXAMPLES]:
            context = tok(p["prompt"], add_special_tokens=False)["input_ids"]
            means = []
            for side in ("chosen", "rejected"):
                cont = tok(p[side], add_special_tokens=False)["input_ids"]
                ids = torch.tensor([(context + cont)[:max_length]], device=model.device)
                labels = ids.clone()
                labels[:, : len(context)] = -100
                means.append(mean_logprob(model(input_ids=ids).logits, ids, labels))
            losses.append(float(sft1_loss(means[0], means[1], alpha)[0]))
    model.train(was_training)
    return sum(losses) / max(len(losses), 1)


def _history(trainer, key: str) -> list[float]:
    return [float(h[key]) for h in trainer.state.log_history if key in h and not math.isnan(float(h[key]))]


def train_stage1(model_path: str, pairs: Sequence[dict], out: str | Path, settings: TrainSettings = TrainSettings(),
                 *, data_version: str = "", resume_from: str | None = None) -> TrainResult:
    """SFT-1 on ``pairs`` (dicts with ``prompt``, ``chosen``, ``rejected`` text)."""
    from datasets import Dataset
    from trl.experimental.cpo import CPOTrainer

    from training.losses import sft1_trl_config

    out = Path(out)
    model, tok = _load(model_path, settings)
    common = _common_args(settings, Path(str(out) + ".work"))
    args = sft1_trl_config(common.pop("output_dir"), alpha=settings.alpha, max_length=settings.max_length, **common)
    ds = Dataset.from_list([{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs])
    trainer = CPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    probe_start = probe_loss_pairs(model, tok, pairs, settings.alpha, settings.max_length)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - t0
    probe_end = probe_loss_pairs(model, tok, pairs, settings.alpha, settings.max_length)
    result = TrainResult(str(out), trainer.state.global_step, _history(trainer, "loss"), wall,
                         metrics={"probe_loss_start": probe_start, "probe_loss_end": probe_end},
                         logps_chosen=_history(trainer, "logps/chosen"), logps_rejected=_history(trainer, "logps/rejected"))
    _save(trainer, model, tok, out, {"stage": 1, "base_model": model_path, "root_model": root_model(model_path), "data_version": data_version,
                                     "settings": asdict(settings), "steps": result.steps, "loss_curve": result.loss_curve,
                                     "logps_chosen": result.logps_chosen, "logps_rejected": result.logps_rejected,
                                     **result.metrics, "wall_seconds": wall, "examples": len(pairs)})
    return result


def train_trajectory_sft(model_path: str, rows: Sequence[dict], labels_key: str, out: str | Path,
                         settings: TrainSettings = TrainSettings(), *, stage: int, data_version: str = "",
                         resume_from: str | None = None) -> TrainResult:
    """SFT-2 (``labels_stage2``) or SFT-3 (``labels_stage3``) on pre-tokenised trajectories."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    out = Path(out)
    model, tok = _load(model_path, settings)
    work = Path(str(out) + ".work")
    args = SFTConfig(max_length=settings.max_length, packing=settings.packing, **_common_args(settings, work))
    ds = Dataset.from_list([{"input_ids": list(r["input_ids"]), "labels": list(r[labels_key])} for r in rows])
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    probe_start = probe_loss_trajectories(model, rows, labels_key, settings.max_length)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - t0
    probe_end = probe_loss_trajectories(model, rows, labels_key, settings.max_length)
    tokens = sum(sum(1 for x in r[labels_key] if x != -100) for r in rows)
    result = TrainResult(str(out), trainer.state.global_step, _history(trainer, "loss"), wall,
                         metrics={"trained_tokens_per_epoch": tokens,
                                  "tokens_seen": int(trainer.state.num_input_tokens_seen or 0),
                                  "probe_loss_start": probe_start, "probe_loss_end": probe_end})
    _save(trainer, model, tok, out, {"stage": stage, "base_model": model_path, "root_model": root_model(model_path), "data_version": data_version,
                                     "labels": labels_key, "settings": asdict(settings), "steps": result.steps,
                                     "loss_curve": result.loss_curve, **result.metrics, "wall_seconds": wall,
                                     "examples": len(rows)})
    return result
