"""Shared fixtures: tiny random BERT teachers of arbitrary (odd) shapes, offline."""
import os
import random
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["WID_CACHE"] = tempfile.mkdtemp(prefix="wid-test-cache-")  # warmed-up heads of test runs stay out of ~/.cache

import torch

# Without a GPU the Triton kernels run under their interpreter; with one they must be compiled, so a GPU run tests
# what it names. Set once here, before any test module imports triton (tests/test_gpu_compiled.py checks it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import BertConfig, BertForMaskedLM  # noqa: E402


def make_teacher(layers=2, heads=3, head_dim=4, intermediate=19, vocab=53, seed=0, act="gelu", **extra):
    """A randomly initialised BertForMaskedLM in eval mode (no dropout), untied head by default."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_act=act,
        **extra,
    )
    model = BertForMaskedLM(config).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases, so the tests see every term
        for name, param in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.2)
    return model


def random_shapes(count, seed):
    """`count` random teacher shapes: layers, heads, head width, FFN width (odd sizes included)."""
    rng = random.Random(seed)
    return [
        dict(layers=rng.randint(1, 3), heads=rng.randint(2, 5), head_dim=rng.randint(3, 9), intermediate=rng.randint(7, 41), vocab=rng.randint(31, 97))
        for _ in range(count)
    ]


def random_batch(vocab, batch=3, seq_len=11, seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    attention_mask[1, seq_len // 2:] = 0
    return input_ids, attention_mask


@torch.no_grad()
def perturb(model, scale=0.1, seed=3):
    """Move every parameter (compactors included) away from its initial value."""
    generator = torch.Generator().manual_seed(seed)
    for _, param in model.named_parameters():
        param.add_(torch.randn(param.shape, generator=generator) * scale)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped where none is visible)")


@pytest.fixture
def teacher():
    return make_teacher()
