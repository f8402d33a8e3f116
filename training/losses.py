"""The SFT-1 contrastive objective, token-exact.

AutoCoA's stage-1 loss on a pair (context c, chosen y+, rejected y-) is

    L = -log σ(P̄(y+|c) - P̄(y-|c)) + α · (-P̄(y+|c))

with P̄ the mean per-token log-probability of the continuation: the policy's own tokens only. A
continuation is stored as token ids with a 0/1 mask taken from the rollout's ``policy_mask``; the
tokens the environment appended (``<search_result>`` blocks, the forced ``\\boxed{`` prompt) have mask 0
and count neither in P̄ nor in the NLL term, although the tokens after them are still conditioned on
them. Over a batch the loss is the mean over pairs of the per-pair loss, the NLL term included (a
per-pair mean, as the paper writes it, not a token-weighted mean over the batch's chosen tokens).
``tests/test_sft_loss.py`` proves :class:`training.sft.SFT1Trainer` computes exactly this.
"""

from __future__ import annotations

from collections.abc import Sequence

IGNORE = -100


def mean_logprob(logits, input_ids, labels):
    """P̄ per row: mean log-prob of the tokens whose label is not -100 (next-token shift applied)."""
    import torch

    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = input_ids[:, 1:]
    mask = labels[:, 1:] != IGNORE
    picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def sft1_loss(chosen_mean_logp, rejected_mean_logp, alpha: float):
    """The stage-1 loss per pair, from the length-normalised log-probs (the paper's formula)."""
    import torch.nn.functional as F

    return -F.logsigmoid(chosen_mean_logp - rejected_mean_logp) + alpha * (-chosen_mean_logp)


def continuation_labels(
    context_ids: Sequence[int], ids: Sequence[int], mask: Sequence[int], max_length: int
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for context + continuation, truncated to ``max_length``: labels are the
    continuation's ids where its mask is 1 and -100 on the context and on environment tokens."""
    if len(mask) != len(ids):
        raise ValueError(f"continuation mask has {len(mask)} entries for {len(ids)} ids")
    seq = (list(context_ids) + list(ids))[:max_length]
    labels = ([IGNORE] * len(context_ids) + [t if m else IGNORE for t, m in zip(ids, mask)])[:max_length]
    return seq, labels


def collate_pairs(rows: Sequence[dict], pad_id: int, max_length: int) -> dict:
    """Pad a batch of SFT-1 rows (``context_ids``, ``chosen_ids``, ``chosen_mask``, ``rejected_ids``,
    ``rejected_mask``) into one tensor batch: rows ``[0, B)`` are the chosen sequences, ``[B, 2B)`` the
    rejected ones, right-padded (labels -100 and attention 0 on padding)."""
    import torch

    seqs = [
        continuation_labels(r["context_ids"], r[f"{side}_ids"], r[f"{side}_mask"], max_length)
        for side in ("chosen", "rejected")
        for r in rows
    ]
    width = max(len(s) for s, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, lab) in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def labelled_logits(model, input_ids, attention_mask, labels):
    """``(logits, targets, rows)`` at the labelled next-token positions only: ``logits[i]`` predicts
    ``targets[i]`` in batch row ``rows[i]``.

    A bare transformers model runs its decoder and applies the vocabulary projection to exactly those
    positions. A wrapped one (DDP, DeepSpeed, PEFT) is called through its own forward, so the wrapper's
    gradient hooks run, with ``logits_to_keep`` set to the positions labelled in any row of the batch; the
    rows' other positions are then dropped. Either way no logits are made for the unlabelled prefix."""
    import torch
    from transformers import PreTrainedModel

    mask = labels[:, 1:] != IGNORE
    targets, rows = input_ids[:, 1:][mask], mask.nonzero()[:, 0]
    base = getattr(model, model.base_model_prefix, None) if isinstance(model, PreTrainedModel) else None
    head = model.get_output_embeddings() if base is not None else None
    if base is not None and head is not None:
        hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return head(hidden[:, :-1][mask]), targets, rows
    keep = mask.any(0).nonzero()[:, 0]
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.long, device=input_ids.device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    return logits[mask[:, keep]], targets, rows


def pair_mean_logprobs(model, batch: dict):
    """(P̄c, P̄r) per pair of a :func:`collate_pairs` batch, from one forward over chosen and rejected.

    Logits are made for the labelled positions only (:func:`labelled_logits`): the same means as
    :func:`mean_logprob` over full logits, without a (rows x length x vocabulary) tensor."""
    import torch

    ids, labels = batch["input_ids"], batch["labels"]
    logits, targets, rows = labelled_logits(model, ids, batch["attention_mask"], labels)
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    sums = torch.zeros(ids.shape[0], dtype=picked.dtype, device=picked.device).index_add(0, rows, picked)
    means = sums / (labels[:, 1:] != IGNORE).sum(-1).clamp(min=1)
    half = means.shape[0] // 2
    return means[:half], means[half:]
