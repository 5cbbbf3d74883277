"""What an encoder (any supported family) costs: parameters and FLOPs per sequence, for comparing students and teachers.

FLOPs count the matrix products of one forward pass (2 per multiply-add): the six linears of every
layer (query, key, value, attention output, FFN up, FFN down) and the two attention products
(scores QKᵀ and the weighted sum of values). Embedding look-ups, LayerNorm, softmax and GELU are left
out (under 1% at 128 tokens), as are the pooler and the MLM head, which a downstream task replaces.
"""
from __future__ import annotations

from .architecture import embedding_size, has_embedding_projection, intermediate_size


def _widths(config) -> tuple[int, int, int, int]:
    attention = getattr(config, "attention_width", None) or config.hidden_size
    return config.num_hidden_layers, config.hidden_size, attention, intermediate_size(config)


def encoder_parameters(config) -> int:
    """Weights and biases of embeddings and encoder layers (no pooler, no MLM head) of a uniform config."""
    layers, h, a, f = _widths(config)
    e = embedding_size(config)
    types = getattr(config, "type_vocab_size", 0) or 0  # DistilBERT has no token types
    embeddings = (config.vocab_size + config.max_position_embeddings + types) * e + 2 * e
    if has_embedding_projection(config):  # ELECTRA's embeddings_project
        embeddings += e * h + h
    per_layer = (3 * (h * a + a) + (a * h + h) + 2 * h  # q, k, v, attention output, its LayerNorm
                 + (h * f + f) + (f * h + h) + 2 * h)  # FFN up, down, its LayerNorm
    return embeddings + layers * per_layer


def encoder_flops(config, seq_len: int = 128) -> int:
    """FLOPs of one forward pass over one `seq_len`-token sequence (training: about 3×)."""
    layers, h, a, f = _widths(config)
    linears = 2 * seq_len * (3 * h * a + a * h + 2 * h * f)
    attention = 2 * 2 * seq_len * seq_len * a
    return layers * (linears + attention)
