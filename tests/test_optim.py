"""The WID update rule + AdamW without bias correction (WID_METHOD §5), against hand computation, on every backend."""
import math

import torch

import pytest

import wid
import wid_kernels
from wid import WIDConfig

from conftest import make_teacher, perturb

BETA1, BETA2, EPS = 0.9, 0.999, 1e-6
wid_kernels._unavailable.pop("triton", None)  # probed before the interpreter was switched on
CPU_BACKENDS = [name for name, reason in wid_kernels.available_backends().items() if reason is None]
# with a GPU the fused optimizers are tested where they run: compiled, on CUDA tensors
GPU_BACKENDS = ("triton", "cuda") if torch.cuda.is_available() else ()


def adam_by_hand(p, grad, keep, penalty, active, is_compactor, lr, decay, m=0.0, v=0.0, rule="authors"):
    """One step for one scalar entry, written out from the authors' trainer and optimizer (rule="authors") or
    from this package's earlier reading (rule="additive"). `active`: masks are on and the tensor is under the rule."""
    if not active:
        g, extra = (grad + p if is_compactor else grad), None
    else:
        g = keep * grad + (1 - keep) * min(penalty, 1.0) * p
        extra = (1 - keep) * (penalty - 1.0) * p if penalty > 1 else None
    if rule == "authors":
        if extra is not None:  # uer/trainer.py: exp_avg.mul_(0.9).add_(penalty_grad2, alpha=0.1), kept entries too
            m = BETA1 * m + (1 - BETA1) * extra
        m = BETA1 * m + (1 - BETA1) * g  # uer/utils/optimizers.py AdamW, correct_bias=False
        v = BETA2 * v + (1 - BETA2) * g * g
        p = p - lr * m / (math.sqrt(v) + EPS)
        p = p - lr * decay * p  # weight decay after the update, on the updated value
    else:
        m = BETA1 * m + (1 - BETA1) * g + (1 - BETA1) * (extra or 0.0)
        v = BETA2 * v + (1 - BETA2) * g * g
        p = p * (1 - lr * decay) - lr * m / (math.sqrt(v) + EPS)
    return p, m, v


def test_a_masked_entry_by_hand_with_numbers():
    # p = 0.5, ∇ = 0.2, masked, λ = 20, lr = 0.1, no decay, moments 0.1 and 0.01 before the step:
    # injection: m = 0.9·0.1 + 0.1·19·0.5 = 1.04; AdamW: g = 0.5, m = 0.9·1.04 + 0.1·0.5 = 0.986,
    # v = 0.999·0.01 + 0.001·0.25 = 0.01024; p' = 0.5 − 0.1·0.986/(√0.01024 + 1e-6)
    p, m, v = adam_by_hand(0.5, 0.2, keep=0.0, penalty=20.0, active=True, is_compactor=True, lr=0.1, decay=0.0, m=0.1, v=0.01)
    assert m == pytest.approx(0.986)
    assert v == pytest.approx(0.01024)
    assert p == pytest.approx(0.5 - 0.1 * 0.986 / (math.sqrt(0.01024) + 1e-6))
    # a kept entry of a tensor under the rule: its first moment decays twice (0.81·0.1 + 0.1·0.2)
    _, m_kept, _ = adam_by_hand(0.5, 0.2, keep=1.0, penalty=20.0, active=True, is_compactor=True, lr=0.1, decay=0.0, m=0.1)
    assert m_kept == pytest.approx(0.81 * 0.1 + 0.1 * 0.2)
    # the additive variant: one decay, the injection added (0.09 + 0.05 + 0.95)
    _, m_add, _ = adam_by_hand(0.5, 0.2, keep=0.0, penalty=20.0, active=True, is_compactor=True, lr=0.1, decay=0.0, m=0.1,
                               rule="additive")
    assert m_add == pytest.approx(1.09)


def test_weight_decay_comes_after_the_update_in_the_authors_rule():
    # p = 1, unmasked, ∇ = 0, m = 0.5, v = 0.25 before: update 0.1·0.45/(√0.24975 + 1e-6), then ·(1 − 0.1·0.5)
    p, _, _ = adam_by_hand(1.0, 0.0, keep=1.0, penalty=20.0, active=False, is_compactor=False, lr=0.1, decay=0.5, m=0.5, v=0.25)
    assert p == pytest.approx((1.0 - 0.1 * 0.45 / (math.sqrt(0.24975) + 1e-6)) * 0.95)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_step_with_masks_active_matches_the_hand_computation_on_every_backend(backend):
    """A compactor (masked and kept entries), a masked bias and a masked LayerNorm weight, one step, λ = 20."""
    previous = wid_kernels.get_backend()
    assert wid_kernels.set_backend(backend) == backend
    try:
        model, optimizer = _setup(20.0, masks_active=True, device="cuda" if backend in GPU_BACKENDS else "cpu")
        _check_entries(model, optimizer, steps=1, moments=0.05)
    finally:
        wid_kernels.set_backend(previous)


@pytest.mark.parametrize("rule", ["authors", "additive"])
def test_both_update_rules_are_selectable(rule):
    model, optimizer = _setup(20.0, masks_active=True, update_rule=rule)
    assert optimizer.update_rule == rule
    _check_entries(model, optimizer, rule=rule)


def test_an_unknown_update_rule_is_refused():
    with pytest.raises(ValueError, match="update_rule"):
        WIDConfig(target_hidden=6, update_rule="adam")


def _setup(penalty, masks_active, update_rule="authors", device="cpu"):
    model = wid.attach(make_teacher(layers=1).to(device), WIDConfig(target_hidden=6, target_intermediate=9, penalty=penalty, compactor_lr=0.01, teacher_lr=0.001, intermediate_updates=1, mlm_updates=1, hidden_updates=1, attention_updates=1, update_rule=update_rule))
    perturb(model, scale=0.05)
    if masks_active:
        wid.update_masks(model)
    optimizer = wid.build_optimizer(model)
    generator = torch.Generator().manual_seed(5)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator).to(device)
    return model, optimizer


def _check_entries(model, optimizer, steps=2, moments=None, rule="authors"):
    """Run `steps` steps (fresh gradients each) and compare chosen entries with the hand computation.

    `moments`: start every first moment at this value and every second moment at its square (else 0), so that
    the first step already shows how the rule treats existing moments."""
    state = model.wid_state
    layer = model.bert.encoder.layer[0]
    entries = []  # (param, index, group keep-mask lookup, is_compactor, lr, decay)
    dropped_h = int((~state.keep_hidden).nonzero()[0]) if state.masks_active else 0
    kept_h = int(state.keep_hidden.nonzero()[-1])
    dropped_f = int((~state.keep_intermediate[0]).nonzero()[0]) if state.masks_active else 0
    kept_f = int(state.keep_intermediate[0].nonzero()[0])
    entries.append((layer.attention.self.query.input_compactor, (2, dropped_h), lambda: state.keep_hidden[dropped_h], True, 0.01, 0.01))
    entries.append((layer.attention.self.query.input_compactor, (2, kept_h), lambda: state.keep_hidden[kept_h], True, 0.01, 0.01))
    entries.append((layer.intermediate.dense.output_compactor, (dropped_f, 1), lambda: state.keep_intermediate[0][dropped_f], True, 0.01, 0.01))
    entries.append((layer.output.LayerNorm.weight, (dropped_h,), lambda: state.keep_hidden[dropped_h], False, 0.001, 0.0))
    entries.append((layer.output.LayerNorm.weight, (kept_h,), lambda: state.keep_hidden[kept_h], False, 0.001, 0.0))
    entries.append((layer.intermediate.dense.bias, (dropped_f,), lambda: state.keep_intermediate[0][dropped_f], False, 0.001, 0.0))
    entries.append((layer.intermediate.dense.bias, (kept_f,), lambda: state.keep_intermediate[0][kept_f], False, 0.001, 0.0))
    entries.append((layer.intermediate.dense.weight, (1, 2), None, False, 0.001, 0.01))  # unmasked teacher weight
    entries.append((model.cls.predictions.bias, (3,), None, False, 0.001, 0.0))  # decoder bias: never masked
    start = (0.0, 0.0) if moments is None else (moments, moments ** 2)
    if moments is not None:
        for param in model.parameters():
            optimizer.state[param].update(step=0, exp_avg=torch.full_like(param, start[0]),
                                          exp_avg_sq=torch.full_like(param, start[1]))
    moments = [start] * len(entries)
    generator = torch.Generator().manual_seed(9)
    for _ in range(steps):
        expected = []
        for (param, index, keep, is_compactor, lr, decay), (m, v) in zip(entries, moments):
            keep_value = 1.0 if keep is None else float(keep())
            masked = keep is not None
            expected.append(adam_by_hand(
                float(param.detach()[index]), float(param.grad[index]), keep_value, optimizer.penalty,
                state.masks_active and masked, is_compactor and masked, lr, decay, m, v, rule,
            ))
        optimizer.step()
        for (param, index, *_), (p, m, v) in zip(entries, expected):
            assert float(param.detach()[index]) == pytest.approx(p, rel=1e-5, abs=1e-7)
            assert float(optimizer.state[param]["exp_avg"][index]) == pytest.approx(m, rel=1e-5, abs=1e-7)
        moments = [(m, v) for _, m, v in expected]
        for param in model.parameters():
            param.grad = torch.randn(param.shape, generator=generator).to(param.device)


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
        torch.testing.assert_close(shared[~dropped], torch.eye(12)[~dropped] * (1 - 5e-5 * 0.01))  # only decay (g = 0 there)
