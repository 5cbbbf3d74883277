"""The WID update rule + AdamW without bias correction (WID_METHOD §5), against hand computation."""
import math

import pytest
import torch

import wid
from wid import WIDConfig

from conftest import make_teacher, perturb

BETA1, BETA2, EPS = 0.9, 0.999, 1e-6


def adam_by_hand(p, grad, keep, penalty, active, is_compactor, lr, decay, m=0.0, v=0.0):
    """One step for one scalar entry, written out from the method's text."""
    if not active:
        g, extra = (grad + p if is_compactor else grad), 0.0
    else:
        g = keep * grad + (1 - keep) * min(penalty, 1.0) * p
        extra = (1 - keep) * (penalty - 1.0) * p if penalty > 1 else 0.0
    m = BETA1 * m + (1 - BETA1) * g + (1 - BETA1) * extra
    v = BETA2 * v + (1 - BETA2) * g * g
    p = p * (1 - lr * decay) - lr * m / (math.sqrt(v) + EPS)
    return p, m, v


def test_a_masked_entry_by_hand_with_numbers():
    # p = 0.5, ∇ = 0.2, masked, λ = 20, lr = 0.1, no decay:
    # g = 0.5; m = 0.1·0.5 + 0.1·19·0.5 = 1.0; v = 0.001·0.25; p' = 0.5 − 0.1·1.0/(√0.00025 + 1e-6)
    p, m, v = adam_by_hand(0.5, 0.2, keep=0.0, penalty=20.0, active=True, is_compactor=True, lr=0.1, decay=0.0)
    assert m == pytest.approx(1.0)
    assert v == pytest.approx(0.00025)
    assert p == pytest.approx(0.5 - 0.1 / (math.sqrt(0.00025) + 1e-6))


def _setup(penalty, masks_active):
    model = wid.attach(make_teacher(layers=1), WIDConfig(target_hidden=6, target_intermediate=9, penalty=penalty, compactor_lr=0.01, teacher_lr=0.001, intermediate_updates=1, mlm_updates=1, hidden_updates=1, attention_updates=1))
    perturb(model, scale=0.05)
    if masks_active:
        wid.update_masks(model)
    optimizer = wid.build_optimizer(model)
    generator = torch.Generator().manual_seed(5)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator)
    return model, optimizer


def _check_entries(model, optimizer, steps=2):
    """Run `steps` steps (fresh gradients each) and compare chosen entries with the hand computation."""
    state = model.wid_state
    layer = model.bert.encoder.layer[0]
    entries = []  # (param, index, group keep-mask lookup, is_compactor, lr, decay)
    dropped_h = int((~state.keep_hidden).nonzero()[0]) if state.masks_active else 0
    kept_h = int(state.keep_hidden.nonzero()[-1])
    dropped_f = int((~state.keep_intermediate[0]).nonzero()[0]) if state.masks_active else 0
    entries.append((layer.attention.self.query.input_compactor, (2, dropped_h), lambda: state.keep_hidden[dropped_h], True, 0.01, 0.01))
    entries.append((layer.attention.self.query.input_compactor, (2, kept_h), lambda: state.keep_hidden[kept_h], True, 0.01, 0.01))
    entries.append((layer.intermediate.dense.output_compactor, (dropped_f, 1), lambda: state.keep_intermediate[0][dropped_f], True, 0.01, 0.01))
    entries.append((layer.output.LayerNorm.weight, (dropped_h,), lambda: state.keep_hidden[dropped_h], False, 0.001, 0.0))
    entries.append((layer.intermediate.dense.bias, (dropped_f,), lambda: state.keep_intermediate[0][dropped_f], False, 0.001, 0.0))
    entries.append((layer.intermediate.dense.weight, (1, 2), None, False, 0.001, 0.01))  # unmasked teacher weight
    entries.append((model.cls.predictions.bias, (3,), None, False, 0.001, 0.0))  # decoder bias: never masked
    moments = [(0.0, 0.0)] * len(entries)
    generator = torch.Generator().manual_seed(9)
    for _ in range(steps):
        expected = []
        for (param, index, keep, is_compactor, lr, decay), (m, v) in zip(entries, moments):
            keep_value = 1.0 if keep is None else float(keep())
            masked = keep is not None
            expected.append(adam_by_hand(
                float(param.detach()[index]), float(param.grad[index]), keep_value, optimizer.penalty,
                state.masks_active and masked, is_compactor and masked, lr, decay, m, v,
            ))
        optimizer.step()
        for (param, index, *_), (p, m, v) in zip(entries, expected):
            assert float(param.detach()[index]) == pytest.approx(p, rel=1e-5, abs=1e-7)
        moments = [(m, v) for _, m, v in expected]
        for param in model.parameters():
            param.grad = torch.randn(param.shape, generator=generator)


@pytest.mark.parametrize("penalty", [20.0, 0.5, 1.0])
def test_update_rule_after_masks_matches_hand_computation(penalty):
    model, optimizer = _setup(penalty, masks_active=True)
    _check_entries(model, optimizer)


def test_before_the_first_mask_compactors_get_plain_l2():
    model, optimizer = _setup(20.0, masks_active=False)
    _check_entries(model, optimizer)


def test_masked_entries_are_driven_to_zero_without_loss_gradient():
    model, optimizer = _setup(20.0, masks_active=True)
    compactor = model.bert.encoder.layer[0].attention.output.dense.output_compactor
    dropped = ~model.wid_state.keep_hidden
    start = compactor[dropped].abs().mean().item()
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    for _ in range(60):
        for param in model.parameters():
            param.grad = torch.randn_like(param) * 10  # a loss gradient that must be ignored on masked rows
        optimizer.step()
    assert compactor[dropped].abs().mean().item() < 0.2 * start


def test_parameter_groups_follow_the_method():
    model = wid.attach(make_teacher(), WIDConfig(target_hidden=6, target_intermediate=9))
    optimizer = wid.build_optimizer(model)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert (groups["compactors"]["lr"], groups["compactors"]["weight_decay"]) == (5e-5, 0.01)
    assert (groups["teacher_weights"]["lr"], groups["teacher_weights"]["weight_decay"]) == (1e-6, 0.01)
    assert (groups["teacher_biases_and_norms"]["lr"], groups["teacher_biases_and_norms"]["weight_decay"]) == (1e-6, 0.0)
    total = sum(len(g["params"]) for g in optimizer.param_groups)
    assert total == len(list(model.parameters()))
    assert optimizer.defaults["eps"] == 1e-6 and optimizer.defaults["betas"] == (0.9, 0.999)


def test_tied_alignment_updates_one_matrix_per_group():
    model = wid.attach(make_teacher(layers=1), WIDConfig(target_hidden=6, target_intermediate=9, alignment="tied", hidden_updates=1, attention_updates=1, intermediate_updates=1, mlm_updates=1))
    wid.update_masks(model)
    optimizer = wid.build_optimizer(model)
    shared = model.wid_state.compactors["compactor_hidden"]
    shared.grad = torch.zeros_like(shared)
    optimizer.step()
    dropped = ~model.wid_state.keep_hidden
    with torch.no_grad():
        assert shared[dropped][:, dropped].diagonal().lt(1 - 1e-4).all()  # penalty pull on masked rows
        torch.testing.assert_close(shared[~dropped], torch.eye(12)[~dropped] * (1 - 5e-5 * 0.01))  # only decay
