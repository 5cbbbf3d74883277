"""Run the benchmark suites once and write Markdown tables: every provider next to the reference of the same run.

    python benchmarks/report.py --cpu           # MiniLM-sized suites on this CPU  -> CPU section of benchmarks/RESULTS.md
    python benchmarks/report.py --gpu           # BERT-base-sized suites on the GPU -> GPU section of benchmarks/RESULTS.md
    python benchmarks/report.py --json FILE     # tables from an earlier run's pytest-benchmark JSON
    python benchmarks/report.py --cpu --quick   # tiny sizes: checks the pipeline end to end, prints only
    python benchmarks/report.py --gpu --time-budget 300   # what fits in 5 minutes, the most decisive first
    python benchmarks/report.py --cpu -- -k step   # anything after `--` goes to pytest

Ratios only ever divide times from one JSON, i.e. one pytest session: numbers from different runs
(or machines) are never mixed. RESULTS.md keeps one section per device kind, each replaced whole
by the next run of that kind, with its device, date, versions and the exact command.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
OP_PROVIDERS = ("reference", "torch", "torch_compile", "triton", "cuda", "limit")  # as in conftest.py
STEP_PROVIDERS = ("reference", "torch", "triton", "cuda", "plain")
LABELS = {"torch_compile": "torch.compile", "limit": "limit", "plain": "plain BERT"}
LIMIT_OF = {"compacted_linear": "plain linear", "fold": "plain GEMMs", "masked_layer_norm": "plain LayerNorm",
            "wid_adamw": "torch AdamW"}
OP_TABLES = (
    ("compacted_linear", "forward", "flops"),
    ("compacted_linear", "forward+backward", "flops"),
    ("fold", "forward", "flops"),
    ("masked_layer_norm", "forward", "bytes"),
    ("masked_layer_norm", "forward+backward", "bytes"),
    ("wid_adamw", "step", "bytes"),
)
TARGET = dict(model="6x384", tokens=4096, speedup=2.0)  # the CPU target: best backend ≥ 2× the reference
# The GPU targets (DESIGN.md, issue 16), BERT-base step at 128 × 128 tokens in bf16: the fastest WID backend
# ≥ 3× the unfused reference, ≤ 1.3× a plain BERT step's time, ≤ 0.6× the reference's peak memory; the fold
# ≥ 70 % of the bf16 GEMM rate measured in the same run; LayerNorm and optimizer ≥ 80 % of the copy bandwidth.
GPU_TARGET = dict(model="12x768", tokens=16384, dtype="bf16", speedup=3.0, of_plain=1.3, memory_of_reference=0.6,
                  fold_of_gemm=0.70, of_copy=0.80)
TITLE = """# WID benchmark results

Written by `benchmarks/report.py`; one section per device kind, each from one pytest session (its
command is in the section). `×` = the reference's time / this provider's time in the same run:
above 1 is faster than the unfused reference. Do not edit a section by hand: re-run the report.
"""


# ------------------------------------------------------------------------------------------- running
def run_suites(device: str, sweep: str, json_path: Path, pytest_args: list[str]) -> str | None:
    """One pytest session of both suites; its JSON holds every number the report uses.

    Returns a warning for the report when some benchmarks failed (the rest are still reported).
    """
    command = [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "--wid-device", device,
               "--wid-sweep", sweep, f"--benchmark-json={json_path}", "--benchmark-columns=median,min,max,rounds",
               *pytest_args]
    env = dict(os.environ, WID_REPORT_COMMAND=shlex.join(getattr(sys, "orig_argv", sys.argv)))
    print("+", shlex.join(command), flush=True)
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env)
    try:
        returncode = process.wait()
    except KeyboardInterrupt:  # the same SIGINT reached pytest (one process group): let it finish writing the JSON
        returncode = process.wait()
    if returncode == 0:
        if not json_path.exists():  # pytest-benchmark writes no JSON when nothing was timed
            sys.exit("report.py: no benchmark ran (every one was skipped: a time budget spent before the first, or "
                     "no case for this device); no report written")
        return None
    if returncode not in (1, 2) or not json_path.exists():  # 1: some failed; 2: interrupted; else no usable run
        sys.exit(f"report.py: the benchmark run failed (pytest exit status {returncode}); no report written")
    if returncode == 2:  # stopped (gpu_check's time limit sends SIGINT): what was timed before is reported
        return "the benchmark run was INTERRUPTED (pytest exit status 2): benchmarks after the stop are not measured."
    return "some benchmarks FAILED in this run (pytest exit status 1; see its output): their cells are empty."


# ------------------------------------------------------------------------------------------- reading
def load(json_path: Path) -> tuple[dict, list[dict]]:
    data = json.loads(json_path.read_text())
    rows = []
    for bench in data.get("benchmarks", []):
        info = dict(bench.get("extra_info", {}))
        if "op" not in info:
            continue
        stats = bench.get("stats") or {}
        if "time_ms" not in info:
            if "median" not in stats:
                continue
            info["time_ms"] = stats["median"] * 1e3
        info["rounds"] = stats.get("rounds")
        rows.append(info)
    if not rows:
        sys.exit(f"report.py: {json_path} has no timed benchmarks (was it written under --benchmark-disable?)")
    return data, rows


# ------------------------------------------------------------------------------------------- formatting
def fmt_time(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1000:.3g} s"
    return f"{ms:.3g} ms"


def fmt_rate(value: float, unit: str) -> str:
    """value in units per second (FLOP/s or B/s), shown in G or T."""
    scaled, prefix = value / 1e9, "G"
    if scaled >= 1000:
        scaled, prefix = scaled / 1000, "T"
    return f"{scaled:.3g} {prefix}{unit}/s"


def fmt_ratio(reference_ms, ms) -> str:
    return f"{reference_ms / ms:.2f}×" if reference_ms else "–"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ceilings(rows: list[dict]) -> dict:
    """(case, 'gemm', dtype) -> FLOP/s and (case, 'copy', None) -> B/s, measured in this run."""
    found = {}
    for r in rows:
        if r["op"] == "ceiling":
            work = r["flops"] if r["mode"] == "gemm" else r["bytes"]
            found[(r["case"], r["mode"], r["dtype"] if r["mode"] == "gemm" else None)] = work / (r["time_ms"] / 1e3)
    return found


def throughput(r: dict, kind: str, ceiling: dict) -> str:
    work = r.get(kind)
    if not work:
        return "–"
    rate = work / (r["time_ms"] / 1e3)
    text = fmt_rate(rate, "FLOP" if kind == "flops" else "B")
    key = (r["case"], "gemm", r["dtype"]) if kind == "flops" else (r["case"], "copy", None)
    if key in ceiling:
        text += f" ({100 * rate / ceiling[key]:.0f}% of {'GEMM' if kind == 'flops' else 'copy'})"
    return text


# ------------------------------------------------------------------------------------------- sections
def op_section(rows: list[dict], op: str, mode: str, kind: str, ceiling: dict) -> str | None:
    mine = [r for r in rows if r["op"] == op and r["mode"] == mode]
    if not mine:
        return None
    points = defaultdict(dict)
    for r in mine:
        points[(r["case"], r.get("shape"), r.get("tokens"), r["dtype"], r.get("kept"))][r["provider"]] = r
    providers = [p for p in OP_PROVIDERS if any(p in by for by in points.values())]
    names = [f"limit ({LIMIT_OF[op]})" if p == "limit" else LABELS.get(p, p) for p in providers]
    header = ["case", "shape", "N", "dtype", "kept"] + names
    header.append("fastest backend: " + ("FLOP/s" if kind == "flops" else "bytes/s"))
    body = []
    for (case, shape, tokens, dtype, kept), by in points.items():
        ref = by.get("reference", {}).get("time_ms")
        cells = []
        for p in providers:
            r = by.get(p)
            if r is None:
                cells.append("")
            else:
                text = fmt_time(r["time_ms"]) if p == "reference" else f"{fmt_time(r['time_ms'])} · {fmt_ratio(ref, r['time_ms'])}"
                if "cudagraph_ms" in r:  # GPU, small op: also timed as a CUDA graph (launch overhead hidden)
                    text += f" (graph: {fmt_time(r['cudagraph_ms']) if r['cudagraph_ms'] else 'capture failed'})"
                cells.append(text)
        backends = [r for p, r in by.items() if p != "limit"]
        best = min(backends, key=lambda r: r["time_ms"]) if backends else None
        best_text = f"{LABELS.get(best['provider'], best['provider'])}: {throughput(best, kind, ceiling)}" if best else "–"
        any_row = next(iter(by.values()))
        if "tensors" in any_row:  # the optimizer: its "shape" is the element count
            shape = f"{int(shape) / 1e6:.3g} M elements in {any_row['tensors']} tensors"
        body.append([case, shape or "", "" if tokens is None else str(tokens), dtype, f"{kept:g}", *cells, best_text])
    return f"### {op} — {mode}\n\n" + table(header, body)


def step_section(rows: list[dict]) -> tuple[str | None, list[str]]:
    mine = [r for r in rows if r["op"] == "training_step"]
    if not mine:
        return None, []
    configs = defaultdict(dict)
    for r in mine:
        configs[(r["case"], r["model"], r["batch"], r["tokens"], r["dtype"])][r["provider"]] = r
    parts, verdicts = [], []
    for (case, model, batch, tokens, precision), by in configs.items():
        ref = by.get("reference", {}).get("time_ms")
        plain = by.get("plain", {})
        body = []
        for p in STEP_PROVIDERS:
            r = by.get(p)
            if r is None:
                continue
            memory, base = r.get("peak_memory_mib"), r.get("import_rss_mib")
            memory_text = "–" if memory is None else f"{memory / 1024:.2f} GiB"
            if memory is not None and base is not None:
                memory_text += f" ({(memory - base) / 1024:+.2f} over imports)"
            of_plain = "–"
            if memory is not None and plain.get("peak_memory_mib"):
                of_plain = f"{memory / plain['peak_memory_mib']:.2f}×"
            time_of_plain = f"{r['time_ms'] / plain['time_ms']:.2f}×" if plain else "–"
            own = {"reference": "(all reference)", "plain": "(no compactors)"}.get(p, r.get("own_ops") or "")
            body.append([LABELS.get(p, p), own, fmt_time(r["time_ms"]), fmt_ratio(ref, r["time_ms"]), time_of_plain,
                         memory_text, of_plain])
        how = by[next(iter(by))].get("memory", "peak memory")
        parts.append(f"### Training step — {case}: {model}, batch {batch} × {tokens // batch} = {tokens} tokens, {precision}\n\n"
                     + table(["provider", "own kernels (rest: torch backend's, else reference)", "time per step", "× vs reference",
                              "time / plain step", how, f"{how} / plain"], body))
        backends = [r for p, r in by.items() if p not in ("reference", "plain")]
        if backends and model.startswith(GPU_TARGET["model"]) and tokens == GPU_TARGET["tokens"] \
                and precision == GPU_TARGET["dtype"]:
            verdicts += gpu_step_verdicts(case, by, backends)
        if ref and backends and model.startswith(TARGET["model"]) and tokens == TARGET["tokens"]:
            best = min(backends, key=lambda r: r["time_ms"])
            speedup = ref / best["time_ms"]
            verdict = "met" if speedup >= TARGET["speedup"] else "NOT met"
            line = (f"MiniLM-shaped WID step at {tokens} tokens ({case}): fastest backend `{best['provider']}` "
                    f"{fmt_time(best['time_ms'])} vs reference {fmt_time(ref)} = **{speedup:.2f}×** "
                    f"(target ≥ {TARGET['speedup']:g}×: **{verdict}**)")
            if plain:
                line += f"; plain BERT step {fmt_time(plain['time_ms'])} (fastest WID step = {best['time_ms'] / plain['time_ms']:.2f}× its time)"
            verdicts.append(line + ".")
    return "\n\n".join(parts), verdicts


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**NOT met**"


def gpu_step_verdicts(case: str, by: dict, backends: list[dict]) -> list[str]:
    """The three step targets of the BERT-base bf16 step, each against what this run measured (or why not)."""
    best = min(backends, key=lambda r: r["time_ms"])
    ref, plain = by.get("reference"), by.get("plain")
    where = f"BERT-base WID step, 128 × 128 tokens bf16 ({case}), fastest backend `{best['provider']}` {fmt_time(best['time_ms'])}"
    lines = []
    if ref:
        speedup = ref["time_ms"] / best["time_ms"]
        lines.append(f"{where}: {speedup:.2f}× the reference's {fmt_time(ref['time_ms'])} (target ≥ "
                     f"{GPU_TARGET['speedup']:g}×: {_verdict(speedup >= GPU_TARGET['speedup'])})")
        memory, ref_memory = best.get("peak_memory_mib"), ref.get("peak_memory_mib")
        if memory and ref_memory:
            share = memory / ref_memory
            lines.append(f"{where}: peak memory {memory / 1024:.2f} GiB = {share:.2f}× the reference's "
                         f"{ref_memory / 1024:.2f} GiB (target ≤ {GPU_TARGET['memory_of_reference']:g}×: "
                         f"{_verdict(share <= GPU_TARGET['memory_of_reference'])})")
    else:
        lines.append(f"{where}: the reference step was not measured in this run (no speed-up or memory verdict)")
    if plain:
        share = best["time_ms"] / plain["time_ms"]
        lines.append(f"{where}: {share:.2f}× the plain BERT step's {fmt_time(plain['time_ms'])} (target ≤ "
                     f"{GPU_TARGET['of_plain']:g}×: {_verdict(share <= GPU_TARGET['of_plain'])})")
    return lines


def gpu_op_verdicts(rows: list[dict], ceiling: dict) -> list[str]:
    """Fold against the bf16 GEMM rate, LayerNorm and optimizer against the copy bandwidth: the fastest backend's
    worst point of the BERT-base case (kept 1.0 and pruned alike), so one slow shape is not averaged away."""
    checks = (("fold", "forward", "flops", "gemm", GPU_TARGET["fold_of_gemm"], "bf16"),
              ("masked_layer_norm", "forward+backward", "bytes", "copy", GPU_TARGET["of_copy"], None),
              ("wid_adamw", "step", "bytes", "copy", GPU_TARGET["of_copy"], None))
    lines = []
    for op, mode, kind, ceiling_kind, target, dtype in checks:
        points = defaultdict(list)
        for r in rows:
            if (r["op"] == op and r["mode"] == mode and r["device"] == "cuda" and r.get(kind)
                    and r["provider"] not in ("reference", "limit", "torch_compile") and (dtype is None or r["dtype"] == dtype)):
                points[(r["case"], r.get("shape"), r.get("tokens"), r["dtype"], r.get("kept"))].append(r)
        shares = []
        for (case, shape, tokens, point_dtype, kept), candidates in points.items():
            best = min(candidates, key=lambda r: r["time_ms"])
            key = (case, "gemm", point_dtype) if ceiling_kind == "gemm" else (case, "copy", None)
            if key in ceiling:
                share = best[kind] / (best["time_ms"] / 1e3) / ceiling[key]
                shares.append((share, best, shape, point_dtype, kept))
        if not shares:
            lines.append(f"{op} ({mode}): not measured against a ceiling in this run (no verdict)")
            continue
        share, best, shape, point_dtype, kept = min(shares, key=lambda item: item[0])
        lines.append(f"{op} ({mode}), worst of {len(shares)} points: {100 * share:.0f}% of the measured "
                     f"{'bf16 GEMM rate' if ceiling_kind == 'gemm' else 'copy bandwidth'} (`{best['provider']}`, "
                     f"{shape or ''} {point_dtype} kept {kept:g}; target ≥ {100 * target:.0f}%: {_verdict(share >= target)})")
    return lines


def render(data: dict, rows: list[dict], label: str, note: str | None = None) -> str:
    meta = data.get("wid", {})
    versions = meta.get("versions", {})
    devices = meta.get("devices", {})
    cases = sorted({r["case"] for r in rows})
    on_gpu = any(r["device"] == "cuda" for r in rows)
    device = devices.get("cuda") if on_gpu else devices.get("cpu")
    when = data.get("datetime", "")
    try:
        when = datetime.fromisoformat(when).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        pass
    commit = meta.get("commit", "?") + (" (with uncommitted changes)" if meta.get("dirty") else "")
    ceiling = ceilings(rows)
    lines = [
        f"## {label.upper()}: {device}",
        "",
        *([f"**Note:** {note}", ""] if note else []),
        f"- Date: {when}; commit {commit}; cases: {', '.join(cases)}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
        f"- Command: `{meta.get('report_command') or '(pytest run directly)'}`, which ran `{meta.get('command', '?')}`",
        "- Backends: " + ", ".join(f"{k}: {v}" for k, v in meta.get("backends", {}).items()),
        "- Timing: " + ("`triton.testing.do_bench` median (GPU)" if on_gpu else
                        "pytest-benchmark, median of 3 rounds after 1 warm-up (2 for the training step)") +
        "; denormals flushed on the CPU. A blank cell: the provider cannot run there, or has no op of its own "
        "(it would only run the reference again).",
    ]
    if ceiling:
        parts = []
        for (case, kind, dtype), rate in sorted(ceiling.items(), key=lambda item: (item[0][0], item[0][1], str(item[0][2]))):
            parts.append(f"{case} {'GEMM ' + dtype if kind == 'gemm' else 'copy'} {fmt_rate(rate, 'FLOP' if kind == 'gemm' else 'B')}")
        lines.append("- Ceilings measured in this run: " + "; ".join(parts))
    missing = meta.get("not_measured") or []
    if missing:
        lines.append(f"- Not measured: {len(missing)} benchmarks, skipped when what was left of the session's time "
                     f"budget ({meta.get('time_budget_s') or 0:g} s) could not hold them; the run measures one point of every op per round, the "
                     "most decisive first, torch.compile last (benchmarks/conftest.py `run_order`)")
    steps, verdicts = step_section(rows)
    if on_gpu:
        verdicts += gpu_op_verdicts(rows, ceiling)
    if verdicts:
        lines += ["", "### Target", ""] + [f"- {v}" for v in verdicts]
    if steps:
        lines += ["", steps]
    for op, mode, kind in OP_TABLES:
        section = op_section(rows, op, mode, kind, ceiling)
        if section:
            lines += ["", section]
    lines.append("")
    lines.append("FLOP counts follow DESIGN.md's performance model for each provider's algorithm (dense, so a backend "
                 "that skips pruned rows is credited with work it did not do); bytes are one pass over the op's inputs "
                 "and outputs. `kept` < 1: masks active with that fraction of channels kept (1: before the first mask update). "
                 "On a CPU a memory-bound op can pass 100% of copy: a copy also reads each destination line before "
                 "writing it (write-allocate), so it moves about 1.5× the bytes it is credited with.")
    return "\n".join(lines) + "\n"


def _without(text: str, label: str) -> tuple[str, str | None]:
    """`text` with the section `label` cut out, and the place it was (None if absent)."""
    begin, end = f"<!-- BEGIN {label} -->", f"<!-- END {label} -->"
    if begin not in text or end not in text:
        return text, None
    head, rest = text.split(begin, 1)
    return head, rest.split(end, 1)[1].lstrip("\n")


def write_section(path: Path, label: str, text: str) -> None:
    """Replace this label's section of RESULTS.md (or add it) and drop the placeholder; other sections stay."""
    block = f"<!-- BEGIN {label} -->\n{text}<!-- END {label} -->\n"
    current = path.read_text() if path.exists() else TITLE
    head, tail = _without(current, "placeholder")
    current = head if tail is None else head + tail
    head, tail = _without(current, label)
    current = head.rstrip("\n") + "\n\n" + block + ("" if tail is None else "\n" + tail)
    path.write_text(current.rstrip("\n") + "\n")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--cpu", action="store_true", help="run the CPU cases (MiniLM-shaped)")
    where.add_argument("--gpu", action="store_true", help="run the GPU cases (BERT-base-shaped)")
    where.add_argument("--json", type=Path, help="make the report from this pytest-benchmark JSON instead of running")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a pipeline check); prints unless --output is given")
    parser.add_argument("--note", help="a remark printed at the top of the section (e.g. that the machine was shared)")
    parser.add_argument("--output", type=Path, help=f"Markdown file to update (default {RESULTS.relative_to(REPO_ROOT)})")
    parser.add_argument("--time-budget", type=float, default=0.0, metavar="SECONDS",
                        help="stop starting benchmarks after this long (the most decisive run first) and report what ran")
    args = parser.parse_args(argv)

    failed = None
    if args.json:
        json_path = args.json
    else:
        import torch  # only to pick the default device

        device = "cuda" if args.gpu or (not args.cpu and torch.cuda.is_available()) else "cpu"
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        json_path = REPO_ROOT / ".benchmarks" / f"wid-{device}{'-quick' if args.quick else ''}-{stamp}.json"
        json_path.parent.mkdir(exist_ok=True)
        if args.time_budget > 0:
            pytest_args = ["--wid-time-budget", f"{args.time_budget:g}", *pytest_args]
        failed = run_suites(device, "quick" if args.quick else "full", json_path, pytest_args)
    data, rows = load(json_path)
    label = "gpu" if any(r["device"] == "cuda" for r in rows) else "cpu"
    quick = any(case.endswith("-tiny") for case in data.get("wid", {}).get("sweep", []))
    note = " ".join(filter(None, [failed, args.note])) or None
    text = render(data, rows, label + (" (quick sweep: tiny shapes, not a measurement)" if quick else ""), note)
    print(text)
    output = args.output or (None if quick else RESULTS)
    if output is not None:
        write_section(output, label + ("-quick" if quick else ""), text)
        print(f"report.py: wrote the {label} section of {output} (from {json_path})", file=sys.stderr)


if __name__ == "__main__":
    main()
