"""The `wid` command: distill, export, verify, evaluate, attention, speed, similarity, info.

    wid distill [--teacher T] [--corpus F ...] [--preset wid55|wid11|half] [--target_hidden N ...]
                [--method wid|kd|mlm|prune] [--recipe auto|paper|short] [--compensate on|off] [--max_steps N] [--w_step N] [--output_dir D]
                [--backend auto|...] [--resume_from_checkpoint CHECKPOINT_OR_RUN_DIR]
                [Trainer options]
    wid export CHECKPOINT_DIR OUTPUT_DIR [--overwrite] [--compensate on|off] [--corpus F ...] [--calibration_batches N]
    wid verify CHECKPOINT_DIR STUDENT_DIR [--tolerance 1e-4]
    wid evaluate MODEL_DIR [--task NAME | --train_file F --validation_file F] [--num_train_epochs N] [--output_dir D]
    wid attention TEACHER_DIR STUDENT_DIR [--output FIGURE.png]
    wid speed TEACHER_DIR STUDENT_DIR [MORE_DIRS ...] [--batch_size N] [--seq_len N] [--dtype D] [--device D]
    wid similarity TEACHER_DIR STUDENT_DIR [--texts FILE ...] [--num_texts N] [--json REPORT.json]
    wid info

Bad input ends with one line on stderr that names the fix and exit status 2; Ctrl-C ends `wid distill` with one
line that says how to resume, exit status 130.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _given(argv, name) -> bool:
    return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv)


def _has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def distill(argv) -> int:
    from transformers import HfArgumentParser, TrainingArguments

    from .distill import CLIP_BY_RECIPE, DEFAULT_RUN, DistillArguments, format_summary, run_distillation

    parser = HfArgumentParser((DistillArguments, TrainingArguments), prog="wid distill")
    args, training_args = parser.parse_args_into_dataclasses(args=argv)
    defaults = {}
    if not _given(argv, "output_dir"):
        defaults["output_dir"] = "wid-student"
    if args.teacher is None and args.corpus is None:  # the built-in default run; what is given replaces its value
        for name in ("max_steps", "per_device_train_batch_size", "logging_steps", "learning_rate"):
            if not _given(argv, name) and not (name == "max_steps" and _given(argv, "num_train_epochs")):
                defaults[name] = DEFAULT_RUN[name]
        if args.preset is None and args.target_hidden is None:
            args.preset = DEFAULT_RUN["preset"]
        if args.w_step is None and not _given(argv, "resume_from_checkpoint"):  # a resume keeps its checkpoint's
            args.w_step = DEFAULT_RUN["w_step"]
        for name in ("compactor_lr", "teacher_lr"):
            if not _given(argv, name):
                setattr(args, name, DEFAULT_RUN[name])
    if not _given(argv, "report_to"):
        defaults["report_to"] = "none"
    if not _given(argv, "max_grad_norm"):
        defaults["max_grad_norm"] = CLIP_BY_RECIPE  # the recipe decides (the Trainer's own default is 1.0)
    if not _given(argv, "save_steps") and not _given(argv, "save_strategy"):
        defaults["save_steps"] = 500
    if not _given(argv, "dataloader_pin_memory") and not _has_accelerator():
        defaults["dataloader_pin_memory"] = "false"  # the Trainer's default warns on every CPU run that it cannot pin
    if defaults:
        argv = list(argv) + [item for key, value in defaults.items() for item in (f"--{key}", str(value))]
        args_again, training_args = parser.parse_args_into_dataclasses(args=argv)
    summary = run_distillation(args, training_args)
    if training_args.process_index == 0:  # one summary for a run of many processes
        print(format_summary(summary))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def export(argv) -> int:
    from .compensate import CALIBRATION_BATCHES, COMPENSATE_CHOICES, DEFAULT_COMPENSATE
    from .export import export_checkpoint

    parser = argparse.ArgumentParser(prog="wid export", description="fold a wid distill checkpoint into a plain student")
    parser.add_argument("checkpoint_dir")
    parser.add_argument("output_dir")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output_dir (its student files are replaced)")
    parser.add_argument("--compensate", choices=COMPENSATE_CHOICES, default=DEFAULT_COMPENSATE,
                        help="fold what the removed channels still carry into the kept ones (default %(default)s)")
    parser.add_argument("--corpus", nargs="+", help="calibration text for --compensate on (default: the run's corpus)")
    parser.add_argument("--calibration_batches", type=_positive_int, default=CALIBRATION_BATCHES,
                        help="batches of 16 sequences (default %(default)s)")
    args = parser.parse_args(argv)
    report = export_checkpoint(args.checkpoint_dir, args.output_dir, args.overwrite, args.compensate, args.corpus,
                               args.calibration_batches)
    print(json.dumps(report, indent=2))
    return 0


def verify(argv) -> int:
    """Exit 0 when the student matches its checkpoint within --tolerance, 1 when it does not."""
    from .export import verify_student

    parser = argparse.ArgumentParser(prog="wid verify", description="re-check a student against its checkpoint")
    parser.add_argument("checkpoint_dir")
    parser.add_argument("student_dir")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |logit difference| after pruning (default 1e-4)")
    args = parser.parse_args(argv)
    if not args.tolerance >= 0:
        raise ValueError(f"--tolerance must be 0 or more (a max |logit difference|), got {args.tolerance:g}")
    report = verify_student(args.checkpoint_dir, args.student_dir, args.tolerance)
    print(json.dumps(report, indent=2))
    if not report["matches"]:
        print(f"wid verify: {args.student_dir} does not match {args.checkpoint_dir} (max logit difference "
              f"{report['max_logit_difference_after_pruning']:.3g} > {args.tolerance:g})"
              + "".join(f"; {notice}" for notice in report.get("notices", ())), file=sys.stderr)
        return 1
    return 0


def info(argv) -> int:
    import platform

    argparse.ArgumentParser(prog="wid info", description="versions, devices, and per device and op the kernel backend in "
                            "use and why (choose with WID_BACKEND or wid distill --backend)").parse_args(argv)

    import torch
    import transformers

    import wid
    import wid_kernels

    lines = [
        f"wid {wid.__version__}, python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
        f"devices: cpu ({os.cpu_count()} cores)"
        + "".join(f", cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())),
        f"kernel backend: {wid_kernels.get_backend()} (set with wid distill --backend or WID_BACKEND; auto chooses per op, checks each "
        "choice once against the reference and falls back with a warning if a kernel fails)",
        "backends:",
    ]
    for name, reason in wid_kernels.available_backends().items():
        lines.append(f"  {name:10s} {'available' if reason is None else 'unavailable: ' + reason}")
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for device in devices:
        lines.append(f"ops on {device} (fp32):")
        for op, (backend, why) in wid_kernels.backends_in_use(device).items():
            lines.append(f"  {op:24s} {backend:10s} {why}")
    print("\n".join(lines))
    return 0


def attention(argv) -> int:
    from .attention import main as compare

    return compare(argv)


def evaluate(argv) -> int:
    from .evaluate import main as fine_tune_and_score

    return fine_tune_and_score(argv)


def similarity(argv) -> int:
    from .sentence import main as compare_as_sentence_encoders

    return compare_as_sentence_encoders(argv)


def speed(argv) -> int:
    from .speed import main as time_side_by_side

    return time_side_by_side(argv)


COMMANDS = {"distill": distill, "export": export, "verify": verify, "evaluate": evaluate, "attention": attention, "speed": speed,
            "similarity": similarity, "info": info}


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one line each (Python's default adds the source line that raised it, which means nothing to a user
    of the command)."""
    return f"wid: {category.__name__}: {message}\n"


def main(argv=None) -> int:
    import warnings

    warnings.formatwarning = _one_line_warning
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip().split("\n\n")[1] if argv and argv[0] in ("-h", "--help") else
              f"usage: wid {{{','.join(COMMANDS)}}} ... (wid COMMAND --help for its options)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from .architecture import UnsupportedModelError
    from .distill import RunError
    from .export import CheckpointError
    from .fold import FoldError
    from .training import TrainingDivergedError

    expected = (UnsupportedModelError, RunError, CheckpointError, FoldError, TrainingDivergedError)
    try:
        from .data import CorpusError

        expected = expected + (CorpusError,)
    except ImportError:
        pass
    from .run_folder import RunInterrupted

    try:
        return COMMANDS[argv[0]](argv[1:])
    except RunInterrupted as stop:
        print(f"wid {argv[0]}: {stop}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"wid {argv[0]}: interrupted", file=sys.stderr)
        return 130
    except expected as error:
        print(f"wid {argv[0]}: error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # config validation (impossible targets, bad options)
        print(f"wid {argv[0]}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
