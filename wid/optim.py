"""The WID update rule inside AdamW (WID_METHOD §5).

Before the first mask update every compactor gets a plain L2 pull: g = ∇L + p. Afterwards, for
every masked parameter (compactors, and biases/LayerNorm of masked channels) with keep-mask m:

    g = m ⊙ ∇L + (1 − m) ⊙ min(λ, 1) · p,   e = (1 − m) ⊙ (λ − 1) · p   (e only if λ > 1)

The default `update_rule="authors"` reproduces the authors' numerics: before AdamW's own step the
first moment of every tensor under the rule becomes β1·exp_avg + (1−β1)·e; then AdamW without bias
correction, exp_avg ← β1·exp_avg + (1−β1)·g, exp_avg_sq ← β2·exp_avg_sq + (1−β2)·g²,
p ← p − lr · exp_avg / (√exp_avg_sq + eps), and weight decay last, p ← p·(1 − lr·wd).
`update_rule="additive"` is this package's earlier reading (e added to AdamW's update in one decay,
weight decay first); `wid_kernels.reference.wid_adamw_step` is the source of truth for both.
"""
from __future__ import annotations

import warnings

import torch

import wid_kernels

from .compactors import WIDState, is_compactor_name, wid_state
from .masks import MaskedParameter, masked_parameters


class WIDAdamW(torch.optim.Optimizer):
    """AdamW (no bias correction) with the WID update rule for the parameters in `masked`."""

    def __init__(self, params, state: WIDState, masked: list[MaskedParameter], lr=5e-5, betas=(0.9, 0.999), eps=1e-6,
                 weight_decay=0.0, penalty=20.0, update_rule="authors"):
        if lr < 0 or eps <= 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1:
            raise ValueError(f"invalid WIDAdamW hyper-parameters lr={lr} betas={betas} eps={eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.penalty = float(penalty)
        self.update_rule = update_rule
        object.__setattr__(self, "_wid", state)
        self._masked = {id(item.param): item for item in masked}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active = self._wid.masks_active
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lists = ([], [], [], [], [], [], [])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("WIDAdamW does not support sparse gradients")
                slot = self.state[p]
                if not slot:
                    slot["step"] = 0
                    slot["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    slot["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                slot["step"] += 1
                item = self._masked.get(id(p))
                for target, value in zip(lists, (
                    p, p.grad, slot["exp_avg"], slot["exp_avg_sq"],
                    None if item is None else self._wid.keep(item.group),
                    0 if item is None else item.dim,
                    item is not None and item.is_compactor,
                )):
                    target.append(value)
            if lists[0]:
                wid_kernels.wid_adamw_multi_tensor(
                    *lists, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"], penalty=self.penalty, masks_active=active,
                    update_rule=self.update_rule, check_masks=False,  # masked_parameters' masks: valid by construction
                )
        return loss


def parameter_groups(model, config=None) -> list[dict]:
    """Three groups: compactors (5e-5, wd), teacher matrices (1e-6, wd), teacher vectors (1e-6, no wd)."""
    config = config or wid_state(model).config
    compactors, matrices, vectors = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if is_compactor_name(name):
            compactors.append(param)
        elif param.dim() >= 2:
            matrices.append(param)
        else:
            vectors.append(param)
    groups = [
        dict(params=compactors, lr=config.compactor_lr, weight_decay=config.weight_decay, name="compactors"),
        dict(params=matrices, lr=config.teacher_lr, weight_decay=config.weight_decay, name="teacher_weights"),
        dict(params=vectors, lr=config.teacher_lr, weight_decay=0.0, name="teacher_biases_and_norms"),
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model, config=None) -> WIDAdamW:
    """The optimizer of WID_METHOD §5 for an attached model. Warns when the weights are bf16/fp16: they are the master
    weights here, and the teacher's small steps (1e-6 by default) round away in them."""
    state = wid_state(model)
    config = config or state.config
    half = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)})
    if half:
        warnings.warn(f"build_optimizer: the model's weights are {'/'.join(half)}, so steps as small as teacher_lr "
                      f"{config.teacher_lr:g} round away in them; keep fp32 weights and train under torch.autocast",
                      stacklevel=2)
    return WIDAdamW(
        parameter_groups(model, config),
        state=state,
        masked=masked_parameters(model),
        lr=config.compactor_lr,
        betas=config.adam_betas,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        penalty=config.penalty,
        update_rule=config.update_rule,
    )


def build_scheduler(optimizer: WIDAdamW, total_steps: int, config=None):
    """The learning-rate schedule `wid distill` trains with, for a hand-written loop (step it after each optimizer
    step): linear warm-up over `warmup_ratio` of `total_steps`, linear decay to 0, times Adam's bias-correction factor
    when `config.bias_correction` (default: the config of the optimizer's model). The optimizer itself has neither."""
    from transformers import get_linear_schedule_with_warmup

    from .training import warmup_steps_for, with_bias_correction

    config = config or optimizer._wid.config
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive number of optimizer steps, got {total_steps!r}")
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps_for(config, total_steps), total_steps)
    return with_bias_correction(scheduler, config)
