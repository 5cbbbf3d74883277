"""What every compiled kernel costs on a GPU we may not have: `python -m wid_kernels.compile_report --arch 90`.

Prints a JSON list with one object per kernel variant and dtype:
    kernel        the kernel's name (Triton function or CUDA kernel)
    op            compacted_linear | fold | masked_layer_norm | wid_adamw_multi_tensor
    dtype         bf16 | fp16 | fp32 (the dtype the kernel computes in)
    registers     registers per thread
    spills        local-memory bytes per thread (register spills and stack; 0 is the goal)
    shared_bytes  shared memory per block (Triton: what the launch requests; CUDA: static)
    tensor_cores  true when the machine code has (w)gmma/mma instructions (HGMMA/HMMA)
plus `variant` (the launch settings) and `source` (triton or cuda).

Triton kernels are lowered here, without a GPU, for the target architecture with the constexprs and launch
settings their launchers choose for the shapes WID produces (BERT-base: hidden 768, FFN 3072; the built-in
teacher: 384, 1536; vocabulary 30522). The index-list GEMM gets the tile and split-K `fold.choose_config` picks at
132 SMs (the heuristic a GPU's autotuning starts from) and is specialized as a launch specializes it: strides of 1
are constants, pointers, the other strides and the multiples of 16 among M, N, K are marked 16-divisible (without
that, half-precision loads are scalar and the K loop is not pipelined). They are assembled with Triton's ptxas
and read back with cuobjdump. The CUDA extension's kernels are read from the extension's cubin for that
architecture (when it was built with CUDA). This is how the kernels' resource use and tensor-core use are
checked on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

SHAPES = {"bert-base": (768, 3072), "all-MiniLM-L6-v2": (384, 1536)}
VOCAB = 30522
TOKENS = 128 * 128  # a BERT-base step's batch
DTYPES = ("bf16", "fp16", "fp32")
MMA = re.compile(r"\b(HGMMA|HMMA|IMMA|QGMMA)\b")


class CompileReportError(RuntimeError):
    """The report cannot be made here (no triton, no toolchain)."""


def _triton_modules():
    """The Triton kernel modules, imported without the package __init__ (which needs a GPU or the interpreter)."""
    import wid_kernels.backends

    name = "wid_kernels.backends.triton_ops"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [str(Path(wid_kernels.backends.__file__).parent / "triton_ops")]
        sys.modules[name] = package
    return {op: importlib.import_module(f"{name}.{module}")
            for op, module in (("fold", "fold"), ("masked_layer_norm", "masked_layer_norm"), ("wid_adamw_multi_tensor", "wid_adamw"))}


def _tool(name: str) -> str:
    from triton.backends.nvidia import compiler

    found = Path(compiler.__file__).parent / "bin" / name
    if not found.is_file():
        raise CompileReportError(f"triton's {name} is missing ({found}); reinstall triton")
    return str(found)


def _resources(cubin_file: str, arch: int) -> dict:
    """{function: (registers, local bytes, static shared bytes, uses tensor cores)} of a cubin or fatbinary."""
    usage = subprocess.run([_tool("cuobjdump"), "-res-usage", "-arch", f"sm_{arch}", cubin_file], capture_output=True,
                           text=True, check=True).stdout
    sass = subprocess.run([_tool("cuobjdump"), "-sass", "-arch", f"sm_{arch}", cubin_file], capture_output=True,
                          text=True, check=True).stdout
    found = {}
    for name, fields in re.findall(r"Function ([^\s:]+):\s*\n\s*(REG:.*)", usage):
        values = dict(re.findall(r"(\w+):(\d+)", fields))
        # spilled registers live in the stack frame (STACK); LOCAL counts local arrays the compiler could not keep
        # in registers: both are local memory, a DRAM round trip per access
        local = int(values.get("STACK", 0)) + int(values.get("LOCAL", 0))
        found[name] = [int(values.get("REG", 0)), local, int(values.get("SHARED", 0)), False]
    for name, body in re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass, flags=re.S):
        if name in found:
            found[name][3] = bool(MMA.search(body))
    return found


# The index-list GEMM as the fold and compacted_linear's backward launch it: (op, what, flags, the strides that are 1
# (Triton specializes those at launch), which linears it runs for (needs Q / needs L), its (M, N, K) for a linear
# W (m×k) with compactors Q (m×m), L (k×k), unpruned: pruning shrinks M or N to the kept counts).
GEMM_USES = (
    ("fold", "Q[rows]·W with the bias fold", dict(GATHER_M=True, SCATTER_M=False, GATHER_N=False, SCATTER_N=False,
                                                  HAS_BIAS=True, HAS_RANK1=False),
     ("s_ak", "s_bn", "s_cn"), "Q", lambda m, k: (m, k, m)),
    ("fold", "(Q·W)·L[:, cols]", dict(GATHER_M=False, SCATTER_M=False, GATHER_N=True, SCATTER_N=False, HAS_BIAS=False,
                                      HAS_RANK1=False),
     ("s_ak", "s_bn", "s_cn"), "L", lambda m, k: (m, k, k)),
    ("compacted_linear", "dQ rows scattered (+ the bias rank-1 term)", dict(GATHER_M=True, SCATTER_M=True, GATHER_N=False,
                                                                            SCATTER_N=False, HAS_BIAS=False, HAS_RANK1=True),
     ("s_ak", "s_bk", "s_cn"), "Q", lambda m, k: (m, m, k)),  # dW_eff·(W·L)ᵀ
    ("compacted_linear", "dL columns scattered", dict(GATHER_M=False, SCATTER_M=False, GATHER_N=True, SCATTER_N=True,
                                                      HAS_BIAS=False, HAS_RANK1=False),
     ("s_am", "s_bn", "s_cn"), "L", lambda m, k: (k, k, m)),  # (Q·W)ᵀ·dW_eff
)


def teacher_linears(hidden: int, ffn: int, vocab: int = VOCAB):
    """(m, k, compactors) of a teacher's linears: attention/head (hidden²), FFN up and down with Q and L; the decoder
    (vocab × hidden) with L only."""
    return [(hidden, hidden, "QL"), (ffn, hidden, "QL"), (hidden, ffn, "QL"), (vocab, hidden, "L")]


def _gemm_variants(fold_module, elem_bytes: int):
    """(op, what, flags, unit strides, config, divisible, shapes): per use of the GEMM, each launch configuration the
    launcher's heuristic picks (fold.choose_config at 132 SMs) for WID's shapes, its shapes grouped by which of M, N, K
    are multiples of 16 (Triton specializes that at launch too: the masks' and loads' vector width depend on it)."""
    for op, what, flags, unit, needs, shape_of in GEMM_USES:
        served = {}
        for hidden, ffn in SHAPES.values():
            for m, k, compactors in teacher_linears(hidden, ffn):
                if needs in compactors:
                    M, N, K = shape_of(m, k)
                    config = fold_module.choose_config(M, N, K, elem_bytes, fold_module.SMS_ASSUMED, interpret=False)
                    served.setdefault(config, set()).add((M, N, K))
        for config, shapes in sorted(served.items()):
            groups = {}
            for shape in shapes:
                groups.setdefault(tuple(x % 16 == 0 for x in shape), []).append(shape)
            for divisible, group in sorted(groups.items()):
                yield op, what, flags, unit, config, divisible, sorted(group)


def _triton_variants(arch: int):
    import torch
    import triton.language as tl

    modules = _triton_modules()
    common = importlib.import_module("wid_kernels.backends.triton_ops._common")
    tl_dtype = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    f32 = "fp32"
    fold, norm, adamw = modules["fold"], modules["masked_layer_norm"], modules["wid_adamw_multi_tensor"]
    for dtype in DTYPES:
        p = "*" + dtype
        gemm = dict(A=p, B=p, C=p, IDX_M="*i32", IDX_N="*i32", BIAS_IN=p, BIAS_OUT=p, U=p, V=p, WS="*fp32", BWS="*fp32",
                    M="i32", N="i32", K="i32", s_am="i32", s_ak="i32", s_bk="i32", s_bn="i32", s_cm="i32", s_cn="i32",
                    scale=f32, bias_scale=f32, n_sum="i32")
        precision = common.dot_precision(torch_dtype[dtype])  # fp32: TF32 only where torch's matmul setting allows it
        elem_bytes = torch_dtype[dtype].itemsize
        for op, what, flags, unit, config, divisible, shapes in _gemm_variants(fold, elem_bytes):
            meta = config.meta()
            options = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
            split = (f"; split-K: {config.split_k} partial programs per tile into the fp32 workspace, then the same binary"
                     " sums them (no K steps) and runs the epilogue" if config.split_k > 1 else "")
            # as a launch specializes it: unit strides are constants; torch's allocations, the other strides and the
            # multiples of 16 among M, N, K are known to be 16-divisible
            aligned = [name for name, kind in gemm.items() if kind.startswith("*")]
            aligned += [name for name in ("s_am", "s_ak", "s_bk", "s_bn", "s_cm", "s_cn") if name not in unit]
            aligned += [name for name, ok in zip("MNK", divisible) if ok]
            yield dict(op=op, dtype=dtype, kernel=fold._gather_gemm_kernel,
                       signature={name: kind for name, kind in gemm.items() if name not in unit}, divisible_by_16=aligned,
                       constexprs=dict(flags, COMPUTE=tl_dtype[dtype], PRECISION=precision, **meta, **dict.fromkeys(unit, 1)),
                       options=options,
                       variant=f"{what}; {config}" + (f", fp32 dot precision {precision}" if dtype == "fp32" else "")
                               + f"{split}; for M x N x K = {', '.join('x'.join(map(str, shape)) for shape in shapes)}")
        for hidden in sorted({h for h, _ in SHAPES.values()}):
            block_m, block_n, warps = norm._blocks(hidden)
            io = dict(X=p, R=p, GAMMA="*fp32", BETA="*fp32", KEEP="*u8", MEAN="*fp32", RSTD="*fp32", n_rows="i32",
                      n_cols="i32", count=f32)
            flags = dict(HAS_RESIDUAL=False, HAS_GAMMA=True, HAS_KEEP=True, BLOCK_M=block_m, BLOCK_N=block_n)
            yield dict(op="masked_layer_norm", dtype=dtype, kernel=norm._mln_forward_kernel, signature=dict(io, Y=p, eps=f32),
                       constexprs=dict(flags, HAS_BETA=True), options=dict(num_warps=warps),
                       variant=f"forward, width {hidden}: {block_m} rows x {block_n} per program, {warps} warps")
            yield dict(op="masked_layer_norm", dtype=dtype, kernel=norm._mln_backward_kernel,
                       signature=dict(io, DY=p, DH=p, DGAMMA_PART="*fp32", DBETA_PART="*fp32"),
                       constexprs=dict(flags, NEED_DH=True, NEED_DGAMMA=True, NEED_DBETA=True), options=dict(num_warps=warps),
                       variant=f"backward, width {hidden}: {block_m} rows x {block_n} per program, {warps} warps")
        yield dict(op="wid_adamw_multi_tensor", dtype=dtype, kernel=adamw._wid_adamw_kernel,
                   signature=dict(META="*i64", CHUNKS="*i32", lr=f32, beta1=f32, beta2=f32, eps=f32, decay=f32, pen_lo=f32,
                                  pen_hi=f32),
                   constexprs=dict(P_DT=tl_dtype[dtype], G_DT=tl_dtype[dtype], M_DT=tl.float32, V_DT=tl.float32,
                                   MASKS_ACTIVE=True, HAS_EXTRA=True, AUTHORS=True, ALIGNED=True, N_META=adamw._N_META,
                                   BLOCK=adamw._BLOCK),
                   options=dict(num_warps=adamw._WARPS),
                   variant=f"{dtype} parameters, fp32 moments, {adamw._BLOCK} per chunk, {adamw._WARPS} warps, 16-byte aligned")


def triton_report(arch: int) -> list[dict]:
    """Compile every Triton variant for sm_`arch` and read back its resources."""
    import triton
    from triton.backends.compiler import GPUTarget

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, spec in enumerate(_triton_variants(arch)):
            kernel = spec["kernel"]
            signature = {name: spec["signature"].get(name, "constexpr") for name in kernel.arg_names}
            attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec.get("divisible_by_16", ())}
            source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=spec["constexprs"], attrs=attrs)
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=spec["options"])
            cubin = Path(tmp) / f"{index}.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            registers, local, _, tensor_cores = _resources(str(cubin), arch)[compiled.metadata.name]
            rows.append(dict(kernel=kernel.__name__, op=spec["op"], dtype=spec["dtype"], registers=registers, spills=local,
                             shared_bytes=int(compiled.metadata.shared), tensor_cores=tensor_cores, variant=spec["variant"],
                             source="triton"))
    return rows


def _cuda_kernel(mangled: str) -> tuple[str, str, str | None, int | None]:
    """(name, op, dtype, vector width) of one of the extension's kernels from its Itanium-mangled name:
    length-prefixed components after `_ZN`, the last is the kernel; the template arguments follow (`IN3c108BFloat16E`,
    `If`, `Id`, then the vector width `Li8E`)."""
    position, names = mangled.find("_ZN") + 3, []
    while 0 < position < len(mangled) and mangled[position].isdigit():
        digits = re.match(r"\d+", mangled[position:]).group()
        start = position + len(digits)
        names.append(mangled[start:start + int(digits)])
        position = start + int(digits)
    name = names[-1] if names else mangled
    arguments = mangled[position:]
    dtype = ("bf16" if arguments.startswith("IN3c108BFloat16") else "fp16" if arguments.startswith("IN3c104Half") else
             "fp32" if arguments.startswith("If") else None)  # fp64 (Id) is the reference's territory: not reported
    width = re.search(r"Li(\d+)E", arguments)
    op = next((op for key, op in CUDA_OPS if name.startswith(key)), None)
    return name, op, dtype, int(width.group(1)) if width else None


def _fp32_beside_half(mangled: str) -> bool:
    """A LayerNorm kernel taking a bf16/fp16 x with an fp32 residual: its second template argument is `f` (the
    same-dtype kernels repeat the first one as a substitution, `S3_`)."""
    return re.search(r"mln_\w+?_kernelIN3c10\d+(BFloat16|Half)Ef", mangled) is not None


CUDA_OPS = (("mln_", "masked_layer_norm"), ("adamw", "wid_adamw_multi_tensor"))


def cuda_report(arch: int) -> list[dict]:
    """The CUDA extension's kernels for sm_`arch`, from its cubin (empty when it was built without CUDA or that arch)."""
    try:
        from wid_kernels import _C
    except ImportError:
        return []
    if not getattr(_C, "cuda_built", False):
        return []
    try:
        found = _resources(_C.__file__, arch)
    except subprocess.CalledProcessError:
        return []  # no code for this architecture in the extension
    rows = []
    for mangled, (registers, local, shared, tensor_cores) in sorted(found.items()):
        kernel, op, dtype, width = _cuda_kernel(mangled)
        if op is None or dtype is None:
            continue
        rows.append(dict(kernel=kernel, op=op, dtype=dtype, registers=registers, spills=local, shared_bytes=shared,
                         tensor_cores=tensor_cores,
                         variant=(f"{width} elements per vector access" if width else mangled)
                         + ("; fp32 residual and outputs" if _fp32_beside_half(mangled) else ""),
                         source="cuda"))
    return rows


def compile_report(arch: int = 90) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise CompileReportError("TRITON_INTERPRET is set: interpreted kernels cannot be compiled; unset it")
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise CompileReportError(f"triton is not installed ({exc}); pip install triton") from None
    return triton_report(arch) + cuda_report(arch)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wid_kernels.compile_report",
                                     description="registers, spills, shared memory and tensor-core use of every kernel")
    parser.add_argument("--arch", type=int, default=90, help="compute capability × 10, e.g. 90 (H100/H200), 80 (A100)")
    args = parser.parse_args(argv)
    if args.arch < 70:
        print(f"compile_report: error: --arch {args.arch} is older than Volta; pass 70 or more (e.g. 90)", file=sys.stderr)
        return 2
    try:
        rows = compile_report(args.arch)
    except CompileReportError as error:
        print(f"compile_report: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
