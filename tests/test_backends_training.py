"""A short WID training run gives the same masks and losses on every available backend (CPU).

Without a GPU Triton runs under its interpreter (tests/conftest.py), so it is part of the comparison too."""
import pytest
import torch

import wid
import wid_kernels

from conftest import make_teacher

wid_kernels._unavailable.pop("triton", None)  # probed before the interpreter was switched on
BACKENDS = [name for name, reason in wid_kernels.available_backends().items() if reason is None]


def short_run(backend, steps=6):
    previous = wid_kernels.get_backend()
    wid_kernels.set_backend(backend)
    device = "cuda" if torch.cuda.is_available() and backend in ("triton", "cuda") else "cpu"  # compiled where it can be
    try:
        model = wid.attach(make_teacher(layers=2, heads=3, head_dim=5, intermediate=17, vocab=41, seed=3).to(device),
                           wid.WIDConfig(target_hidden=9, target_intermediate=7, w_step=2, hidden_updates=2,
                                         attention_updates=2, intermediate_updates=2, mlm_updates=2, compactor_lr=1e-2))
        model.train()
        for module in model.modules():  # dropout off: the comparison is about the ops, not the RNG
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        optimizer = wid.build_optimizer(model)
        generator = torch.Generator().manual_seed(0)
        losses, masks = [], []
        for step in range(1, steps + 1):
            ids = torch.randint(0, 41, (4, 13), generator=generator)
            labels = torch.where(torch.rand(ids.shape, generator=generator) < 0.3, ids, -100)
            loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss))
            if step % 2 == 0:
                wid.update_masks(model)
                masks.append({k: v.cpu() for k, v in model.state_dict().items() if k.startswith("wid_state.keep")})
        return losses, masks
    finally:
        wid_kernels.set_backend(previous)


@pytest.fixture(scope="module")
def reference_run():
    return short_run("reference")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_short_training_matches_the_reference(backend, reference_run):
    losses, masks = short_run(backend)
    reference_losses, reference_masks = reference_run
    assert losses == pytest.approx(reference_losses, rel=1e-4)
    for got, expected in zip(masks, reference_masks):
        for name in expected:
            assert torch.equal(got[name], expected[name]), name


def test_every_cpu_backend_takes_part():
    assert {"reference", "torch", "triton"} <= set(BACKENDS)
