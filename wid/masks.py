"""Mask groups, channel scoring and the progressive pruning schedule (WID_METHOD §3–§4).

Four kinds of keep-mask: H (the residual stream, one for the whole network), A_l (attention
width of layer l), F_l (FFN width of layer l) and M (MLM-head transform width). Every `w_step`
training steps `update_masks` recomputes all masks from scratch from compactor norms (a channel can
come back), with the number of pruned channels growing linearly per update until the target.
`prune` jumps straight to the target and zeroes the masked entries (one-shot pruning), after which
the fold is exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .architecture import TeacherDims, encoder_layers, family_of, submodule
from .compactors import HIDDEN, MLM, CompactedEmbeddingNorm, CompactedLinear, MaskedLayerNorm, WIDState, wid_state
from .config import WIDConfig, per_head_cut_after


@dataclass(frozen=True)
class KeptWidths:
    """How many channels each kind of group keeps after a given number of mask updates."""

    hidden: int
    attention: int
    intermediate: int
    mlm: int


@dataclass
class MaskedParameter:
    """A parameter the update rule masks: `group`'s keep-mask runs along axis `dim` of `param`."""

    name: str
    param: nn.Parameter
    group: str
    dim: int  # 0: rows (output compactors, vectors); 1: columns (input compactors)
    is_compactor: bool


def _linear_growth(total: int, updates: int, length: int, rounding: str = "ceil") -> int:
    """Pruned count after `updates` mask updates: total · min(updates, length) / length, rounded down
    ("authors": their trainer takes int(updates · total/16)) or up ("ceil")."""
    if total <= 0 or updates <= 0:
        return 0
    done = min(updates, length)
    return total * done // length if rounding == "authors" else -(-total * done // length)


def kept_widths(config: WIDConfig, dims, updates: int) -> KeptWidths:
    """The schedule: kept widths after `updates` mask updates (0 = nothing pruned yet). `dims`: the teacher's
    `TeacherDims`, its Hugging Face config, or the teacher model."""
    if not isinstance(dims, TeacherDims):
        dims = TeacherDims.from_config(getattr(dims, "config", dims))
    if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
        raise ValueError(f"updates must be a number of mask updates (0 or more), got {updates!r}")
    if not config.resolved:
        config = config.for_teacher(dims)
    rounding = config.schedule_rounding
    if config.strategy == "dim":
        cut = dims.head_dim - config.student_head_dim()
        hidden = dims.heads * (dims.head_dim - per_head_cut_after(cut, updates, config.hidden_updates, rounding))
        attention = dims.heads * (dims.head_dim - per_head_cut_after(cut, updates, config.attention_updates, rounding))
    else:
        heads_cut = dims.heads - config.target_heads
        length = heads_cut * config.updates_per_head
        hidden = attention = dims.head_dim * (dims.heads - _linear_growth(heads_cut, updates, length, rounding))
    intermediate = dims.intermediate - _linear_growth(dims.intermediate - config.target_intermediate, updates,
                                                      config.intermediate_updates, rounding)
    mlm_target = config.target_hidden if dims.mlm_follows_hidden else dims.mlm
    mlm = dims.mlm - _linear_growth(dims.mlm - mlm_target, updates, config.mlm_updates, rounding)
    return KeptWidths(hidden=hidden, attention=attention, intermediate=intermediate, mlm=mlm)


def masked_parameters(model) -> list[MaskedParameter]:
    """Every parameter the update rule masks, with its group and mask axis (each parameter once)."""
    state = wid_state(model)
    tied = state.config.alignment == "tied"
    found: list[MaskedParameter] = []
    seen: set[int] = set()

    def add(name, param, group, dim, is_compactor):
        if param is not None and id(param) not in seen:
            seen.add(id(param))
            found.append(MaskedParameter(name, param, group, dim, is_compactor))

    for module_name, module in model.named_modules():
        if isinstance(module, CompactedLinear):
            if not tied:
                add(f"{module_name}.input_compactor", module.input_compactor, module.input_group, 1, True)
                add(f"{module_name}.output_compactor", module.output_compactor, module.output_group, 0, True)
            if module.output_group is not None:  # the decoder bias (no output group) is never masked
                add(f"{module_name}.bias", module.bias, module.output_group, 0, False)
        elif isinstance(module, MaskedLayerNorm):
            if isinstance(module, CompactedEmbeddingNorm) and not tied:
                add(f"{module_name}.output_compactor", module.output_compactor, HIDDEN, 0, True)
            add(f"{module_name}.weight", module.weight, module.group, 0, False)
            add(f"{module_name}.bias", module.bias, module.group, 0, False)
    if tied:
        for group in state.groups():
            add(f"wid_state.compactors.{group}", state.tied_compactor(group), group, 0, True)
    return found


def broadcast_keep(keep: torch.Tensor, param: torch.Tensor, dim: int) -> torch.Tensor:
    """The keep-mask shaped to broadcast against `param` along axis `dim`."""
    if param.dim() == 1:
        return keep
    return keep[:, None] if dim == 0 else keep[None, :]


def _representative(model, group: str) -> CompactedLinear:
    """The compactor the authors' code scores a group by (its input side is used)."""
    family = family_of(model)
    layers = encoder_layers(model)
    if group == HIDDEN:
        return submodule(layers[0], family.value)
    if group == MLM:
        return submodule(model, family.decoder)
    kind, index = group.split(".")
    return submodule(layers[int(index)], family.attention_output if kind == "attention" else family.ffn_down)


def channel_scores(model, group: str, criterion: str | None = None) -> torch.Tensor:
    """L2 norm per channel: of the representative's input-compactor columns, or over the whole group."""
    state = wid_state(model)
    criterion = criterion or state.config.criterion
    with torch.no_grad():
        if criterion == "representative":
            return _representative(model, group).input_matrix().detach().float().norm(dim=0)
        squared = torch.zeros(state.group_width(group), device=state.keep_hidden.device)
        for item in masked_parameters(model):
            if item.is_compactor and item.group == group:
                squared += item.param.detach().float().square().sum(dim=1 - item.dim)
        return squared.sqrt()


def _top(scores: torch.Tensor, count: int, dim: int = -1) -> torch.Tensor:
    """Bool mask of the `count` largest entries along `dim` (ties: lower index wins, deterministic)."""
    order = torch.argsort(scores, dim=dim, descending=True, stable=True)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter_(dim, order.narrow(dim, 0, count), True)


def select_channels(scores: torch.Tensor, kept: int, config: WIDConfig, dims: TeacherDims, chunked: bool) -> torch.Tensor:
    """Keep-mask of `kept` channels: flat top-k, or per head-sized chunk (dim) / whole chunks (head)."""
    if not chunked:
        return _top(scores, kept)
    chunks = scores.view(dims.heads, dims.head_dim)
    if config.strategy == "dim":
        return _top(chunks, kept // dims.heads, dim=1).view(-1)
    kept_heads = _top(chunks.sum(dim=1), kept // dims.head_dim)
    return kept_heads[:, None].expand(dims.heads, dims.head_dim).reshape(-1)


def _group_width(widths: KeptWidths, group: str) -> tuple[int, bool]:
    if group == HIDDEN:
        return widths.hidden, True
    if group == MLM:
        return widths.mlm, False
    if group.startswith("attention"):
        return widths.attention, True
    return widths.intermediate, False


@torch.no_grad()
def apply_widths(model, widths: KeptWidths) -> None:
    """Set every mask to keep `widths` channels, ranking channels afresh by the current compactors."""
    state: WIDState = wid_state(model)
    for group in state.groups():
        kept, chunked = _group_width(widths, group)
        scores = channel_scores(model, group)
        state.keep(group).copy_(select_channels(scores, kept, state.config, state.dims, chunked))


def apply_schedule(model, updates: int) -> KeptWidths:
    """Set every mask to the schedule's widths after `updates` updates."""
    state: WIDState = wid_state(model)
    widths = kept_widths(state.config, state.dims, updates)
    apply_widths(model, widths)
    state.mask_updates.fill_(updates)
    state._masks_active = updates > 0
    return widths


def update_masks(model) -> KeptWidths:
    """One scheduled mask update (call every `w_step` steps): re-rank and grow the pruned counts."""
    state = wid_state(model)
    return apply_schedule(model, int(state.mask_updates.item()) + 1)


@torch.no_grad()
def scale_masked_entries(model, factor: float, items: list[MaskedParameter] | None = None) -> None:
    """Multiply every masked entry (compactor rows/columns, biases, LayerNorm) by `factor`; kept entries stay.
    `items`: the model's masked_parameters, when a caller that runs this every step has them already."""
    state = wid_state(model)
    for item in masked_parameters(model) if items is None else items:
        keep = broadcast_keep(state.keep(item.group), item.param, item.dim)
        item.param.mul_(torch.where(keep, 1.0, factor).to(item.param.dtype))


def zero_masked_entries(model) -> None:
    """Set every masked entry (compactor rows/columns, biases, LayerNorm) to exactly zero."""
    scale_masked_entries(model, 0.0)


def prune(model) -> KeptWidths:
    """One-shot pruning: masks at the final target (ranked by the current compactors), masked entries zeroed.

    Also the "no training" baseline. Afterwards `wid.fold(model)` is exact.
    """
    state = wid_state(model)
    updates = max(int(state.mask_updates.item()), state.config.mask_updates_to_target(state.dims))
    widths = apply_schedule(model, updates)
    zero_masked_entries(model)
    return widths


def at_target(model) -> bool:
    """True when every mask keeps exactly the target width (the schedule has finished)."""
    state = wid_state(model)
    target = kept_widths(state.config, state.dims, state.config.mask_updates_to_target(state.dims))
    widths = current_widths(model)
    return state.masks_active and (widths["hidden"], widths["mlm"]) == (target.hidden, target.mlm) and set(
        widths["attention"]) == {target.attention} and set(widths["intermediate"]) == {target.intermediate}


def finalize(model) -> None:
    """Make the fold exact at the target width: keep the trained masks if they are at the target
    (re-ranking now would drop channels the penalty kept alive), else prune to it; zero masked entries.
    Call it before `wid.fold` after training: the penalty alone leaves the masked entries small, not 0."""
    if at_target(model):
        zero_masked_entries(model)
    else:
        prune(model)


def _masked_squares(model, compactors_only: bool) -> tuple[float, int]:
    """(sum of squares of the masked entries, number of masked compactor rows/columns)."""
    state = wid_state(model)
    total = torch.zeros((), device=state.keep_hidden.device)
    slices = 0
    with torch.no_grad():
        for item in masked_parameters(model):
            if compactors_only and not item.is_compactor:
                continue
            keep = state.keep(item.group)
            drop = ~broadcast_keep(keep, item.param, item.dim)
            total += (item.param.detach().float() * drop).square().sum()
            slices += int((~keep).sum()) if item.is_compactor else 0
    return float(total), slices


def masked_entry_norm(model) -> float:
    """L2 norm of all masked entries (compactors, biases, LayerNorms): 0 (after `finalize` or `prune`) means the fold is
    exact. Not a distance from exact: the LayerNorm and bias entries move at the teacher's learning rate and barely
    shrink, and most of them do not reach the kept channels; the penalty's progress is `masked_compactor_fraction`,
    the fold's exactness `wid.verify_fold`."""
    if not wid_state(model).masks_active:
        return float("nan")
    return _masked_squares(model, compactors_only=False)[0] ** 0.5


def masked_compactor_fraction(model) -> float:
    """The norm of the masked compactor entries over what they held at the identity initialisation (one 1 per
    masked row or column): ~0 when the penalty has done its work, 1 when it has not started. Compactor entries
    only, in numerator and denominator: masked biases and LayerNorms move at the teacher's learning rate and
    are measured by `masked_entry_norm`."""
    if not wid_state(model).masks_active:
        return float("nan")
    squares, slices = _masked_squares(model, compactors_only=True)
    return (squares / max(slices, 1)) ** 0.5


def current_widths(model) -> dict:
    """Kept channel counts of every group, as they are now (for logs and summaries)."""
    state = wid_state(model)
    return {
        "hidden": int(state.keep_hidden.sum()),
        "attention": [int(k.sum()) for k in state.keep_attention],
        "intermediate": [int(k.sum()) for k in state.keep_intermediate],
        "mlm": int(state.keep_mlm.sum()),
    }
