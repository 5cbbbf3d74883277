"""Parameter and FLOP counts of a BERT encoder, against the real model and a hand count."""
import pytest
from transformers import BertConfig, BertModel

from wid.model_cost import encoder_flops, encoder_parameters

from conftest import random_shapes


@pytest.mark.parametrize("shape", random_shapes(4, seed=11))
def test_parameter_count_matches_the_model_without_pooler(shape):
    config = BertConfig(vocab_size=shape["vocab"], hidden_size=shape["heads"] * shape["head_dim"], num_hidden_layers=shape["layers"],
                        num_attention_heads=shape["heads"], intermediate_size=shape["intermediate"], max_position_embeddings=37)
    model = BertModel(config, add_pooling_layer=False)
    assert encoder_parameters(config) == sum(p.numel() for p in model.parameters())


def test_flops_of_one_layer_by_hand():
    config = BertConfig(hidden_size=4, num_hidden_layers=1, num_attention_heads=2, intermediate_size=6)
    # q, k, v, o: 4 × (10 tokens × 4 × 4) multiply-adds; FFN: 2 × (10 × 4 × 6); QKᵀ and AV: 2 × (10 × 10 × 4)
    assert encoder_flops(config, seq_len=10) == 2 * (4 * 160 + 2 * 240 + 2 * 400)
    assert encoder_flops(BertConfig(), 128) == pytest.approx(22.35e9, rel=1e-3)  # BERT-base: ~22.3 GFLOPs per 128 tokens
