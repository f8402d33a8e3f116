"""The three SFT stages, one function per stage, configs built from small overrides.

- :func:`train_stage1`: the contrastive loss (:mod:`training.losses`) on the pairs' token ids, with
  :class:`SFT1Trainer`, a ``transformers.Trainer`` whose loss counts only the policy's own tokens
  (observations and forced text are masked out through the rollout's ``policy_mask``).
- :func:`train_trajectory_sft`: SFT on pre-tokenised trajectories (``SFTTrainer`` with our own
  ``labels``): stage 2 with observations masked (``labels_stage2``), stage 3 unmasked (``labels_stage3``).

Every stage writes a checkpoint directory atomically: safetensors + tokenizer + ``meta.json`` (base
model, data version, config, steps, loss curve, wall time). Full fine-tuning by default, LoRA via
``lora`` (peft), packing where TRL supports it (pre-tokenised SFT data), gradient checkpointing, bf16
on GPU.
"""

from __future__ import annotations

import functools
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
    # train only the top N decoder layers (and the final norm); embeddings and lower layers frozen. On a CPU the
    # backward pass then stops N layers down: the embedded demonstration's main training-time lever. None: all.
    trainable_layers: int | None = None
    lr_scheduler: str = "constant"
    # batches of similar length in a shuffled order (:class:`LengthBucketSampler`): CoT rows are a third of a CoA
    # row's length, and random batches of the embedded data were 36% padding. False: uniform random order.
    length_buckets: bool = True


class LengthBucketSampler:
    """Row order for a ``Trainer``: rows sorted by length (ties broken at random), cut into batches of
    ``batch_size``, and the full batches shuffled (a short one last). Every batch holds rows of similar length (little padding), while
    the order of batches, hence of lengths and of CoT/CoA rows, stays random. Deterministic for a seed and an
    epoch (``set_epoch``), so a resumed run skips exactly the batches it had seen."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0):
        self.lengths = list(lengths)
        self.batch_size = max(1, int(batch_size))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        import random

        rng = random.Random(self.seed * 100_003 + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        order.sort(key=lambda i: self.lengths[i])  # stable: equal lengths keep their shuffled order
        cut = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        short = cut.pop() if cut and len(cut[-1]) < self.batch_size else None
        rng.shuffle(cut)  # the short batch goes last: the DataLoader cuts the flat order every batch_size rows
        return cut + ([short] if short else [])

    def __iter__(self):
        for batch in self.batches():
            yield from batch


def padding_share(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of a padded batch's positions that are padding, over ``batches`` of row indices into ``lengths``."""
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches if b)
    return 1.0 - sum(lengths) / padded if padded else 0.0


def _bucketed(trainer_cls):
    """``trainer_cls`` whose training order is a :class:`LengthBucketSampler` when ``length_buckets`` is set
    (per-device batches; the lengths are the rows' token counts)."""

    class Bucketed(trainer_cls):
        def __init__(self, *a, lengths: Sequence[int] | None = None, **kw):
            super().__init__(*a, **kw)
            self._lengths = lengths

        def _get_train_sampler(self, train_dataset=None):
            if self._lengths is None or self.args.world_size > 1:  # distributed: the Trainer's own sampler
                return super()._get_train_sampler(train_dataset)
            return LengthBucketSampler(self._lengths, self.args.per_device_train_batch_size, self.args.seed)

    Bucketed.__name__ = Bucketed.__qualname__ = trainer_cls.__name__
    return Bucketed


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
    return dict(
        output_dir=str(out),
        max_steps=s.max_steps,
        learning_rate=s.learning_rate,
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        warmup_steps=s.warmup_steps,
        weight_decay=s.weight_decay,
        seed=s.seed,
        logging_steps=1,
        report_to=[],
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=s.gradient_checkpointing,
        save_strategy="steps" if s.save_steps else "no",
        save_steps=s.save_steps or 500,
        disable_tqdm=False,
        dataloader_num_workers=0,
        lr_scheduler_type=s.lr_scheduler,
        include_num_input_tokens_seen="non_padding",
    )  # real tokens trained on: tokens/s, packing gains


def load_model(model_path: str, s: TrainSettings):
    """Tokenizer (pad = EOS when unset) and model, with LoRA or the frozen lower layers ``s`` asks for."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path)
    if s.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **s.lora))
    elif getattr(s, "trainable_layers", None) is not None:  # GRPO's settings have no such field: all layers
        freeze_below(model, s.trainable_layers)
    return model, tok


def freeze_below(model, trainable_layers: int) -> int:
    """Freeze every parameter except the top ``trainable_layers`` decoder layers and the final norm; returns the
    number of trainable parameters. Tied input/output embeddings stay frozen (they are the vocabulary)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: trainable_layers needs a decoder-only model")
    if not 0 < trainable_layers <= len(layers):
        raise ValueError(f"trainable_layers must be within 1..{len(layers)}, got {trainable_layers}")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers[len(layers) - trainable_layers :]:
        for p in layer.parameters():
            p.requires_grad_(True)
    norm = getattr(model.model, "norm", None)
    if norm is not None:
        for p in norm.parameters():
            p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def labelled_positions_loss(model, inputs) -> object:
    """Token cross-entropy over the labelled positions only, with the vocabulary projection applied to those
    positions alone (:func:`training.losses.labelled_logits`): masked observation tokens (most of a CoA
    trajectory) still pass through the decoder, but cost no logits. Equal to the model's own causal-LM loss
    (mean over labelled next tokens)."""
    import torch.nn.functional as F

    from training.losses import labelled_logits

    logits, targets, _ = labelled_logits(model, inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"])
    return F.cross_entropy(logits.float(), targets)


def save_checkpoint(trainer, model, tok, out: Path, meta: dict) -> None:
    """Write the checkpoint directory atomically: safetensors, tokenizer and ``meta.json``."""
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


def probe_loss_pairs(model, pairs: Sequence[dict], alpha: float, max_length: int) -> float:
    """The paper's SFT-1 loss (:func:`training.losses.sft1_loss`) averaged over the first ``PROBE_EXAMPLES``
    pairs, on their ids and masks exactly as :class:`SFT1Trainer` sees them (one pair per forward)."""
    import torch

    from training.losses import collate_pairs, pair_mean_logprobs, sft1_loss

    was_training = model.training
    model.eval()
    losses = []
    with torch.no_grad():
        for p in list(pairs)[:PROBE_EXAMPLES]:
            batch = {k: v.to(model.device) for k, v in collate_pairs([p], 0, max_length).items()}
            losses.append(float(sft1_loss(*pair_mean_logprobs(model, batch), alpha)[0]))
    model.train(was_training)
    return sum(losses) / max(len(losses), 1)


STAGE1_KEYS = ("context_ids", "chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")


def check_stage1_rows(pairs: Sequence[dict], max_length: int) -> dict:
    """Raise on rows SFT-1 cannot train on (text-only rows, a side with no policy token within
    ``max_length``); return the token counts: trained on, and excluded as environment tokens."""
    from training.losses import continuation_labels

    missing = [k for k in STAGE1_KEYS if pairs and k not in pairs[0]]
    if missing:
        raise ValueError(
            f"SFT-1 trains on token ids and policy masks; the rows lack {missing} "
            "(materialise sft_stage1_data from contrastive_pairs with masks)"
        )
    counts = {"policy_tokens": 0, "env_tokens_excluded": 0}
    empty = []
    for p in pairs:
        for side in ("chosen", "rejected"):
            _, labels = continuation_labels(p["context_ids"], p[f"{side}_ids"], p[f"{side}_mask"], max_length)
            n = sum(1 for x in labels[1:] if x != -100)
            if n == 0:
                empty.append(f"{p.get('pair_id', '?')}:{side}")
            counts["policy_tokens"] += n
            kept = max(0, min(len(p[f"{side}_ids"]), max_length - len(p["context_ids"])))
            counts["env_tokens_excluded"] += sum(1 for m in list(p[f"{side}_mask"])[:kept] if not m)
    if empty:
        raise ValueError(
            f"SFT-1: {len(empty)} continuation(s) have no policy token within max_length={max_length} "
            f"(context too long or all environment tokens): {', '.join(empty[:5])}"
        )
    return counts


@functools.cache
def _sft1_trainer_class():
    import torch
    from transformers import Trainer

    from training.losses import pair_mean_logprobs, sft1_loss

    class SFT1Trainer(_bucketed(Trainer)):
        """``Trainer`` with the SFT-1 loss: mean over the batch's pairs of
        -logσ(P̄c - P̄r) + α·(-P̄c), P̄ over the policy tokens (labels != -100) of each continuation.
        Batches come from :func:`training.losses.collate_pairs`; logs ``logps/chosen``, ``logps/rejected``,
        ``logps/margin`` and ``logps/accuracy`` (share of pairs with P̄c > P̄r), per logging step."""

        def __init__(self, *args, alpha: float = 1.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.alpha = alpha
            self.loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by the accumulation steps
            self._pair_stats: list[torch.Tensor] = []

        def pair_logps(self, model, inputs):
            return pair_mean_logprobs(model, inputs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            pc, pr = self.pair_logps(model, inputs)
            loss = sft1_loss(pc, pr, self.alpha).mean()
            if model.training:
                stats = torch.stack([pc.detach(), pr.detach()], dim=-1)  # (B, 2)
                self._pair_stats.append(self.accelerator.gather(stats).float().cpu())
            return (loss, {"logps_chosen": pc, "logps_rejected": pr}) if return_outputs else loss

        def log(self, logs, start_time=None):
            if "loss" in logs and self._pair_stats:
                stats = torch.cat(self._pair_stats)
                self._pair_stats = []
                pc, pr = stats[:, 0], stats[:, 1]
                logs.update(
                    {
                        "logps/chosen": float(pc.mean()),
                        "logps/rejected": float(pr.mean()),
                        "logps/margin": float((pc - pr).mean()),
                        "logps/accuracy": float((pc > pr).float().mean()),
                    }
                )
            super().log(logs, start_time)

    return SFT1Trainer


def stage1_trainer(model, tok, pairs: Sequence[dict], settings: TrainSettings, work_dir: str | Path):
    """The :class:`SFT1Trainer` :func:`train_stage1` runs: ``pairs`` as the dataset, batches padded by
    :func:`training.losses.collate_pairs` and cut to ``settings.max_length``, α = ``settings.alpha``."""
    from transformers import TrainingArguments

    from training.losses import collate_pairs

    args = TrainingArguments(remove_unused_columns=False, **_common_args(settings, Path(work_dir)))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    lengths = (
        [
            min(len(p["context_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])), settings.max_length)
            for p in pairs
        ]
        if settings.length_buckets
        else None
    )
    return _sft1_trainer_class()(
        model=model,
        args=args,
        train_dataset=list(pairs),
        processing_class=tok,
        data_collator=functools.partial(collate_pairs, pad_id=pad_id, max_length=settings.max_length),
        alpha=settings.alpha,
        lengths=lengths,
    )


def __getattr__(name):  # transformers is imported lazily: the class is built once, on first use
    if name == "SFT1Trainer":
        return _sft1_trainer_class()
    raise AttributeError(name)


def log_history(trainer, key: str) -> list[float]:
    """The finite values of ``key`` in the trainer's log history, in step order."""
    return [float(h[key]) for h in trainer.state.log_history if key in h and not math.isnan(float(h[key]))]


def train_stage1(
    model_path: str,
    pairs: Sequence[dict],
    out: str | Path,
    settings: TrainSettings = TrainSettings(),
    *,
    data_version: str = "",
    resume_from: str | None = None,
) -> TrainResult:
    """SFT-1 on ``pairs`` (``sft_stage1_data`` rows: ``context_ids``, ``chosen_ids``/``chosen_mask``,
    ``rejected_ids``/``rejected_mask``), token-exact; no packing (each pair is one chosen + one rejected row)."""
    out = Path(out)
    pairs = [{k: p[k] for k in ("pair_id", *STAGE1_KEYS) if k in p} for p in pairs]
    tokens = check_stage1_rows(pairs, settings.max_length)
    model, tok = load_model(model_path, settings)
    trainer = stage1_trainer(model, tok, pairs, settings, Path(str(out) + ".work"))
    probe_start = probe_loss_pairs(model, pairs, settings.alpha, settings.max_length)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - t0
    probe_end = probe_loss_pairs(model, pairs, settings.alpha, settings.max_length)
    result = TrainResult(
        str(out),
        trainer.state.global_step,
        log_history(trainer, "loss"),
        wall,
        metrics={"probe_loss_start": probe_start, "probe_loss_end": probe_end, **tokens},
        logps_chosen=log_history(trainer, "logps/chosen"),
        logps_rejected=log_history(trainer, "logps/rejected"),
    )
    save_checkpoint(
        trainer,
        model,
        tok,
        out,
        {
            "stage": 1,
            "base_model": model_path,
            "root_model": root_model(model_path),
            "data_version": data_version,
            "settings": asdict(settings),
            "steps": result.steps,
            "loss_curve": result.loss_curve,
            "logps_chosen": result.logps_chosen,
            "logps_rejected": result.logps_rejected,
            "logps_margin": log_history(trainer, "logps/margin"),
            "logps_accuracy": log_history(trainer, "logps/accuracy"),
            **result.metrics,
            "wall_seconds": wall,
            "examples": len(pairs),
        },
    )
    return result


def train_trajectory_sft(
    model_path: str,
    rows: Sequence[dict],
    labels_key: str,
    out: str | Path,
    settings: TrainSettings = TrainSettings(),
    *,
    stage: int,
    data_version: str = "",
    resume_from: str | None = None,
) -> TrainResult:
    """SFT-2 (``labels_stage2``) or SFT-3 (``labels_stage3``) on pre-tokenised trajectories."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    out = Path(out)
    model, tok = load_model(model_path, settings)
    work = Path(str(out) + ".work")
    args = SFTConfig(max_length=settings.max_length, packing=settings.packing, **_common_args(settings, work))
    ds = Dataset.from_list([{"input_ids": list(r["input_ids"]), "labels": list(r[labels_key])} for r in rows])
    direct = hasattr(model, "model") and hasattr(model, "lm_head") and not settings.packing

    class _Trainer(_bucketed(SFTTrainer)):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            if direct:  # the loss below is a per-micro-batch mean: let the Trainer divide by the accumulation steps
                self.model_accepts_loss_kwargs = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not direct or return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return labelled_positions_loss(model, inputs)

    lengths = (
        [min(len(r["input_ids"]), settings.max_length) for r in rows]
        if settings.length_buckets and not settings.packing
        else None
    )
    trainer = _Trainer(model=model, args=args, train_dataset=ds, processing_class=tok, lengths=lengths)
    probe_start = probe_loss_trajectories(model, rows, labels_key, settings.max_length)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - t0
    probe_end = probe_loss_trajectories(model, rows, labels_key, settings.max_length)
    tokens = sum(sum(1 for x in r[labels_key] if x != -100) for r in rows)
    result = TrainResult(
        str(out),
        trainer.state.global_step,
        log_history(trainer, "loss"),
        wall,
        metrics={
            "trained_tokens_per_epoch": tokens,
            "tokens_seen": int(trainer.state.num_input_tokens_seen or 0),
            "probe_loss_start": probe_start,
            "probe_loss_end": probe_end,
        },
    )
    save_checkpoint(
        trainer,
        model,
        tok,
        out,
        {
            "stage": stage,
            "base_model": model_path,
            "root_model": root_model(model_path),
            "data_version": data_version,
            "labels": labels_key,
            "settings": asdict(settings),
            "steps": result.steps,
            "loss_curve": result.loss_curve,
            **result.metrics,
            "wall_seconds": wall,
            "examples": len(rows),
        },
    )
    return result
