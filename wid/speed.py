"""How much faster is the student? Inference throughput of plain model folders, measured side by side.

`wid speed TEACHER_DIR STUDENT_DIR [MORE_DIRS ...]` runs each folder's encoder (`AutoModel`, no task head)
on the same batch of random token ids (fixed batch size and sequence length, no padding) and reports
milliseconds per batch, sequences per second, the speed-up against the first folder, and the achieved
GFLOP/s next to the FLOP count of `wid.model_cost`. The models are timed in interleaved rounds
(A, B, C, A, B, C, ...) and each is scored by its median round, so a machine that speeds up or slows
down during the run affects every model alike and the ratios come from one run.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .architecture import max_positions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SpeedError(ValueError):
    """A folder, device or setting that cannot be timed."""


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SpeedError(f"--device {name} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SpeedError(f"--device {name} but torch sees no CUDA device; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SpeedError(f"--device {name} but torch sees {torch.cuda.device_count()} CUDA device(s); use cuda:0 to "
                             f"cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":  # mps, xpu, meta, …: nothing here times them
        raise SpeedError(f"--device {name}: wid speed times on cpu or cuda devices; use --device cpu or cuda")
    return device


def _load_encoder(model_dir, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModel

    from .export import plain_model_config, quiet_transformers

    config = plain_model_config(model_dir, SpeedError)
    try:
        with quiet_transformers():  # an MLM head left out of AutoModel is reported as unused by design
            model = AutoModel.from_pretrained(model_dir, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - missing weights, unsupported architecture
        raise SpeedError(f"cannot load {model_dir} with AutoModel ({type(exc).__name__}); pass a complete model folder") from None
    return config, model.to(device).eval()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_batch(model, inputs: dict, device: torch.device) -> float:
    """Seconds for one forward pass of the batch, the device drained before and after."""
    _synchronize(device)
    start = time.perf_counter()
    model(**inputs)
    _synchronize(device)
    return time.perf_counter() - start


def measure_speed(model_dirs, batch_size: int = 32, seq_len: int = 128, dtype: str = "float32", device: str | None = None,
                  rounds: int = 10, warmup: int = 2, seed: int = 0) -> dict:
    """Time every folder in `model_dirs` on the same inputs; returns the settings and one row per model.

    Each row: parameters (all, and embeddings + encoder as in wid.model_cost), GFLOPs per sequence,
    median / min milliseconds per batch over `rounds`, sequences per second, speed-up against the first
    folder (its median time over this one's) and achieved GFLOP/s at the median.
    """
    from .model_cost import encoder_flops, encoder_parameters

    if not model_dirs:
        raise SpeedError("give at least one model folder, e.g. wid speed TEACHER_DIR STUDENT_DIR")
    if dtype not in DTYPES:
        raise SpeedError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    if min(batch_size, seq_len, rounds) < 1 or warmup < 0:
        raise SpeedError("--batch_size, --seq_len and --rounds must be at least 1 and --warmup at least 0")
    target = _device(device)
    loaded = [(str(path), *_load_encoder(path, target, DTYPES[dtype])) for path in model_dirs]
    longest = min(max_positions(config) or seq_len for _, config, _ in loaded)
    if seq_len > longest:
        raise SpeedError(f"--seq_len {seq_len} is longer than a model's max_position_embeddings ({longest}); use --seq_len {longest} or less")
    vocab = min(config.vocab_size for _, config, _ in loaded)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
    inputs = {"input_ids": input_ids.to(target), "attention_mask": torch.ones_like(input_ids).to(target)}

    times = {path: [] for path, _, _ in loaded}
    with torch.inference_mode():
        for _ in range(warmup):
            for _, _, model in loaded:
                _time_batch(model, inputs, target)
        for _ in range(rounds):
            for path, _, model in loaded:
                times[path].append(_time_batch(model, inputs, target))

    rows = []
    first_median = statistics.median(times[loaded[0][0]])
    for path, config, model in loaded:
        median = statistics.median(times[path])
        flops = encoder_flops(config, seq_len)
        rows.append({
            "model": path,
            "parameters": sum(p.numel() for p in model.parameters()),
            "encoder_parameters": encoder_parameters(config),
            "gflops_per_sequence": flops / 1e9,
            "median_ms_per_batch": median * 1e3,
            "min_ms_per_batch": min(times[path]) * 1e3,
            "sequences_per_second": batch_size / median,
            "speedup_vs_first": first_median / median,
            "achieved_gflops_per_second": flops * batch_size / median / 1e9,
        })
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(target),
        "torch": torch.__version__,
        "dtype": dtype,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "rounds": rounds,
        "warmup": warmup,
        "models": rows,
    }


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and the threads torch uses (for result headers)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def format_table(result: dict) -> str:
    """The result as a Markdown table with its settings line (for a terminal, a README or RESULTS.md)."""
    lines = [
        f"{result['date']}; {result['device']}; torch {result['torch']}; {result['dtype']}; batch {result['batch_size']} × "
        f"{result['seq_len']} tokens; median of {result['rounds']} interleaved rounds after {result['warmup']} warm-up",
        "",
        "| model | encoder params | GFLOPs / seq | ms / batch (median) | ms / batch (min) | sequences / s | speed-up vs first | achieved GFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["models"]:
        lines.append(f"| {row['model']} | {row['encoder_parameters'] / 1e6:.2f} M | {row['gflops_per_sequence']:.3g} | "
                     f"{row['median_ms_per_batch']:.1f} | {row['min_ms_per_batch']:.1f} | {row['sequences_per_second']:.1f} | "
                     f"{row['speedup_vs_first']:.2f}× | {row['achieved_gflops_per_second']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """`wid speed MODEL_DIR [MODEL_DIR ...] [options]`: prints the table; --output also writes the JSON."""
    parser = argparse.ArgumentParser(prog="wid speed", description="inference speed of model folders, side by side in one run")
    parser.add_argument("model_dirs", nargs="+", help="plain model folders; the first is the reference of the speed-ups")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if there is one)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per model (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--seed", type=int, default=0, help="of the random token ids")
    parser.add_argument("--output", type=Path, help="also write the result as JSON to this file")
    args = vars(parser.parse_args(argv))
    output = args.pop("output")
    result = measure_speed(**args)
    print(format_table(result))
    if output is not None:
        from .export import write_json_atomically

        write_json_atomically(output, result)
    return 0
