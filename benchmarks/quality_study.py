"""Does the student hold up? Teacher vs WID vs baselines of the same shape and budget, written to QUALITY.md.

    python benchmarks/quality_study.py                       # built-in teacher + corpus + tweet sentiment (CPU, ~1 h)
    python benchmarks/quality_study.py --max_steps 400 --eval_train_samples 8000 --output_dir runs/q400
    python benchmarks/quality_study.py --teacher T --corpus F --train_file t.csv --validation_file v.csv --report R.md

Every student comes from `wid distill --method {wid,kd,mlm,prune}` run as its own process with the
same settings (the built-in default run's, DEFAULT_RUN in wid/distill.py, unless overridden here), so
the comparison is what a user would get. Each model is then fine-tuned and scored on the same
classification task with the same settings (`wid evaluate`), and its attention maps are compared with
the teacher's (`wid attention`). Finished steps are kept in --output_dir and skipped when the study is
run again, so an interrupted study resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: `benchmarks` is importable from the repository root
    sys.path.insert(0, str(REPO_ROOT))
METHOD_NAMES = {"wid": "WID", "kd": "truncated + MLM + logit KD", "mlm": "truncated + MLM", "prune": "one-shot prune (no training)"}


def distill_argv(args, method: str, output_dir: Path) -> list[str]:
    """`wid distill` options of one student: the default run's settings, then this study's overrides."""
    from wid.distill import DEFAULT_RUN

    settings = dict(DEFAULT_RUN)
    if args.head_warmup_steps is not None:
        settings["head_warmup_steps"] = args.head_warmup_steps
    if args.max_steps:
        settings["max_steps"] = args.max_steps
    argv = ["--method", method, "--output_dir", str(output_dir), "--seed", str(args.seed), "--disable_tqdm", "true"]
    for name, value in settings.items():
        argv += [f"--{name}", str(value)]
    if args.teacher:
        argv += ["--teacher", args.teacher]
    if args.corpus:
        argv += ["--corpus", *args.corpus]
    return argv + list(args.distill_args)


def run_logged(command: list[str], log: Path) -> None:
    """Run a step as its own process, its output in `log`; stop the study with the log's tail if it fails."""
    print("+", shlex.join(command), f"> {log}", flush=True)
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO_ROOT, check=False)
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        sys.exit(f"quality_study.py: step failed (exit {done.returncode}); last lines of {log}:\n" + "\n".join(tail))


def distill_students(args, root: Path) -> dict[str, dict]:
    """{method: wid_summary.json} of every student, training the missing ones."""
    summaries = {}
    for method in args.methods:
        student = root / method
        summary_file = student / "wid_summary.json"
        if not summary_file.exists():
            started = time.time()
            run_logged([sys.executable, "-m", "wid.cli", "distill", *distill_argv(args, method, student),
                        "--overwrite_output_dir", "true"], root / f"distill-{method}.log")
            print(f"  {method}: {time.time() - started:.0f} s", flush=True)
        summaries[method] = json.loads(summary_file.read_text())
    return summaries


def evaluate_all(args, models: dict[str, str], root: Path) -> dict[str, dict]:
    """Fine-tune and score every model on the task, each with the same settings and seed."""
    from wid.evaluate import evaluate_model

    results = {}
    for name, model_dir in models.items():
        out = root / "eval" / name
        done = out / "eval_results.json"
        if not done.exists():
            print(f"+ evaluate {name} ({model_dir}) on {args.task or args.train_file}", flush=True)
            evaluate_model(model_dir, task=None if args.train_file else args.task, train_file=args.train_file,
                           validation_file=args.validation_file, num_train_epochs=args.eval_epochs, output_dir=out,
                           max_train_samples=args.eval_train_samples, max_eval_samples=args.eval_samples,
                           max_seq_length=args.eval_max_seq_length, learning_rate=args.eval_learning_rate, seed=args.seed)
        results[name] = json.loads(done.read_text())
    return results


def compare_all(args, teacher: str, students: dict[str, str], root: Path) -> dict[str, dict]:
    from wid.attention import compare_attention
    from wid.export import write_json_atomically

    results = {}
    for name, student_dir in students.items():
        done = root / "attention" / f"{name}.json"
        if not done.exists():
            print(f"+ attention {name}", flush=True)
            figure = root / "attention" / f"{name}.png"
            report = compare_attention(teacher, student_dir, output=figure, num_texts=args.attention_texts,
                                       max_seq_length=args.attention_max_seq_length)
            write_json_atomically(done, report)  # its presence marks the step done
        results[name] = json.loads(done.read_text())
    return results


def _fmt(value, digits=4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def measure_speeds(args, teacher: str, students: dict[str, str]) -> dict[str, dict] | None:
    """{name: `wid speed` row} of the teacher and every student, timed side by side on this machine's CPU."""
    from wid.speed import measure_speed

    if args.speed_batch_size < 1:
        return None
    names = ["teacher", *students]
    print(f"+ speed of {', '.join(names)} (CPU, batch {args.speed_batch_size} × {args.speed_seq_len})", flush=True)
    result = measure_speed([teacher, *students.values()], batch_size=args.speed_batch_size, seq_len=args.speed_seq_len,
                           device="cpu", rounds=args.speed_rounds)
    return dict(zip(names, result["models"]))


def render(args, summaries, scores, attention, costs, seconds: float, speeds: dict | None = None) -> str:
    import torch
    import transformers

    from wid.speed import device_name

    first = next(iter(summaries.values()))
    metric = "accuracy"
    task = scores["teacher"]["task"]
    header = ["model", "encoder params", "GFLOPs / 128-token seq", "held-out MLM loss", f"{task} accuracy", f"{task} F1",
              "attention cosine", "attention KL", "relative output spread", "masked compactor fraction at cut", "training time"]
    if speeds:
        header += [f"CPU sequences / s (batch {args.speed_batch_size})", "CPU speed-up"]
    rows = [["teacher (all heads, its MLM head as in the notes)" if not args.teacher else f"teacher {args.teacher}",
             f"{costs['teacher'][0] / 1e6:.2f} M", f"{costs['teacher'][1] / 1e9:.2f}", _fmt(first["teacher_heldout_mlm_loss"]),
             _fmt(scores["teacher"].get(metric)), _fmt(scores["teacher"].get("f1")), "1 (itself)", "0 (itself)", "1 (itself)", "–", "–"]]
    names = ["teacher"]
    for method, summary in summaries.items():
        maps = attention.get(method, {})
        rows.append([f"{METHOD_NAMES.get(method, method)} (`--method {method}`)", f"{costs[method][0] / 1e6:.2f} M",
                     f"{costs[method][1] / 1e9:.2f}", _fmt(summary["student_heldout_mlm_loss"]),
                     _fmt(scores[method].get(metric)), _fmt(scores[method].get("f1")), _fmt(maps.get("mean_cosine"), 3),
                     _fmt(maps.get("mean_kl"), 3), _fmt(summary.get("representation_spread_vs_teacher"), 3),
                     _fmt(summary.get("masked_compactor_fraction_at_cut"), 3), f"{summary['seconds']:.0f} s"])
        names.append(method)
    if speeds:
        for name, row in zip(names, rows):
            row += [f"{speeds[name]['sequences_per_second']:.1f}", f"{speeds[name]['speedup_vs_first']:.2f}×"]
    uniform = next(iter(attention.values()), {})
    widths = first["student_widths"]
    evaluation = scores["teacher"]
    lines = [
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; device: {device_name(torch.device('cpu'))}; "
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
        f"- Command: `{shlex.join(getattr(sys, 'orig_argv', sys.argv))}` (this invocation: {seconds / 60:.0f} min; steps found "
        f"finished in its output folder are reused, not re-run; fine-tuning + scoring took {_eval_minutes(scores):.0f} min in all)",
        f"- Students: hidden {widths['hidden']} ({widths['heads']} heads), FFN {widths['intermediate']}, {widths['layers']} layers; "
        f"teacher MLM head: {first.get('teacher_mlm_head', 'n/a')}; "
        f"{first['head_warmup_steps']} head warm-up steps (all methods) + {max(s['steps'] for s in summaries.values())} "
        f"training steps (prune: none), batch {args.batch_size}, seed {args.seed}; settings: `wid distill {shlex.join(distill_argv(args, 'METHOD', Path('OUT')))}`",
        f"- Held-out MLM loss: {_heldout_note(args)}; {task}: fine-tuned {evaluation['num_train_epochs']:g} epoch(s) on "
        f"{evaluation['train_samples']} examples, lr {evaluation['learning_rate']:g}, max {evaluation['max_seq_length']} tokens, "
        f"scored on {evaluation['eval_samples']} held-out examples (F1 of the positive class).",
        f"- Attention: mean over layers and heads on {uniform.get('texts', '?')} held-out passages ({uniform.get('query_rows', '?')} "
        f"query rows); for scale, uniform attention scores cosine {_fmt(uniform.get('uniform_mean_cosine'), 3)}, "
        f"KL {_fmt(uniform.get('uniform_mean_kl'), 3)}. Figures: `{args.output_dir}/attention/*.png`.",
        *([f"- Speed: `wid speed` of every encoder on the same random token ids, {args.speed_batch_size} × "
           f"{args.speed_seq_len} tokens, fp32, this machine's CPU, median of {args.speed_rounds} interleaved rounds "
           "(measured at each invocation)."] if speeds else []),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]
    return "\n".join(lines)


def _eval_minutes(scores: dict) -> float:
    return sum(r.get("train_runtime_s", 0) + r.get("eval_runtime_s", 0) for r in scores.values()) / 60


def _heldout_note(args) -> str:
    if args.corpus:
        return "not measured (a user corpus has no held-out split)"
    return "the shipped held-out split (8 batches × 16 sequences × 128 tokens, fixed masking seed)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="quality-study", help="students, scores and logs (resumable)")
    parser.add_argument("--report", type=Path, default=HERE / "QUALITY.md", help="Markdown file whose results section is replaced")
    parser.add_argument("--section", default="results", help="name of the section of --report to replace (one per study variant)")
    parser.add_argument("--methods", nargs="+", default=["wid", "kd", "mlm", "prune"], choices=list(METHOD_NAMES))
    parser.add_argument("--teacher", help="default: the built-in all-MiniLM-L6-v2")
    parser.add_argument("--corpus", nargs="+", help="default: the shipped corpus (which has a held-out split)")
    parser.add_argument("--max_steps", type=int, help="training steps of every method (default: the default run's)")
    parser.add_argument("--head_warmup_steps", type=int, help="(default: the default run's)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--task", default="tweet_sentiment", help="wid evaluate task (default: the offline tweet sentiment)")
    parser.add_argument("--train_file", help="instead of --task: local CSV/TSV files")
    parser.add_argument("--validation_file")
    parser.add_argument("--eval_train_samples", type=int, default=4000)
    parser.add_argument("--eval_samples", type=int, default=2000)
    parser.add_argument("--eval_epochs", type=float, default=1.0)
    parser.add_argument("--eval_max_seq_length", type=int, default=64)
    parser.add_argument("--eval_learning_rate", type=float, default=1e-4)
    parser.add_argument("--attention_texts", type=int, default=16)
    parser.add_argument("--attention_max_seq_length", type=int, default=128)
    parser.add_argument("--speed_batch_size", type=int, default=32, help="inference timing batch (0: no timing)")
    parser.add_argument("--speed_seq_len", type=int, default=128)
    parser.add_argument("--speed_rounds", type=int, default=10)
    parser.add_argument("distill_args", nargs="*", help="after --: more `wid distill` options for every student")
    args = parser.parse_args(argv)

    from transformers import AutoConfig

    from wid.distill import DEFAULT_RUN
    from wid.model_cost import encoder_flops, encoder_parameters
    from wid.teachers import default_teacher_path

    args.batch_size = DEFAULT_RUN["per_device_train_batch_size"]
    started = time.time()
    root = Path(args.output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    teacher = args.teacher or default_teacher_path()
    summaries = distill_students(args, root)
    students = {method: str(root / method) for method in summaries}
    scores = evaluate_all(args, {"teacher": teacher, **students}, root)
    attention = compare_all(args, teacher, students, root)
    costs = {}
    for name, path in {"teacher": teacher, **students}.items():
        config = AutoConfig.from_pretrained(path)
        costs[name] = (encoder_parameters(config), encoder_flops(config, 128))
    speeds = measure_speeds(args, teacher, students)
    text = render(args, summaries, scores, attention, costs, time.time() - started, speeds)
    print(text)
    from benchmarks.report import write_section

    if not args.report.exists():
        args.report.write_text("# Quality study: does the student hold up?\n\nWritten by `benchmarks/quality_study.py`.\n")
    write_section(args.report, args.section, f"## {args.section}\n\n{text}")
    print(f"quality_study.py: wrote the {args.section} section of {args.report}", file=sys.stderr)


if __name__ == "__main__":
    main()
