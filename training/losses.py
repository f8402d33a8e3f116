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


def continuation_labels(context_ids: Sequence[int], ids: Sequence[int], mask: Sequence[int],
                        max_length: int) -> tuple[list[int], list[int]]:
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

    seqs = [continuation_labels(r["context_ids"], r[f"{side}_ids"], r[f"{side}_mask"], max_length)
            for side in ("chosen", "rejected") for r in rows]
    width = max(len(s) for s, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, lab) in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def pair_mean_logprobs(model, batch: dict):
    """(P̄c, P̄r) per pair of a :func:`collate_pairs` batch, from one forward over chosen and rejected.

    The vocabulary projection runs on the labelled positions only (context, environment tokens and padding need
    no logits): the same means as :func:`mean_logprob` over full logits, without a (rows x length x vocabulary)
    tensor. Models without a separate ``model``/``lm_head`` (e.g. PEFT wrappers) take the full-logits path."""
    import torch

    ids, labels = batch["input_ids"], batch["labels"]
    base, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if base is None or head is None:
        means = mean_logprob(model(input_ids=ids, attention_mask=batch["attention_mask"]).logits, ids, labels)
    else:
        hidden = base(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
        mask = labels[:, 1:] != IGNORE
        logp = torch.log_softmax(head(hidden[:, :-1][mask]).float(), dim=-1)
        picked = logp.gather(-1, ids[:, 1:][mask].unsqueeze(-1)).squeeze(-1)
        sums = torch.zeros(ids.shape[0], dtype=picked.dtype, device=picked.device)
        sums = sums.index_add(0, mask.nonzero()[:, 0], picked)
        means = sums / mask.sum(-1).clamp(min=1)
    half = means.shape[0] // 2
    return means[:half], means[half:]
