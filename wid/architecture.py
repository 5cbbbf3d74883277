"""Which teachers WID supports, their dimensions, and the MLM head a bare encoder gets.

WID needs a BERT-family encoder with absolute positions, hidden = heads × head width, and an
activation with act(0) = 0 (so pruned channels stay exactly zero through the FFN and MLM head).
A `BertModel` (e.g. a sentence encoder such as all-MiniLM-L6-v2) is wrapped into a
`BertForMaskedLM` whose decoder is tied to the word embeddings (WID_METHOD §7, "head warm-up").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import BertForMaskedLM, BertModel
from transformers.activations import ACT2FN


class UnsupportedModelError(ValueError):
    """The teacher is not a model WID can compress."""


@dataclass(frozen=True)
class TeacherDims:
    layers: int
    hidden: int
    heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "TeacherDims":
        check_supported_config(config)
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            head_dim=config.hidden_size // config.num_attention_heads,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
        )


def check_supported_config(config) -> None:
    """Raise a one-line UnsupportedModelError naming the fix if WID cannot run on this config."""
    model_type = getattr(config, "model_type", None)
    if model_type != "bert":
        raise UnsupportedModelError(
            f"WID supports BERT-family teachers (model_type 'bert'), got '{model_type}'; "
            "load a BertForMaskedLM or BertModel checkpoint"
        )
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError("WID needs a bidirectional encoder; set is_decoder=False and add_cross_attention=False")
    position_type = getattr(config, "position_embedding_type", "absolute") or "absolute"
    if position_type != "absolute":
        raise UnsupportedModelError(
            f"position_embedding_type='{position_type}' is not supported (its tables depend on the head width); "
            "use a teacher with absolute position embeddings"
        )
    if config.hidden_size % config.num_attention_heads:
        raise UnsupportedModelError(
            f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads {config.num_attention_heads}"
        )
    act = config.hidden_act
    fn = ACT2FN[act] if isinstance(act, str) else act
    if float(fn(torch.zeros(1))[0]) != 0.0:
        raise UnsupportedModelError(f"activation '{act}' is not zero at zero, so pruned channels would not stay pruned")


def ensure_mlm_head(model):
    """Return a BertForMaskedLM: the model itself, or a bare BertModel wrapped with a fresh MLM head.

    The new head's decoder is tied to the word embeddings; its transform starts as the identity
    (dense = I, bias 0, LayerNorm γ=1, β=0) and the decoder bias at zero, so the head starts as
    "LayerNorm(act(h)) · Eᵀ" and the trainer's head warm-up learns the rest.
    """
    if isinstance(model, BertForMaskedLM):
        check_supported_config(model.config)
        return model
    if not isinstance(model, BertModel):
        raise UnsupportedModelError(
            f"WID supports BertForMaskedLM and BertModel, got {type(model).__name__}; "
            "load the teacher with AutoModelForMaskedLM or AutoModel"
        )
    check_supported_config(model.config)
    config = model.config
    param = next(model.parameters())
    with torch.device(param.device):
        wrapped = BertForMaskedLM(config)
    wrapped.bert = model
    transform = wrapped.cls.predictions.transform
    with torch.no_grad():
        transform.dense.weight.copy_(torch.eye(config.hidden_size))
        transform.dense.bias.zero_()
        transform.LayerNorm.weight.fill_(1.0)
        transform.LayerNorm.bias.zero_()
        wrapped.cls.predictions.bias.zero_()
    wrapped.cls.predictions.decoder.weight = model.embeddings.word_embeddings.weight
    wrapped.cls.predictions.decoder.bias = wrapped.cls.predictions.bias
    wrapped.config.tie_word_embeddings = True
    return wrapped.to(param.dtype)
