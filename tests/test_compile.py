"""The Triton ops are torch.library custom ops (schema, fake implementation, autograd): opcheck passes, and
torch.compile(fullgraph=True) traces a WID forward and backward on every backend (Triton interpreted on the CPU)."""
import pytest
import torch

pytest.importorskip("triton")

import wid  # noqa: E402
import wid_kernels  # noqa: E402

from conftest import make_teacher  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [name for name, reason in wid_kernels.available_backends().items() if reason is None] + ["auto"]
wid_kernels._load("triton")
ops = torch.ops.wid_triton


def _randn(*shape, grad=True, seed=0):
    generator = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=generator).to(DEVICE).requires_grad_(grad)


def _keep(*values):
    return torch.tensor(values, dtype=torch.bool, device=DEVICE)


OPCHECK_CASES = {
    "compacted_linear": lambda: (ops.compacted_linear.default,
                                 (_randn(2, 3, 5), _randn(4, 4), _randn(4, 5), _randn(5, 5), _randn(4),
                                  _keep(1, 0, 1, 1), _keep(1, 1, 0, 1, 1))),
    "compacted_linear without compactors": lambda: (ops.compacted_linear.default,
                                                    (_randn(2, 3, 5), None, _randn(4, 5), None, _randn(4), None, None)),
    "masked_layer_norm": lambda: (ops.masked_layer_norm.default,
                                  (_randn(2, 3, 7), None, _randn(7), _randn(7), _keep(1, 0, 1, 1, 0, 1, 1), 1e-5)),
    "masked_layer_norm with residual": lambda: (ops.masked_layer_norm.default,
                                                (_randn(2, 3, 7), _randn(2, 3, 7), _randn(7), None, None, 1e-5)),
    "fold": lambda: (ops.fold.default, (_randn(4, 4), _randn(4, 5), _randn(5, 5), _randn(4), None, None, 0.5)),
}


@pytest.mark.parametrize("case", sorted(OPCHECK_CASES))
def test_opcheck(case):
    op, args = OPCHECK_CASES[case]()
    torch.library.opcheck(op, args)


def test_opcheck_of_the_optimizer_step():
    params = [_randn(5, 5, grad=False), _randn(5, grad=False)]
    grads = [_randn(5, 5, grad=False, seed=1), _randn(5, grad=False, seed=1)]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    keep = _keep(1, 0, 1, 1, 0)
    torch.library.opcheck(ops.wid_adamw_step.default, (params, grads, exp_avgs, exp_avg_sqs, [keep, keep], [1, 0],
                                                       [True, False], 1e-2, 0.9, 0.999, 1e-6, 0.01, 3.0, True, "authors"))


def _graph_ops(recorded):
    def backend(gm, example_inputs):
        for module in gm.modules():  # the graph and its subgraphs (an autograd.Function's forward is one)
            if isinstance(module, torch.fx.GraphModule):
                recorded.update(str(node.target) for node in module.graph.nodes if node.op == "call_function")
        return gm.forward
    return backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_compiled_wid_step_matches_eager_on_every_backend(backend):
    previous = wid_kernels.get_backend()
    wid_kernels.set_backend(backend)
    try:
        model = wid.attach(make_teacher(layers=1, heads=2, head_dim=3, intermediate=7, vocab=31).to(DEVICE),
                           wid.WIDConfig(target_hidden=4, target_intermediate=5))
        wid.update_masks(model)  # masks active: the kept sets go through every op
        ids = torch.randint(0, 31, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)

        def step(ids):
            return model(input_ids=ids, labels=ids).loss

        eager = step(ids)
        eager.backward()
        expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        recorded = set()
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, backend=_graph_ops(recorded))
        loss = compiled(ids)
        loss.backward()
    finally:
        wid_kernels.set_backend(previous)
    assert torch.allclose(loss, eager, atol=1e-5)
    for name, grad in expected.items():
        got = dict(model.named_parameters())[name].grad
        assert got is not None and torch.allclose(got, grad, atol=1e-5), name
    if backend == "triton":  # the custom ops are in the graph, not a fallback
        assert any("wid_triton.compacted_linear" in target for target in recorded), recorded
        assert any("wid_triton.masked_layer_norm" in target for target in recorded), recorded
    if backend == "cuda":
        assert any("wid_kernels.masked_layer_norm_fwd" in target for target in recorded), recorded
