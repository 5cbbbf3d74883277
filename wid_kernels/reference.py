"""Pure-PyTorch reference math of every WID op (DESIGN.md "Ops").

This is the single source of truth that every backend is tested against and that the benchmarks
use as the unfused baseline. It is written the way the authors' UER code computes things: each
compactor is applied to the activations as its own linear layer, and LayerNorm statistics are
taken over the kept channels with Hugging Face's formula (biased variance, eps inside the sqrt).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def compacted_linear(x, Q, W, L, bias=None, keep_out=None, keep_in=None):
    """y = ((x Lᵀ) Wᵀ + b) Qᵀ: three GEMMs on the activations (the unfused baseline).

    `keep_out`/`keep_in` are accepted for interface parity; the reference computes every gradient.
    """
    h = x if L is None else F.linear(x, L)
    h = F.linear(h, W, bias)
    return h if Q is None else F.linear(h, Q)


def fold(Q, W, L, bias=None, keep_out=None, keep_in=None, scale=None):
    """W_eff = (Q[keep_out] · W · L[:, keep_in]) · scale, b_eff = (Q · b)[keep_out] · scale."""
    W_eff = W
    if Q is not None:
        W_eff = (Q if keep_out is None else Q[keep_out]) @ W_eff
    elif keep_out is not None:
        W_eff = W_eff[keep_out]
    if L is not None:
        W_eff = W_eff @ (L if keep_in is None else L[:, keep_in])
    elif keep_in is not None:
        W_eff = W_eff[:, keep_in]
    b_eff = None
    if bias is not None:
        b_eff = bias if Q is None else Q @ bias
        if keep_out is not None:
            b_eff = b_eff[keep_out]
    if scale is not None:
        W_eff = W_eff * scale
        b_eff = None if b_eff is None else b_eff * scale
    return W_eff, b_eff


def masked_layer_norm(x, residual, gamma, beta, keep, eps):
    """LayerNorm of (x + residual) with mean/variance over the kept channels only (WID_METHOD §6).

    γ and β are applied to every channel, so channels whose γ, β are zero come out as zero and
    the narrower student's ordinary LayerNorm computes exactly the kept channels.
    Statistics are computed in fp32 whatever the input dtype.
    """
    h = x if residual is None else x + residual
    if keep is None:
        return F.layer_norm(h, h.shape[-1:], gamma, beta, eps)
    hf = h.float()
    kf = keep.to(hf.dtype)
    count = kf.sum().clamp_min(1.0)
    mean = (hf * kf).sum(-1, keepdim=True) / count
    centered = hf - mean
    var = (centered.square() * kf).sum(-1, keepdim=True) / count
    y = centered * torch.rsqrt(var + eps)
    if gamma is not None:
        y = y * gamma.float()
    if beta is not None:
        y = y + beta.float()
    return y.to(h.dtype)


def keep_broadcast(keep, keep_axis, param):
    """A 1-D keep-mask over axis `keep_axis` of `param` (0: rows, 1: columns), shaped to broadcast."""
    if param.dim() == 1:
        return keep
    return keep[:, None] if keep_axis == 0 else keep[None, :]


UPDATE_RULES = ("authors", "additive")


def check_update_rule(update_rule: str) -> bool:
    """True for the authors' numerics, False for the additive variant; anything else is an error."""
    if update_rule not in UPDATE_RULES:
        raise ValueError(f"unknown WID update rule '{update_rule}'; choose one of: {', '.join(UPDATE_RULES)}")
    return update_rule == "authors"


@torch.no_grad()
def wid_adamw_step(param, grad, exp_avg, exp_avg_sq, keep, keep_axis, lr, beta1, beta2, eps, weight_decay, penalty,
                   masks_active, is_compactor, update_rule="authors"):
    """One in-place WID-AdamW step of one tensor (WID_METHOD §5).

    `keep` is None for a parameter the rule does not mask, else a 1-D bool mask along `keep_axis`.
    Before the first mask (`masks_active` False) compactors get g = ∇L + p. Afterwards
    g = m⊙∇L + (1−m)⊙min(λ,1)·p, and for λ > 1 the first-moment injection e = (1−m)⊙(λ−1)·p:

    - `update_rule="authors"` (uer/trainer.py + uer/utils/optimizers.py of the authors' code): before
      AdamW's step the whole first moment of a tensor under the rule is decayed and fed,
      exp_avg ← β1·exp_avg + (1−β1)·e (kept entries decay too); then AdamW without bias correction,
      p ← p − lr·exp_avg/(√v + eps), and weight decay afterwards on the updated value, p ← p·(1 − lr·wd).
    - `update_rule="additive"` (this package's earlier reading): exp_avg ← β1·exp_avg + (1−β1)·(g + e)
      in one decay, and weight decay first (torch.optim.AdamW's order): p ← p(1 − lr·wd) − lr·m/(√v + eps).
    """
    authors = check_update_rule(update_rule)
    g = grad
    extra = None
    if keep is not None:
        if not masks_active:
            if is_compactor:
                g = grad + param
        else:
            k = keep_broadcast(keep, keep_axis, param).to(param.dtype)
            drop = 1 - k
            g = k * grad + drop * (min(penalty, 1.0) * param)
            if penalty > 1:
                extra = drop * ((penalty - 1.0) * param)
    if extra is not None and authors:
        exp_avg.mul_(beta1).add_(extra, alpha=1 - beta1)
    exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
    if extra is not None and not authors:
        exp_avg.add_(extra, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if weight_decay and not authors:
        param.mul_(1 - lr * weight_decay)
    param.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-lr)
    if weight_decay and authors:
        param.mul_(1 - lr * weight_decay)


def wid_adamw_multi_tensor(params, grads, exp_avgs, exp_avg_sqs, keeps, keep_axes, is_compactor, lr, beta1, beta2, eps,
                           weight_decay, penalty, masks_active, update_rule="authors"):
    """The step over a list of tensors (one param group). Fused backends do this in one pass."""
    for i in range(len(params)):
        wid_adamw_step(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], keeps[i], keep_axes[i], lr, beta1, beta2, eps,
                       weight_decay, penalty, masks_active, is_compactor[i], update_rule)
