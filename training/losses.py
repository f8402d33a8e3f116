"""The SFT-1 contrastive objective and the TRL configuration that computes it.

AutoCoA's stage-1 loss on a pair (context c, chosen y+, rejected y-) is

    L = -log σ(P̄(y+|c) - P̄(y-|c)) + α · (-P̄(y+|c))

with P̄ the mean per-token log-probability of the continuation. TRL's ``CPOTrainer`` with
``loss_type="simpo"``, ``beta=1``, ``simpo_gamma=0`` and ``cpo_alpha=α`` computes exactly this for
one pair (SimPO's length-normalised margin, no reward margin, plus CPO's NLL term on the chosen
side). With several pairs per batch TRL averages the margin term over pairs but takes the NLL term
as a token-weighted mean over all chosen tokens of the batch, i.e. longer chosen continuations weigh
more than under a per-pair mean; ``tests/test_sft_loss.py`` pins both facts down.
"""

from __future__ import annotations


def mean_logprob(logits, input_ids, labels):
    """P̄ per row: mean log-prob of the tokens whose label is not -100 (next-token shift applied)."""
    import torch

    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = input_ids[:, 1:]
    mask = labels[:, 1:] != -100
    picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def sft1_loss(chosen_mean_logp, rejected_mean_logp, alpha: float):
    """The stage-1 loss per pair, from the length-normalised log-probs (the paper's formula)."""
    import torch.nn.functional as F

    return -F.logsigmoid(chosen_mean_logp - rejected_mean_logp) + alpha * (-chosen_mean_logp)


def sft1_trl_config(output_dir: str, alpha: float = 1.0, **overrides):
    """A ``CPOConfig`` whose loss is :func:`sft1_loss` (see the module docstring)."""
    from trl.experimental.cpo import CPOConfig

    import torch

    overrides.setdefault("bf16", torch.cuda.is_available())  # CPOConfig defaults to bf16, which CPUs refuse
    fixed = {"loss_type": "simpo", "beta": 1.0, "simpo_gamma": 0.0, "cpo_alpha": alpha, "label_smoothing": 0.0}
    clash = sorted(k for k in fixed if k in overrides and overrides[k] != fixed[k])
    if clash:
        raise ValueError(f"SFT-1 fixes {', '.join(clash)} (they define the paper's loss); got overrides {clash}")
    return CPOConfig(output_dir=output_dir, **{**overrides, **fixed})

