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


def _fold_linear(module, keep_out, keep_in, scale=None) -> tuple:
    return wid_kernels.reference.fold(
        _f32(module.output_matrix()), _f32(module.weight), _f32(module.input_matrix()), _f32(module.bias),
        keep_out, keep_in, scale,
    )


@torch.no_grad()
def folded_state_dict(model, kept: dict, progressbar: bool | None = None) -> dict:
    """Tensors of the student, named as in a plain BertForMaskedLM (plus the pooler, if any)."""
    state = wid_state(model)
    dims = state.dims
    hidden, mlm = kept["hidden"], kept["mlm"]
    student_head_dim = len(hidden) // kept["heads"]
    query_scale = math.sqrt(student_head_dim / dims.head_dim)
    out = {}
    embeddings = model.bert.embeddings
    e_out = _f32(embeddings.LayerNorm.output_matrix())[hidden]  # |H| × h
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        out[f"bert.embeddings.{name}.weight"] = _f32(getattr(embeddings, name).weight) @ e_out.t()
    out["bert.embeddings.LayerNorm.weight"] = _f32(embeddings.LayerNorm.weight)[hidden]
    out["bert.embeddings.LayerNorm.bias"] = _f32(embeddings.LayerNorm.bias)[hidden]

    layers = model.bert.encoder.layer
    show = progressbar if progressbar is not None else dims.hidden * dims.layers >= 768 * 12
    for index in tqdm(range(len(layers)), desc="folding", disable=not show):
        layer, prefix = layers[index], f"bert.encoder.layer.{index}"
        attention, inner = kept["attention"][index], kept["intermediate"][index]
        self_attention = layer.attention.self
        for name in ("query", "key", "value"):
            scale = query_scale if name == "query" and query_scale != 1.0 else None
            w, b = _fold_linear(getattr(self_attention, name), attention, hidden, scale)
            out[f"{prefix}.attention.self.{name}.weight"], out[f"{prefix}.attention.self.{name}.bias"] = w, b
        parts = (
            ("attention.output", layer.attention.output, hidden, attention),
            ("intermediate", layer.intermediate, inner, hidden),
            ("output", layer.output, hidden, inner),
        )
        for path, block, keep_out, keep_in in parts:
            w, b = _fold_linear(block.dense, keep_out, keep_in)
            out[f"{prefix}.{path}.dense.weight"], out[f"{prefix}.{path}.dense.bias"] = w, b
            if hasattr(block, "LayerNorm"):
                out[f"{prefix}.{path}.LayerNorm.weight"] = _f32(block.LayerNorm.weight)[hidden]
                out[f"{prefix}.{path}.LayerNorm.bias"] = _f32(block.LayerNorm.bias)[hidden]

    predictions = model.cls.predictions
    transform = predictions.transform
    w, b = _fold_linear(transform.dense, mlm, hidden)
    out["cls.predictions.transform.dense.weight"], out["cls.predictions.transform.dense.bias"] = w, b
    out["cls.predictions.transform.LayerNorm.weight"] = _f32(transform.LayerNorm.weight)[mlm]
    out["cls.predictions.transform.LayerNorm.bias"] = _f32(transform.LayerNorm.bias)[mlm]
    w, _ = _fold_linear(predictions.decoder, None, mlm)
    out["cls.predictions.decoder.weight"] = w
    out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"] = _f32(predictions.bias)

    pooler = getattr(model.bert, "pooler", None)
    if pooler is not None:
        out["bert.pooler.dense.weight"] = _f32(pooler.dense.weight)[hidden][:, hidden]
        out["bert.pooler.dense.bias"] = _f32(pooler.dense.bias)[hidden]

    bad = [name for name, tensor in out.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise FoldError(f"non-finite values in the folded {bad[0]} (and {len(bad) - 1} more); the training diverged: "
                        "fold an earlier checkpoint")
    return out


@torch.no_grad()
def fold(model, with_head: bool = True, progressbar: bool | None = None):
    """Fold an attached model into a plain student (BertForMaskedLM, or BertModel with pooler).

    Exact when the masked entries are zero (after `wid.prune`, or closely after WID training);
    the compactor model is left unchanged.
    """
    kept = kept_indices(model)
    config = student_config(model, kept)
    tensors = folded_state_dict(model, kept, progressbar)
    tie = torch.equal(tensors["bert.embeddings.word_embeddings.weight"], tensors["cls.predictions.decoder.weight"])
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
