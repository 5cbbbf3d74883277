"""The fold: compactors multiplied into the weights, pruned channels cut away (WID_METHOD §8).

`fold(model)` returns a plain `BertForMaskedLM` (or, with `with_head=False`, a `BertModel` with its
pooler) of a uniform `BertConfig`, loadable anywhere with `from_pretrained` and no `wid` import.
Every linear becomes `W_S = Q[keep_out]·W·L[:, keep_in]`, `b_S = (Q·b)[keep_out]`; the attention
scale 1/√d_teacher is folded into the query (× √(d_s/d_teacher)); embeddings, LayerNorms and the
pooler are index-selected. The computation is done in fp32 on the CPU and checked for non-finite
values; `verify_fold` compares the logits of the compactor model and the student.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import BertForMaskedLM

import wid_kernels

from .compactors import wid_state


class FoldError(ValueError):
    """The masks do not describe a uniform student yet."""


def _indices(keep: torch.Tensor) -> torch.Tensor:
    return keep.nonzero().flatten().cpu()


def _f32(t):
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float32)


def kept_indices(model) -> dict:
    """Sorted kept index lists of every group, checked to describe one uniform BERT student."""
    state = wid_state(model)
    dims, config = state.dims, state.config
    hidden = _indices(state.keep_hidden)
    mlm = _indices(state.keep_mlm)
    attention = [_indices(k) for k in state.keep_attention]
    intermediate = [_indices(k) for k in state.keep_intermediate]
    width = len(hidden)
    problems = []
    if len(mlm) != width:
        problems.append(f"M keeps {len(mlm)} channels but H keeps {width}")
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
    if problems:
        raise FoldError(
            "the masks do not describe a uniform BERT yet (" + "; ".join(problems) + "); "
            "train until the schedule reaches its target or call wid.prune(model) first"
        )
    heads = dims.heads if config.strategy == "dim" else width // dims.head_dim
    return dict(hidden=hidden, mlm=mlm, attention=attention, intermediate=intermediate, heads=heads)


def student_config(model, kept: dict):
    """The uniform BertConfig of the student."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "wid"):
        del config.wid
    config.hidden_size = len(kept["hidden"])
    config.num_attention_heads = kept["heads"]
    config.intermediate_size = len(kept["intermediate"][0])
    config.architectures = ["BertForMaskedLM"]
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

    @property
    def bias_keys(self) -> tuple[str, ...]:
        if self.name == "cls.predictions.decoder":  # Hugging Face stores the decoder bias twice
            return (f"{self.name}.bias", "cls.predictions.bias")
        return (f"{self.name}.bias",)

    def folded(self, keep_in: torch.Tensor | None = None) -> tuple:
        """(W_S, b_S) in fp32 on the CPU; `keep_in` to fold other input columns (the removed ones, for compensation)."""
        m = self.module
        return wid_kernels.reference.fold(
            _f32(m.output_matrix()), _f32(m.weight), _f32(m.input_matrix()), _f32(m.bias),
            self.keep_out, self.keep_in if keep_in is None else keep_in, self.scale,
        )


def linear_folds(model, kept: dict) -> list[LinearFold]:
    """Every compacted linear of the model with its kept rows and columns, in the model's order."""
    dims = wid_state(model).dims
    hidden, mlm = kept["hidden"], kept["mlm"]
    query_scale = math.sqrt(len(hidden) // kept["heads"] / dims.head_dim)
    folds = []
    for index, layer in enumerate(model.bert.encoder.layer):
        prefix, attention, inner = f"bert.encoder.layer.{index}", kept["attention"][index], kept["intermediate"][index]
        for name in ("query", "key", "value"):
            scale = query_scale if name == "query" and query_scale != 1.0 else None
            folds.append(LinearFold(f"{prefix}.attention.self.{name}", getattr(layer.attention.self, name), attention, hidden,
                                    scale, feeds_scores=name != "value"))
        folds += [
            LinearFold(f"{prefix}.attention.output.dense", layer.attention.output.dense, hidden, attention),
            LinearFold(f"{prefix}.intermediate.dense", layer.intermediate.dense, inner, hidden),
            LinearFold(f"{prefix}.output.dense", layer.output.dense, hidden, inner),
        ]
    predictions = model.cls.predictions
    folds.append(LinearFold("cls.predictions.transform.dense", predictions.transform.dense, mlm, hidden))
    folds.append(LinearFold("cls.predictions.decoder", predictions.decoder, None, mlm))
    return folds


@torch.no_grad()
def folded_state_dict(model, kept: dict, progressbar: bool | None = None) -> dict:
    """Tensors of the student, named as in a plain BertForMaskedLM (plus the pooler, if any)."""
    dims = wid_state(model).dims
    hidden, mlm = kept["hidden"], kept["mlm"]
    out = {}
    embeddings = model.bert.embeddings
    e_out = _f32(embeddings.LayerNorm.output_matrix())[hidden]  # |H| × h
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        out[f"bert.embeddings.{name}.weight"] = _f32(getattr(embeddings, name).weight) @ e_out.t()
    norms = {"bert.embeddings.LayerNorm": (embeddings.LayerNorm, hidden)}
    for index, layer in enumerate(model.bert.encoder.layer):
        norms[f"bert.encoder.layer.{index}.attention.output.LayerNorm"] = (layer.attention.output.LayerNorm, hidden)
        norms[f"bert.encoder.layer.{index}.output.LayerNorm"] = (layer.output.LayerNorm, hidden)
    norms["cls.predictions.transform.LayerNorm"] = (model.cls.predictions.transform.LayerNorm, mlm)
    for name, (norm, keep) in norms.items():
        out[f"{name}.weight"], out[f"{name}.bias"] = _f32(norm.weight)[keep], _f32(norm.bias)[keep]

    show = progressbar if progressbar is not None else dims.hidden * dims.layers >= 768 * 12
    for spec in tqdm(linear_folds(model, kept), desc="folding", disable=not show):
        weight, bias = spec.folded()
        out[f"{spec.name}.weight"] = weight
        for key in spec.bias_keys:
            out[key] = bias

    pooler = getattr(model.bert, "pooler", None)
    if pooler is not None:
        out["bert.pooler.dense.weight"] = _f32(pooler.dense.weight)[hidden][:, hidden]
        out["bert.pooler.dense.bias"] = _f32(pooler.dense.bias)[hidden]
    check_finite(out)
    return out


def check_finite(tensors: dict) -> None:
    bad = [name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise FoldError(f"non-finite values in the folded {bad[0]} (and {len(bad) - 1} more); the training diverged: "
                        "fold an earlier checkpoint")


@torch.no_grad()
def fold(model, with_head: bool = True, progressbar: bool | None = None, compensation=None):
    """Fold an attached model into a plain student (BertForMaskedLM, or BertModel with pooler).

    Exact when the masked entries are zero (after `wid.prune`, or closely after WID training);
    the compactor model is left unchanged. `compensation` (a calibrated `wid.compensate.CutCompensation`)
    replaces the linears by their compensated versions.
    """
    kept = kept_indices(model)
    config = student_config(model, kept)
    tensors = folded_state_dict(model, kept, progressbar)
    tie = torch.equal(tensors["bert.embeddings.word_embeddings.weight"], tensors["cls.predictions.decoder.weight"])
    if compensation is not None:
        tensors.update(compensation.student_tensors(keep_tie=bool(tie)))
        check_finite(tensors)
    config.tie_word_embeddings = bool(tie)
    with torch.device("cpu"):
        student = BertForMaskedLM(config)
    if "bert.pooler.dense.weight" in tensors:
        from transformers.models.bert.modeling_bert import BertPooler

        student.bert.pooler = BertPooler(config)
    missing, unexpected = student.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k not in ("cls.predictions.decoder.weight",) or not tie]
    if missing or unexpected:
        raise FoldError(f"internal error: student tensors missing {missing} / unexpected {unexpected}")
    student.eval()
    return student if with_head else student.bert


@torch.no_grad()
def verify_fold(model, student, batch_size: int = 4, seq_len: int = 24, seed: int = 0) -> float:
    """Max |logit difference| between the compactor model and the student on random padded inputs."""
    generator = torch.Generator().manual_seed(seed)
    vocab = student.config.vocab_size
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
    lengths = torch.randint(max(1, seq_len // 3), seq_len + 1, (batch_size,), generator=generator)
    lengths[0] = seq_len
    attention_mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    token_type_ids = torch.randint(0, student.config.type_vocab_size, (batch_size, seq_len), generator=generator)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        teacher_logits = model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), token_type_ids=token_type_ids.to(device)
        ).logits.float().cpu()
    finally:
        model.train(was_training)
    student_logits = student(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits.float()
    keep = attention_mask.bool()
    return float((teacher_logits - student_logits)[keep].abs().max())
