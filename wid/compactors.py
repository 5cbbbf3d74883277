"""Compactors: identity-initialised square matrices around every linear layer (WID_METHOD §2, §6).

`attach(model, config)` replaces, in place, the linears and LayerNorms of a Hugging Face masked-LM
encoder of any supported family (wid.architecture) with compactor-carrying versions; the model stays the same transformers model, so
`model(input_ids, attention_mask, labels=...)` works as before and, right after attaching,
computes exactly what the teacher computed.

All WID bookkeeping lives in one submodule, `model.wid_state` (`WIDState`): the keep-masks of the
groups H, A_l, F_l, M as registered buffers (so checkpoints restore them), the count of mask
updates so far, and, for `alignment="tied"`, the one compactor per group. Compacted modules hold a
plain (unregistered) reference to it.
"""
from __future__ import annotations

import torch
from torch import nn

import wid_kernels

from .architecture import (TeacherDims, base_model, embedding_projection, encoder_layers, ensure_mlm_head, family_of,
                           replace_at, submodule)
from .config import WIDConfig

HIDDEN = "hidden"
MLM = "mlm"


def attention_group(layer: int) -> str:
    return f"attention.{layer}"


def intermediate_group(layer: int) -> str:
    return f"intermediate.{layer}"


def _tied_key(group: str) -> str:
    return "compactor_" + group.replace(".", "_")


class WIDState(nn.Module):
    """Masks, mask-update count and (tied alignment) the shared compactors of one WID model."""

    def __init__(self, config: WIDConfig, dims: TeacherDims, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.dims = dims
        h, f, n = dims.hidden, dims.intermediate, dims.layers
        self.register_buffer("keep_hidden", torch.ones(h, dtype=torch.bool, device=device))
        self.register_buffer("keep_attention", torch.ones(n, h, dtype=torch.bool, device=device))
        self.register_buffer("keep_intermediate", torch.ones(n, f, dtype=torch.bool, device=device))
        self.register_buffer("keep_mlm", torch.ones(dims.mlm, dtype=torch.bool, device=device))
        self.register_buffer("mask_updates", torch.zeros((), dtype=torch.long, device=device))
        self._masks_active = False  # host mirror of mask_updates > 0: no device sync per forward
        self._views: dict = {}  # group -> (buffer, its row): one view object per mask, so per-mask caches hit
        if config.alignment == "tied":
            self.compactors = nn.ParameterDict(
                {_tied_key(g): nn.Parameter(torch.eye(self.group_width(g), device=device, dtype=dtype)) for g in self.groups()}
            )

    def groups(self) -> list[str]:
        names = [HIDDEN]
        for layer in range(self.dims.layers):
            names += [attention_group(layer), intermediate_group(layer)]
        return names + [MLM]

    def group_width(self, group: str) -> int:
        if group == MLM:
            return self.dims.mlm
        return self.dims.intermediate if group.startswith("intermediate") else self.dims.hidden

    def keep(self, group: str) -> torch.Tensor:
        """The bool keep-mask of a group (a view into the buffers; writes go through).

        Always the same tensor object for a group while its buffer lives (a new buffer after `.to()` gets a new
        view): the kernels cache the kept indices per mask object and version, and a fresh view per call would
        make every call a miss and a host sync (`nonzero`)."""
        if group == HIDDEN:
            return self.keep_hidden
        if group == MLM:
            return self.keep_mlm
        kind, layer = group.split(".")
        buffer = self.keep_attention if kind == "attention" else self.keep_intermediate
        cached = self._views.get(group)
        if cached is None or cached[0] is not buffer:
            cached = self._views[group] = (buffer, buffer[int(layer)])
        return cached[1]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_views"] = {}  # a copied view need not alias the copied buffer: rebuild them from the copy
        return state

    @property
    def masks_active(self) -> bool:
        """True once the first mask update has happened (WID_METHOD §5: the rule changes then)."""
        return self._masks_active

    def active_keep(self, group: str | None):
        """The keep-mask if masks are active, else None (forward ops then skip masking)."""
        if group is None or not self._masks_active:
            return None
        return self.keep(group)

    def tied_compactor(self, group: str) -> nn.Parameter:
        return self.compactors[_tied_key(group)]

    def mark_updated(self) -> None:
        self.mask_updates += 1
        self._masks_active = True

    def refresh(self) -> None:
        """Re-read the host mirror from the buffer, after anything that may have loaded weights."""
        self._masks_active = bool(self.mask_updates.item() > 0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.refresh()


class _UsesState(nn.Module):
    """Shared plumbing: an unregistered reference to the WIDState and per-side compactor lookup."""

    def _bind(self, state: WIDState, input_group: str | None, output_group: str | None):
        object.__setattr__(self, "_state", state)
        self.input_group = input_group
        self.output_group = output_group

    @property
    def state(self) -> WIDState:
        return self._state

    def _own_compactor(self, size: int, like: torch.Tensor) -> nn.Parameter | None:
        if self._state.config.alignment == "tied":
            return None
        return nn.Parameter(torch.eye(size, device=like.device, dtype=like.dtype))

    def input_matrix(self) -> torch.Tensor | None:
        """L (k×k), applied as x → x Lᵀ; tied alignment uses the group's compactor transposed."""
        if self.input_group is None:
            return None
        if self._state.config.alignment == "tied":
            return self._state.tied_compactor(self.input_group).t()
        return self.input_compactor

    def output_matrix(self) -> torch.Tensor | None:
        """Q (m×m), applied as y → y Qᵀ."""
        if self.output_group is None:
            return None
        if self._state.config.alignment == "tied":
            return self._state.tied_compactor(self.output_group)
        return self.output_compactor


class CompactedLinear(_UsesState):
    """A linear layer between an input compactor L and an output compactor Q: y = x (Q W L)ᵀ + Q b.

    Keeps the original `weight`/`bias` Parameter objects, so weight tying survives and the state
    dict keeps the teacher's names.
    """

    def __init__(self, linear: nn.Linear, state: WIDState, input_group: str | None, output_group: str | None):
        super().__init__()
        self._bind(state, input_group, output_group)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.input_compactor = self._own_compactor(self.in_features, linear.weight) if input_group else None
        self.output_compactor = self._own_compactor(self.out_features, linear.weight) if output_group else None

    def forward(self, x):
        return wid_kernels.compacted_linear(
            x,
            self.output_matrix(),
            self.weight,
            self.input_matrix(),
            self.bias,
            keep_out=self._state.active_keep(self.output_group),
            keep_in=self._state.active_keep(self.input_group),
        )

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, input_group={self.input_group}, output_group={self.output_group}"


class MaskedLayerNorm(_UsesState):
    """LayerNorm whose statistics run over the kept channels of its group once masks exist (§6)."""

    def __init__(self, norm: nn.LayerNorm, state: WIDState, group: str):
        super().__init__()
        self._bind(state, None, None)
        self.group = group
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps
        self.normalized_shape = norm.normalized_shape

    def forward(self, x, residual=None):
        return wid_kernels.masked_layer_norm(x, residual, self.weight, self.bias, self._state.active_keep(self.group),
                                             self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.normalized_shape)}, eps={self.eps}, group={self.group}"


class ResidualNormBlock(nn.Module):
    """A BERT-style output block, LayerNorm(dropout(dense(h)) + residual), with the residual add done inside
    the masked LayerNorm kernel: one pass over the activations fewer in the forward, none in the backward.

    Keeps the block's children under their names, so parameter names and the fold are unchanged.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.dense, self.dropout, self.LayerNorm = block.dense, block.dropout, block.LayerNorm

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)), input_tensor)


def _fuse_residual(layer: nn.Module, path: str) -> None:
    """Swap in ResidualNormBlock where the block has exactly the children it expects (else leave it as is)."""
    block = submodule(layer, path)
    children = dict(block.named_children())
    if set(children) == {"dense", "dropout", "LayerNorm"} and isinstance(children["LayerNorm"], MaskedLayerNorm):
        replace_at(layer, path, ResidualNormBlock(block))


class CompactedEmbeddingNorm(MaskedLayerNorm):
    """Replaces the embedding LayerNorm: applies the embedding output compactor E, then the masked LN.

    Putting E here (on the sum of word, position and type embeddings) leaves Hugging Face's
    embedding code untouched.
    """

    def __init__(self, norm: nn.LayerNorm, state: WIDState):
        super().__init__(norm, state, HIDDEN)
        self.output_group = HIDDEN
        self.output_compactor = self._own_compactor(norm.normalized_shape[0], norm.weight)

    def forward(self, x):
        x = torch.nn.functional.linear(x, self.output_matrix())
        return super().forward(x)


def attach(model, config: WIDConfig):
    """Insert identity compactors into a masked-LM encoder (or a base encoder, which gets an MLM head).

    Returns the model to train: the same object for a `*ForMaskedLM`, the family's masked-LM model wrapping
    the given encoder for a base model. Raises UnsupportedModelError / ValueError with the fix.
    """
    model = ensure_mlm_head(model)
    if hasattr(model, "wid_state"):
        raise ValueError("this model already has WID compactors; attach once, or fold it first with wid.fold")
    family = family_of(model)
    dims = TeacherDims.from_config(model.config)
    config = config.for_teacher(dims)
    embeddings = base_model(model).embeddings
    reference = embeddings.word_embeddings.weight
    state = WIDState(config, dims, device=reference.device, dtype=reference.dtype)
    model.add_module("wid_state", state)

    projection = embedding_projection(model)
    if projection is None:
        embeddings.LayerNorm = CompactedEmbeddingNorm(embeddings.LayerNorm, state)
    else:  # ELECTRA: the embedding space keeps its width; the projection's output compactor opens H
        base_model(model).embeddings_project = CompactedLinear(projection, state, None, HIDDEN)
    sides = dict(query=(HIDDEN, "A"), key=(HIDDEN, "A"), value=(HIDDEN, "A"), attention_output=("A", HIDDEN),
                 ffn_up=(HIDDEN, "F"), ffn_down=("F", HIDDEN))
    for index, layer in enumerate(encoder_layers(model)):
        groups = {HIDDEN: HIDDEN, "A": attention_group(index), "F": intermediate_group(index)}
        for role, path in family.layer_paths().items():
            if role in sides:
                inputs, outputs = sides[role]
                replace_at(layer, path, CompactedLinear(submodule(layer, path), state, groups[inputs], groups[outputs]))
            else:
                replace_at(layer, path, MaskedLayerNorm(submodule(layer, path), state, HIDDEN))
        for path in family.residual_blocks:
            _fuse_residual(layer, path)
    replace_at(model, family.head_dense, CompactedLinear(submodule(model, family.head_dense), state, HIDDEN, MLM))
    replace_at(model, family.head_norm, MaskedLayerNorm(submodule(model, family.head_norm), state, MLM))
    replace_at(model, family.decoder, CompactedLinear(submodule(model, family.decoder), state, MLM, None))
    model.config.wid = config.to_dict()
    return model


def unwrap(model):
    """The model inside DDP/FSDP/compile wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


def wid_state(model) -> WIDState:
    state = getattr(model, "wid_state", None)
    if state is None:
        raise ValueError("this model has no WID compactors; call wid.attach(model, config) first")
    return state


def is_compactor_name(name: str) -> bool:
    return "compactor" in name
