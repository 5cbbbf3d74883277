"""A whole WID training step (forward, backward, optimizer) per backend, against a plain BERT training step.

The teacher is a randomly initialised BertForMaskedLM of the case's shape (MiniLM-shaped 6×384 on a
CPU, BERT-base on a GPU) at 128-token sequences; the MLM head sees only the masked positions (15%),
as in `wid.training.MaskedLMTrainer`. WID providers attach compactors (`preset="half"`) with the
masks half-way through the schedule, and step with `wid.build_optimizer`; `plain` is the same model
without compactors and torch.optim.AdamW: what the compactors would cost if they were free. A
backend runs the reference for any op it has no kernel of its own for (recorded as `own_ops`).

Peak memory: on a GPU `torch.cuda.max_memory_allocated` of one step; on a CPU the peak RSS of a
fresh subprocess that builds one configuration and runs two steps (tracemalloc does not see torch's
allocations), run as `python -m benchmarks.test_bench_step '<json>'`, next to its RSS after imports.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

import wid
import wid_kernels
from benchmarks.conftest import (
    OPS,
    STEP_PROVIDERS,
    assert_finite,
    backend_module,
    measure,
    record,
)
from wid.training import MaskedPositionSelector

PROVIDERS = STEP_PROVIDERS
WARMUP_STEPS = 2  # seen here: the first one or two steps of a fresh model can run several times slower
MASKED_FRACTION = 0.15
REPO_ROOT = Path(__file__).resolve().parent.parent


def build_step(shape: dict, provider: str, batch: int, seq_len: int, device: torch.device, precision: str):
    """The model and a closure that runs one training step on a fixed random batch and returns the loss."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                        num_attention_heads=shape["heads"], intermediate_size=shape["intermediate"],
                        max_position_embeddings=max(512, seq_len))
    model = BertForMaskedLM(config).to(device).train()
    if provider == "plain":
        fused = device.type == "cuda"
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=fused, foreach=not fused)
    else:
        active = wid_kernels.set_backend(provider)
        assert active == provider, f"asked for backend {provider}, got {active}"
        model = wid.attach(model, wid.WIDConfig(preset="half"))
        state = model.wid_state
        wid.apply_schedule(model, state.config.mask_updates_to_target(state.dims) // 2)
        assert state.masks_active
        optimizer = wid.build_optimizer(model)
    selector = MaskedPositionSelector(model.cls)

    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, shape["vocab"], (batch, seq_len), generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)
    positions = (torch.rand(batch, seq_len, generator=generator) < MASKED_FRACTION).to(device)
    positions[0, 0] = True
    targets = input_ids[positions]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        optimizer.zero_grad(set_to_none=True)
        selector.positions = positions
        try:
            with autocast:
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            selector.positions = None
        loss = F.cross_entropy(logits.float(), targets)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return model, step


def peak_rss_in_subprocess(shape: dict, provider: str, batch: int, seq_len: int, precision: str) -> dict:
    """Peak RSS (MiB) of a fresh process running two steps of one configuration, and of its imports alone."""
    spec = json.dumps(dict(shape=shape, provider=provider, batch=batch, seq_len=seq_len, precision=precision))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "benchmarks.test_bench_step", spec], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory subprocess failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_training_step(benchmark, case, device, batch, provider):
    """Time one training step; record its peak memory next to it."""
    own_ops = None
    if provider not in ("plain", "reference"):
        if provider == "triton" and device.type != "cuda":
            pytest.skip("triton on a CPU is the interpreter: a correctness tool, not a performance path")
        module = backend_module(provider)  # skips with the reason when unavailable
        own_ops = ", ".join(op for op in OPS if callable(getattr(module, op, None))) or "none"
    shape = dict(vars(case.model))
    precision = case.step_precision
    model, step = build_step(shape, provider, batch, case.seq_len, device, precision)
    record(benchmark, op="training_step", mode=precision, provider=provider, case=case, device=device,
           tokens=batch * case.seq_len, dtype=precision, batch=batch,
           model=f"{case.model.layers}x{case.model.hidden} (heads {case.model.heads}, FFN {case.model.intermediate})",
           parameters=sum(p.numel() for p in model.parameters()), own_ops=own_ops)
    loss = measure(benchmark, step, device, warmup_rounds=WARMUP_STEPS)
    assert loss.shape == () and bool(torch.isfinite(loss))
    compactors = [p for name, p in model.named_parameters() if "compactor" in name]
    if provider != "plain":  # pruned rows of a compactor's gradient may be left uncomputed: check the step's result
        assert compactors and all(p.grad is not None for p in compactors), "compactors got no gradient"
    assert_finite(*(p.detach() for p in model.parameters()))

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        benchmark.extra_info["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        benchmark.extra_info["memory"] = "peak allocated"
    else:
        del model, step
        usage = peak_rss_in_subprocess(shape, provider, batch, case.seq_len, precision)
        benchmark.extra_info.update(peak_memory_mib=usage["peak_rss_mib"], import_rss_mib=usage["import_rss_mib"],
                                    memory="peak RSS")


def _peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork + exec,
    so a child of a big pytest process would report the parent's peak (seen here: 4.28 GiB for every config)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; no /proc elsewhere


if __name__ == "__main__":  # the peak-memory subprocess: one CPU configuration, two steps
    spec = json.loads(sys.argv[1])
    torch.set_flush_denormal(True)
    import_rss = _peak_rss_mib()
    _, run_step = build_step(spec["shape"], spec["provider"], spec["batch"], spec["seq_len"], torch.device("cpu"),
                             spec.get("precision", "fp32"))
    for _ in range(2):  # the first step allocates the optimizer state; the second is the steady state
        assert torch.isfinite(run_step())
    print(json.dumps(dict(peak_rss_mib=_peak_rss_mib(), import_rss_mib=import_rss)))
