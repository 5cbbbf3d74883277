"""The fold: compactors multiplied into the weights, pruned channels cut away (WID_METHOD §8).

`fold(model)` returns a plain masked-LM model of the teacher's own class (`BertForMaskedLM`,
`RobertaForMaskedLM`, …; with `with_head=False` its base encoder, with the pooler if the teacher had one)
and a uniform config of the same `model_type`, loadable anywhere with `from_pretrained` and no `wid` import.
Every linear becomes `W_S = Q[keep_out]·W·L[:, keep_in]`, `b_S = (Q·b)[keep_out]`; the attention
scale 1/√d_teacher is folded into the query (× √(d_s/d_teacher)); embeddings, LayerNorms and the
pooler are index-selected. The computation is done in fp32 on the CPU and checked for non-finite
values; the student has the dtype of the model's weights. `verify_fold` compares the logits of the
compactor model and the student (for a base-encoder student, the kept hidden channels of their outputs).
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
import wid_kernels

from .architecture import (base_model, base_prefix, embedding_projection, encoder_layers, family_of, model_inputs,
                           set_widths, submodule)
from .compactors import unwrap, wid_state


class FoldError(ValueError):
    """The masks do not describe a uniform student yet."""


def _indices(keep: torch.Tensor) -> torch.Tensor:
    return keep.nonzero().flatten().cpu()


def _f32(t):
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float32)


def kept_indices(model) -> dict:
    """Sorted kept index lists of every group, checked to describe one uniform student."""
    state = wid_state(model)
    dims, config = state.dims, state.config
    hidden = _indices(state.keep_hidden)
    mlm = _indices(state.keep_mlm)
    attention = [_indices(k) for k in state.keep_attention]
    intermediate = [_indices(k) for k in state.keep_intermediate]
    width = len(hidden)
    problems = []
    mlm_width = width if dims.mlm_follows_hidden else dims.mlm
    if len(mlm) != mlm_width:
        problems.append(f"M keeps {len(mlm)} channels but should keep {mlm_width}")
    if any(len(a) != width for a in attention):
        problems.append(f"attention widths {sorted({len(a) for a in attention})} differ from the hidden width {width}")
    if len({len(f) for f in intermediate}) != 1:
        problems.append(f"FFN widths differ across layers: {sorted({len(f) for f in intermediate})}")
    for keep in [state.keep_hidden, *state.keep_attention]:
        per_head = keep.view(dims.heads, dims.head_dim).sum(dim=1)
        if config.strategy == "dim" and len(set(per_head.tolist())) != 1:
            problems.append(f"heads keep unequal widths {per_head.tolist()}")
            break
        if config.strategy == "head" and not all(c in (0, dims.head_dim) for c in per_head.tolist()):
            problems.append(f"head strategy with partially kept heads {per_head.tolist()}")
            break
    if width == 0:
        problems.append("no hidden channel is kept")
    if not dims.mlm_follows_hidden and width == dims.mlm:
        problems.append(f"the hidden width {width} equals the embedding width, where ELECTRA has no embeddings_project")
    if problems:
        raise FoldError(
            "the masks do not describe a uniform student yet (" + "; ".join(problems) + "); "
            "train until the schedule reaches its target or call wid.prune(model) first"
        )
    heads = dims.heads if config.strategy == "dim" else width // dims.head_dim
    return dict(hidden=hidden, mlm=mlm, attention=attention, intermediate=intermediate, heads=heads)


def student_config(model, kept: dict):
    """The uniform config of the student: the teacher's, of the same model_type, at the kept widths."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "wid"):
        del config.wid
    set_widths(config, len(kept["hidden"]), kept["heads"], len(kept["intermediate"][0]))
    config.architectures = [type(model).__name__]
    return config


@dataclass(frozen=True)
class LinearFold:
    """One compacted linear of the model and how it folds: W_S = Q[keep_out]·W·L[:, keep_in] (× scale)."""

    name: str  # the module's name, which is also the student's tensor prefix
    module: torch.nn.Module
    keep_out: torch.Tensor | None
    keep_in: torch.Tensor
    scale: float | None = None
    feeds_scores: bool = False  # query/key: its output enters the attention scores (bilinear, see wid.compensate)

    bias_alias: str | None = None  # a second state-dict name of the same bias (Hugging Face's decoder bias)

    @property
    def bias_keys(self) -> tuple[str, ...]:
        return (f"{self.name}.bias",) + ((self.bias_alias,) if self.bias_alias else ())

    def folded(self, keep_in: torch.Tensor | None = None) -> tuple:
        """(W_S, b_S) in fp32 on the CPU; `keep_in` to fold other input columns (the removed ones, for compensation)."""
        m = self.module
        return wid_kernels.reference.fold(
            _f32(m.output_matrix()), _f32(m.weight), _f32(m.input_matrix()), _f32(m.bias),
            self.keep_out, self.keep_in if keep_in is None else keep_in, self.scale,
        )


def linear_folds(model, kept: dict) -> list[LinearFold]:
    """Every compacted linear of the model with its kept rows and columns, in the model's order."""
    family, dims = family_of(model), wid_state(model).dims
    hidden, mlm = kept["hidden"], kept["mlm"]
    query_scale = math.sqrt(len(hidden) // kept["heads"] / dims.head_dim)
    prefix = base_prefix(model)
    folds = []
    projection = embedding_projection(model)
    if projection is not None:
        folds.append(LinearFold(f"{prefix}.{family.embedding_projection}", projection, hidden, torch.arange(projection.in_features)))
    for index, layer in enumerate(encoder_layers(model)):
        at = f"{prefix}.{family.layers}.{index}"
        attention, inner = kept["attention"][index], kept["intermediate"][index]
        for path in (family.query, family.key, family.value):
            scale = query_scale if path == family.query and query_scale != 1.0 else None
            folds.append(LinearFold(f"{at}.{path}", submodule(layer, path), attention, hidden, scale,
                                    feeds_scores=path != family.value))
        folds += [
            LinearFold(f"{at}.{family.attention_output}", submodule(layer, family.attention_output), hidden, attention),
            LinearFold(f"{at}.{family.ffn_up}", submodule(layer, family.ffn_up), inner, hidden),
            LinearFold(f"{at}.{family.ffn_down}", submodule(layer, family.ffn_down), hidden, inner),
        ]
    folds.append(LinearFold(family.head_dense, submodule(model, family.head_dense), mlm, hidden))
    folds.append(LinearFold(family.decoder, submodule(model, family.decoder), None, mlm, bias_alias=family.decoder_bias_alias))
    return folds


def word_embedding_key(model) -> str:
    return f"{base_prefix(model)}.embeddings.word_embeddings.weight"


@torch.no_grad()
def folded_state_dict(model, kept: dict, progressbar: bool | None = None) -> dict:
    """Tensors of the student, named as in the teacher's plain masked-LM class (plus the pooler, if any)."""
    family, dims = family_of(model), wid_state(model).dims
    hidden, mlm = kept["hidden"], kept["mlm"]
    prefix, encoder = base_prefix(model), base_model(model)
    out = {}
    embeddings = encoder.embeddings
    tables = [name for name in ("word_embeddings", "position_embeddings", "token_type_embeddings") if hasattr(embeddings, name)]
    norms = {}
    if embedding_projection(model) is None:  # the embedding output compactor E sits on the embedding LayerNorm
        e_out = _f32(embeddings.LayerNorm.output_matrix())[hidden]  # |H| × h
        for name in tables:
            out[f"{prefix}.embeddings.{name}.weight"] = _f32(getattr(embeddings, name).weight) @ e_out.t()
        norms[f"{prefix}.embeddings.LayerNorm"] = (embeddings.LayerNorm, hidden)
    else:  # ELECTRA's embedding space keeps its width
        for name in tables:
            out[f"{prefix}.embeddings.{name}.weight"] = _f32(getattr(embeddings, name).weight)
        norms[f"{prefix}.embeddings.LayerNorm"] = (embeddings.LayerNorm, None)
    for index, layer in enumerate(encoder_layers(model)):
        for path in (family.attention_norm, family.ffn_norm):
            norms[f"{prefix}.{family.layers}.{index}.{path}"] = (submodule(layer, path), hidden)
    norms[family.head_norm] = (submodule(model, family.head_norm), mlm)
    for name, (norm, keep) in norms.items():
        weight, bias = _f32(norm.weight), _f32(norm.bias)
        out[f"{name}.weight"], out[f"{name}.bias"] = (weight, bias) if keep is None else (weight[keep], bias[keep])

    show = progressbar if progressbar is not None else dims.hidden * dims.layers >= 768 * 12
    for spec in tqdm(linear_folds(model, kept), desc="folding", disable=not show):
        weight, bias = spec.folded()
        out[f"{spec.name}.weight"] = weight
        for key in spec.bias_keys:
            out[key] = bias

    pooler = getattr(encoder, "pooler", None)
    if pooler is not None:
        out[f"{prefix}.pooler.dense.weight"] = _f32(pooler.dense.weight)[hidden][:, hidden]
        out[f"{prefix}.pooler.dense.bias"] = _f32(pooler.dense.bias)[hidden]
    check_finite(out)
    return out


def check_finite(tensors: dict) -> None:
    bad = [name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise FoldError(f"non-finite values in the folded {bad[0]} (and {len(bad) - 1} more); the training diverged: "
                        "fold an earlier checkpoint")


@torch.no_grad()
def fold(model, with_head: bool = True, progressbar: bool | None = None, compensation=None):
    """Fold an attached model into a plain student of the teacher's class (or its base encoder, with pooler).

    Exact when the masked entries are zero (after `wid.finalize` or `wid.prune`);
    the compactor model is left unchanged. `compensation` (a calibrated `wid.compensate.CutCompensation`)
    replaces the linears by their compensated versions. A torch.compile'd model is folded as the model it wraps.
    """
    model = unwrap(model)
    family = family_of(model)
    state = wid_state(model)
    if not state.masks_active and state.config.mask_updates_to_target(state.dims) > 0:
        warnings.warn("wid.fold: no channel is masked yet, so the student is the whole teacher; train with "
                      "wid.update_masks every w_step steps, or call wid.prune(model) first to cut to the target", stacklevel=3)
    kept = kept_indices(model)
    config = student_config(model, kept)
    tensors = folded_state_dict(model, kept, progressbar)
    words, decoder = tensors[word_embedding_key(model)], tensors[f"{family.decoder}.weight"]
    tie = words.shape == decoder.shape and torch.equal(words, decoder)
    if compensation is not None:
        tensors.update(compensation.student_tensors(keep_tie=bool(tie)))
        check_finite(tensors)
    config.tie_word_embeddings = bool(tie)
    prefix = base_prefix(model)
    with torch.device("cpu"):
        student = type(model)(config)
        if f"{prefix}.pooler.dense.weight" in tensors:
            setattr(student, prefix, type(base_model(model))(config, add_pooling_layer=True))
            if tie:
                student.tie_weights()
    missing, unexpected = student.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k != f"{family.decoder}.weight" or not tie]
    if missing or unexpected:
        raise FoldError(f"internal error: student tensors missing {missing} / unexpected {unexpected}")
    dtype = model.get_input_embeddings().weight.dtype
    if dtype != torch.float32:  # folded in fp32, stored as the model was (a bf16 model gives a bf16 student)
        student.to(dtype)
    student.eval()
    return student if with_head else base_model(student)


@torch.no_grad()
def fold_check_inputs(config, batch_size: int = 4, seq_len: int = 24, seed: int = 0) -> dict:
    """The fixed random padded batch on which a fold is checked (the same for every model of this config)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator)
    lengths = torch.randint(max(1, seq_len // 3), seq_len + 1, (batch_size,), generator=generator)
    lengths[0] = seq_len
    attention_mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    types = getattr(config, "type_vocab_size", 1) or 1
    token_type_ids = torch.randint(0, types, (batch_size, seq_len), generator=generator)
    return dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


@torch.no_grad()
def _outputs_in_eval_mode(module, model, inputs: dict):
    """`module`'s outputs on `inputs` (the entries `model`'s family takes), run in eval mode on its own device."""
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    try:
        return module(**{k: v.to(device) for k, v in model_inputs(model, inputs).items()})
    finally:
        module.train(was_training)


def check_logits(model, inputs: dict) -> torch.Tensor:
    """`model`'s fp32 logits (on the CPU) at the real tokens of `inputs` (`fold_check_inputs`), in eval mode."""
    logits = _outputs_in_eval_mode(model, model, inputs).logits.float().cpu()
    return logits[inputs["attention_mask"].bool()]


def check_hidden_states(model, inputs: dict, channels: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 last hidden states (on the CPU) of `model`'s encoder at the real tokens of `inputs`, at `channels`."""
    hidden = _outputs_in_eval_mode(base_model(model), model, inputs).last_hidden_state.float().cpu()
    hidden = hidden[inputs["attention_mask"].bool()]
    return hidden if channels is None else hidden[:, channels]


def verify_fold(model, student, batch_size: int = 4, seq_len: int = 24, seed: int = 0) -> float:
    """Max |logit difference| between the compactor model and the student on random padded inputs; for a base-encoder
    student (`fold(model, with_head=False)`), max |difference| of the encoder outputs at the kept hidden channels
    (the compactor model's masked channels are zero there)."""
    model = unwrap(model)  # DDP, compile
    if getattr(model, "wid_state", None) is None or getattr(student, "wid_state", None) is not None:
        raise TypeError("verify_fold(model, student): `model` is the attached (compactor) model and `student` its fold")
    inputs = fold_check_inputs(student.config, batch_size, seq_len, seed)
    if base_model(student) is student:
        kept = kept_indices(model)["hidden"]
        return float((check_hidden_states(model, inputs, kept) - check_hidden_states(student, inputs)).abs().max())
    return float((check_logits(model, inputs) - check_logits(student, inputs)).abs().max())
