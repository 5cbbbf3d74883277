"""The index-list GEMM's launch configurations: split-K and the small tiles against the float64 reference, the
shape-keyed choice (fold.choose_config), and the autotuned path (with a stand-in benchmarker).

Without a GPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), whose
default is one config of few big programs; here every config is forced (gather_gemm's `config=`), on odd sizes,
with every output and split-K workspace allocation pre-filled with NaN, so a partial sum or an element left
unwritten fails, and elements outside the index lists must stay NaN.
"""
import importlib
import os

import torch

if not torch.cuda.is_available():  # tests/conftest.py sets it too; this keeps the module runnable on its own
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

from poisoned_allocations import poison_allocations  # noqa: E402

pytest.importorskip("triton")

from wid_kernels import reference  # noqa: E402
from wid_kernels.compile_report import SHAPES, VOCAB, teacher_linears  # noqa: E402

triton_ops = importlib.import_module("wid_kernels.backends.triton_ops")
fold_mod = importlib.import_module("wid_kernels.backends.triton_ops.fold")
linear_mod = importlib.import_module("wid_kernels.backends.triton_ops.compacted_linear")
GemmConfig = fold_mod.GemmConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
CONFIGS = {  # forced configs: split-K with edge tiles, uneven and grouped tiles, the small tiles unsplit
    "split3": GemmConfig(32, 32, 32, 2, 4, 1, 3),
    "split2_16x64": GemmConfig(16, 64, 32, 2, 4, 1, 2),
    "split5_64x16": GemmConfig(64, 16, 64, 1, 4, 1, 5),
    "64x128": GemmConfig(64, 128, 32, 8, 4, 1),
    "64x64": GemmConfig(64, 64, 32, 8, 4, 1),
}


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch):
    poison_allocations(monkeypatch, (fold_mod, linear_mod))


def _rand(generator, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(DEVICE, dtype)


def _index(size, count, generator):
    return torch.randperm(size, generator=generator)[:count].sort().values.to(DEVICE, torch.int32)


def _relative_error(got, expected):
    got, expected = got.detach(), expected.detach()
    scale = max(1.0, float(expected.abs().max()))
    return float((got.double() - expected.double()).abs().max()) / scale


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("features", ["plain", "gather", "scatter+rank1", "bias+transposed"])
def test_configs_match_the_reference_into_poisoned_outputs(config, dtype, features):
    """M=37, N=53, K=1001: no tile, K step or split boundary falls on a size; every feature of gather_gemm."""
    generator = torch.Generator().manual_seed(len(features) * 7 + dtype.itemsize)
    M, N, K = 37, 53, 1001
    Ma, Nb = M + 6, N + 5
    a, b = _rand(generator, Ma, K, dtype=dtype), _rand(generator, K, Nb, dtype=dtype)
    rows, cols = _index(Ma, M, generator), _index(Nb, N, generator)
    u, v = _rand(generator, Ma, dtype=dtype), _rand(generator, Nb, dtype=dtype)
    bias = _rand(generator, K, dtype=dtype)
    full = a.double() @ b.double()
    r, c = rows.long(), cols.long()
    kw, bias_out = {}, None
    if features == "plain":
        out = torch.full((Ma, Nb), float("nan"), dtype=dtype, device=DEVICE)
        expected, written = 0.75 * full, torch.ones(Ma, Nb, dtype=torch.bool)
    elif features == "gather":  # compact output of the listed rows and columns
        out = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
        kw = dict(rows=rows, cols=cols)
        expected, written = 0.75 * full[r][:, c], torch.ones(M, N, dtype=torch.bool)
    elif features == "scatter+rank1":  # written back at the listed rows and columns, the rest untouched
        out = torch.full((Ma, Nb), float("nan"), dtype=dtype, device=DEVICE)
        kw = dict(rows=rows, cols=cols, scatter_rows=True, scatter_cols=True, u=u, v=v)
        expected = 0.75 * full + u.double()[:, None] * v.double()[None, :]
        written = torch.zeros(Ma, Nb, dtype=torch.bool)
        written[r[:, None], c[None, :]] = True
    else:  # transposed operands and output (any strides), the bias GEMV fused, gathered rows
        a_t, b_t = a.t().contiguous().t(), b.t().contiguous().t()
        assert a_t.stride(0) == 1 and b_t.stride(0) == 1
        a, b = a_t, b_t
        out = torch.full((N, M), float("nan"), dtype=dtype, device=DEVICE).t()
        bias_out = torch.full((M,), float("nan"), dtype=dtype, device=DEVICE)
        kw = dict(rows=rows, cols=cols, bias_in=bias, bias_out=bias_out, bias_scale=-0.5)
        expected, written = 0.75 * full[r][:, c], torch.ones(M, N, dtype=torch.bool)
    got = fold_mod.gather_gemm(a, b, out=out, scale=0.75, config=CONFIGS[config], **kw)
    assert got is out and got.dtype == dtype
    written = written.to(DEVICE)
    assert torch.isfinite(got[written]).all(), "a listed element was not written"
    assert torch.isnan(got[~written]).all(), "an element outside the index lists was written"
    error = _relative_error(got[written], expected.to(DEVICE)[written])
    assert error <= TOL[dtype], f"relative error {error:.3g} > {TOL[dtype]}"
    if bias_out is not None:
        expected_bias = -0.5 * (a.double()[r] @ bias.double())
        assert torch.isfinite(bias_out).all()
        error = _relative_error(bias_out, expected_bias)
        assert error <= TOL[dtype], f"bias: relative error {error:.3g} > {TOL[dtype]}"


@pytest.mark.parametrize("K", [1, 40, 95])
def test_split_k_with_more_splits_than_k_steps(K):
    """Splits past the end of K reduce nothing but must still write their (zero) partial sums."""
    generator = torch.Generator().manual_seed(K)
    a, b, bias = _rand(generator, 19, K), _rand(generator, K, 23), _rand(generator, K)
    bias_out = torch.full((19,), float("nan"), device=DEVICE)
    got = fold_mod.gather_gemm(a, b, bias_in=bias, bias_out=bias_out, config=GemmConfig(16, 16, 32, 1, 4, 1, 7))
    assert _relative_error(got, a.double() @ b.double()) <= 2e-5
    assert _relative_error(bias_out, a.double() @ bias.double()) <= 2e-5


def test_split_k_is_deterministic_and_agrees_with_the_unsplit_kernel():
    generator = torch.Generator().manual_seed(9)
    a, b = _rand(generator, 70, 513), _rand(generator, 513, 45)
    split = CONFIGS["split3"]
    first, second = (fold_mod.gather_gemm(a, b, config=split) for _ in range(2))
    assert torch.equal(first, second)
    unsplit = fold_mod.gather_gemm(a, b, config=split._replace(split_k=1))
    assert _relative_error(first, unsplit) <= 1e-5


# ----------------------------------------------------------------------------------------- the fold and the backward chain
@pytest.fixture
def split_everywhere(monkeypatch):
    """Every GEMM of the fold and of compacted_linear's backward as split-K, on small tiles (several per output)."""
    calls = []

    def choose(M, N, K, *args, **kwargs):
        calls.append((M, N, K))
        return GemmConfig(16, 32, 16, 2, 4, 1, 3)

    monkeypatch.setattr(fold_mod, "AUTOTUNE", False)
    monkeypatch.setattr(fold_mod, "choose_config", choose)
    return calls


def test_fold_with_split_k(split_everywhere):
    generator = torch.Generator().manual_seed(4)
    m, k = 41, 37
    Q, W, L, b = (_rand(generator, *s) for s in ((m, m), (m, k), (k, k), (m,)))
    keep_out = (torch.rand(m, generator=generator) < 0.6).to(DEVICE)
    keep_in = (torch.rand(k, generator=generator) < 0.6).to(DEVICE)
    W_eff, b_eff = triton_ops.fold(Q, W, L, b, keep_out, keep_in, 0.5)
    W_ref, b_ref = reference.fold(Q.double(), W.double(), L.double(), b.double(), keep_out, keep_in, 0.5)
    assert split_everywhere, "the fold did not go through choose_config"
    assert _relative_error(W_eff, W_ref) <= 2e-5 and _relative_error(b_eff, b_ref) <= 2e-5


def test_compacted_linear_backward_with_split_k(split_everywhere):
    """dQ rows scattered with the rank-1 bias term, dL columns scattered, dW with db fused: all split-K."""
    generator = torch.Generator().manual_seed(6)
    m, k, tokens = 29, 35, 300
    x = _rand(generator, tokens, k).requires_grad_()
    Q, W, L, b = (_rand(generator, *s).mul_(0.5).requires_grad_() for s in ((m, m), (m, k), (k, k), (m,)))
    keep_out = (torch.rand(m, generator=generator) < 0.6).to(DEVICE)
    keep_in = (torch.rand(k, generator=generator) < 0.6).to(DEVICE)
    dy = _rand(generator, tokens, m)
    tensors = (x, Q, W, L, b)
    as64 = [t.detach().double().requires_grad_() for t in tensors]
    y_ref = reference.compacted_linear(*as64, keep_out=keep_out, keep_in=keep_in)
    grads_ref = torch.autograd.grad(y_ref, as64, dy.double())
    y = triton_ops.compacted_linear(x, Q, W, L, b, keep_out, keep_in)
    grads = torch.autograd.grad(y, tensors, dy)
    assert len(split_everywhere) >= 6, "fold and backward chain did not all go through choose_config"
    assert _relative_error(y, y_ref) <= 2e-5
    for name, got, expected in zip(("dx", "dQ", "dW", "dL", "db"), grads, grads_ref):
        if name == "dQ":
            assert float(got[~keep_out].abs().sum()) == 0.0
            got, expected = got[keep_out], expected[keep_out]
        if name == "dL":
            assert float(got[:, ~keep_in].abs().sum()) == 0.0
            got, expected = got[:, keep_in], expected[:, keep_in]
        assert _relative_error(got, expected) <= 2e-5, name


# ----------------------------------------------------------------------------------------- the shape-keyed choice
def _wid_shapes():
    shapes = set()
    for hidden, ffn in SHAPES.values():
        for m, k, _ in teacher_linears(hidden, ffn):
            shapes |= {(m, k, m), (m, k, k), (m, m, k), (k, k, m)}
    return sorted(shapes)


def _programs(config, M, N):
    return fold_mod._tiles(M, N, config.block_m, config.block_n) * config.split_k


@pytest.mark.parametrize("elem_bytes", [2, 4])
@pytest.mark.parametrize("sms", [132, 108])
def test_the_choice_fills_the_gpu_for_wids_shapes(elem_bytes, sms):
    for M, N, K in _wid_shapes():
        config = fold_mod.choose_config(M, N, K, elem_bytes, sms, interpret=False)
        programs = _programs(config, M, N)
        if config.split_k > 1:  # one wave of 128x128 tiles, each split at least MIN_SPLIT_K long
            assert (config.block_m, config.block_n) == (128, 128)
            assert sms // 2 < programs <= sms and K // config.split_k >= fold_mod.MIN_SPLIT_K, (M, N, K, config)
        elif (config.block_m, config.block_n) != (64, 64):
            assert programs >= sms, (M, N, K, config)
        else:  # the smallest tile: either it fills the GPU or the output is too small and K too short to split
            smaller_fills = programs >= sms
            assert smaller_fills or K < 2 * fold_mod.MIN_SPLIT_K, (M, N, K, config)
        # 128-byte rows of K in half precision; 64-byte ones in fp32, whose FMA loop spills at 128 (compile report)
        assert config.block_k * elem_bytes == (128 if elem_bytes <= 2 else 64) and config.num_stages >= 3


def test_the_choice_for_bert_base():
    choose = lambda M, N, K: fold_mod.choose_config(M, N, K, 2, 132, interpret=False)  # noqa: E731
    decoder_dl = choose(768, 768, VOCAB)  # 36 tiles of 128x128: split the vocabulary instead of idling 96 SMs
    assert decoder_dl.split_k == 3 and (decoder_dl.block_m, decoder_dl.block_n) == (128, 128)
    assert choose(768, 768, 3072).split_k == 3  # the FFN's dL: 1024 of K per split
    assert choose(768, 768, 768) == GemmConfig(64, 64, 64, 8, 4, 4)  # short K: 144 small tiles
    assert choose(3072, 768, 3072) == GemmConfig(128, 128, 64, 8, 8, 4)  # 144 big tiles fill the GPU
    assert choose(1100, 1100, 768)[:2] == (64, 128)  # 81 big tiles, 162 of 64x128
    assert fold_mod.choose_config(384, 384, VOCAB, 2, 132, interpret=False).split_k == 14  # MiniLM's decoder dL
    # fewer SMs, fewer splits; enough big tiles for a small GPU, none
    assert fold_mod.choose_config(768, 768, VOCAB, 2, 80, interpret=False).split_k == 2
    assert fold_mod.choose_config(768, 768, VOCAB, 2, 16, interpret=False) == GemmConfig(128, 128, 64, 8, 8, 4)
    assert fold_mod.choose_config(768, 768, VOCAB, 2, 132, interpret=True) == fold_mod.INTERPRET_CONFIG
    assert fold_mod.sm_count(torch.device("cpu")) == fold_mod.SMS_ASSUMED == 132


def test_autotune_candidates_start_from_the_heuristic_and_are_distinct():
    for M, N, K in _wid_shapes():
        for elem_bytes in (2, 4):
            found = fold_mod._candidates(M, N, K, elem_bytes, 132)
            assert found[0] == fold_mod.choose_config(M, N, K, elem_bytes, 132, interpret=False)
            assert 1 <= len(found) <= 4 and len(set(found)) == len(found)
            assert all(c.split_k == 1 or _programs(c, M, N) <= 2 * 132 for c in found)


# ----------------------------------------------------------------------------------------- the autotuned path
def test_the_autotuned_path_times_split_k_with_its_combine_and_caches_per_bucket(monkeypatch):
    """triton.autotune over the candidates (a stand-in benchmarker: the interpreter cannot time), split-K candidates
    timed with their combine launch; the choice is reused for every shape of the bucket."""
    candidates = [GemmConfig(64, 64, 64, 1, 4, 1), CONFIGS["split3"], CONFIGS["split2_16x64"]]
    timings = iter([2.0, 1.0, 3.0])  # the split-3 candidate wins
    timed, combines = [], []
    real_combine = fold_mod._combine

    def bench(kernel_call, quantiles=None):
        kernel_call()
        timed.append(len(combines))
        return [next(timings)] * 3

    def combine(params, exception=None):
        if params["SPLIT_K"] > 1:
            combines.append(params["SPLIT_K"])
        return real_combine(params, exception)

    monkeypatch.setattr(fold_mod, "AUTOTUNE", True)
    monkeypatch.setattr(fold_mod, "_tuned", {})
    monkeypatch.setattr(fold_mod, "_do_bench", bench)
    monkeypatch.setattr(fold_mod, "_combine", combine)
    monkeypatch.setattr(fold_mod, "_candidates", lambda *args: candidates)
    generator = torch.Generator().manual_seed(8)
    a, b, bias = _rand(generator, 37, 1001), _rand(generator, 1001, 53), _rand(generator, 1001)
    bias_out = torch.full((37,), float("nan"), device=DEVICE)
    got = fold_mod.gather_gemm(a, b, scale=0.5, bias_in=bias, bias_out=bias_out, bias_scale=2.0)
    assert timed == [0, 1, 2], "each split-K candidate's timing must include its combine launch"
    assert combines == [3, 2, 3]  # two timed, then the chosen one's after the autotuner's last (partial) launch
    assert list(fold_mod._tuned.values()) == [CONFIGS["split3"]]
    assert _relative_error(got, 0.5 * a.double() @ b.double()) <= 2e-5
    assert _relative_error(bias_out, 2.0 * a.double() @ bias.double()) <= 2e-5
    # another shape of the bucket (M ≤ 64, N ≤ 64, K ≤ 1024): no new timing, the cached choice runs
    a2, b2 = _rand(generator, 40, 999), _rand(generator, 999, 60)
    bias2, bias_out2 = _rand(generator, 999), torch.full((40,), float("nan"), device=DEVICE)
    got2 = fold_mod.gather_gemm(a2, b2, bias_in=bias2, bias_out=bias_out2)
    assert len(timed) == 3 and combines == [3, 2, 3, 3] and len(fold_mod._tuned) == 1
    assert _relative_error(got2, a2.double() @ b2.double()) <= 2e-5
    assert _relative_error(bias_out2, a2.double() @ bias2.double()) <= 2e-5


def test_an_operand_beyond_int32_offsets_is_refused_before_any_launch():
    """The GEMM computes element offsets in int32 (weight-sized operands; fewer registers than 64-bit pointer tiles):
    an operand whose last element lies 2^31 elements or more from its first is refused, not read out of bounds."""
    a = torch.empty_strided((2, 3), (2 ** 31, 1), device="meta")
    with pytest.raises(AssertionError, match="too large for int32 offsets"):
        fold_mod.gather_gemm(a, torch.empty(3, 4, device="meta"))
    assert fold_mod._last_offset(torch.empty(5, 7).t()) == 5 * 7 - 1 and fold_mod._last_offset(torch.empty(0, 3)) == 0
