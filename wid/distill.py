"""One WID distillation run, end to end: teacher → data → (head warm-up) → WID → fold → student.

`DistillArguments` holds the WID-specific flags of `wid distill`; the Trainer's own options come in
a `transformers.TrainingArguments`. With no teacher or corpus given, the run uses the built-in default
(all-MiniLM-L6-v2 and the shipped corpus, DEFAULT_RUN) sized to finish on a 2-core CPU in about 10
minutes; a flag given (`--max_steps 800`) replaces that one value and keeps the others. `--method`
swaps WID for a baseline of the same student shape and budget (baselines.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, TrainingArguments, default_data_collator

import wid_kernels

from .architecture import (TeacherDims, base_model, base_prefix, check_supported_config, encoder_model_class, ensure_mlm_head,
                           family_of, head_logits, intermediate_size, max_positions, mlm_model_class, model_inputs)
from .baselines import METHODS, train_baseline
from .compactors import attach
from .compensate import CALIBRATION_BATCHES, DEFAULT_COMPENSATE, calibration_source, check_compensate
from .config import WIDConfig
from .export import fold_trained, quiet_transformers, save_student
from .fold import FoldError, fold
from .sentence import encoder_folder, sentence_gap
from .masks import at_target, kept_widths, masked_compactor_fraction, masked_entry_norm
from .run_folder import (RunError, RunFolder, RunInterrupted, check_resume_settings, check_resume_step, last_complete_checkpoint,
                         read_run_record, recorded_corpus, recorded_path, resume_checkpoint)
from .training import (RECIPES, MaskedLMTrainer, WIDScheduleCallback, WIDTrainer, choose_recipe, compactor_lr_after, fit_w_step,
                       flush_denormals, penalty_budget_notice, trained_model, warmup_steps_for)

# The built-in default run (no teacher or corpus given; each value unless given), sized for a 2-core CPU (under 10
# minutes). Its budget is ~1/2500 of the paper's steps, so the schedule is compressed. The teacher gets the MLM head that
# wid ships for it (wid/heads/, built by scripts/train_default_head.py), so no head warm-up runs. The compactors
# keep the paper's learning rate: raising it (2e-4, 2e-3) to let the penalty finish within the run collapsed the
# student to a constant output (benchmarks/QUALITY.md; README, "The built-in default run"). At this budget
# `--recipe auto` takes the short recipe, whose shrink makes the cut exact instead. The teacher weights keep the
# paper's 1e-6: in the recipe study (2026-12-02, seeds 42 and 7) 1e-6 gave a better student than 1e-5 (the
# earlier default) on held-out MLM loss, tweet_sentiment and spread.
DEFAULT_RUN = dict(preset="half", max_steps=160, per_device_train_batch_size=16, w_step=6,
                   logging_steps=6, compactor_lr=5e-5, teacher_lr=1e-6, learning_rate=1e-4)


# Gradient clipping by recipe, when --max_grad_norm is not given (the CLI passes CLIP_BY_RECIPE): the authors do
# not clip; the short recipe clips at 1.0, which kept the default run's student from collapsing in the study of
# benchmarks/QUALITY.md (2026-12-02). The baselines (no recipe) clip at 1.0, the Trainer's own default, as in README's
# comparison: at the default budget (seed 42) clipping lowered their held-out MLM loss (kd 7.04 vs 7.13, mlm 7.10 vs
# 7.18) at a tweet_sentiment within the seed effect (kd 0.821 vs 0.833, mlm 0.828 vs 0.832).
CLIP_BY_RECIPE = -1.0
RECIPE_CLIPPING = {"paper": 0.0, "short": 1.0, None: 1.0}


@dataclass
class DistillArguments:
    """WID flags of `wid distill` (the Trainer's flags come from TrainingArguments)."""

    teacher: str | None = field(default=None, metadata={"help": "teacher directory or name; default: the built-in all-MiniLM-L6-v2"})
    corpus: list[str] | None = field(default=None, metadata={"help": "text files, directories or a datasets name; default: the shipped corpus"})
    preset: str | None = field(default=None, metadata={"help": "wid55 | wid11 | half (scaled to the teacher)"})
    target_hidden: int | None = field(default=None, metadata={"help": "student hidden width"})
    target_intermediate: int | None = field(default=None, metadata={"help": "student FFN width"})
    target_heads: int | None = field(default=None, metadata={"help": "student heads (strategy=head)"})
    strategy: str = field(default="dim", metadata={"help": "dim (narrower heads) | head (fewer heads)"})
    alignment: str = field(default="mask", metadata={"help": "mask (authors' code) | tied (poster; try a ~10x lower --compactor_lr, see benchmarks/QUALITY.md)"})
    criterion: str = field(default="representative", metadata={"help": "representative | group"})
    bias_correction: bool = field(default=False, metadata={"help": "Adam's bias correction as a learning-rate factor (the "
                                                                  "authors' optimizer has none)"})
    update_rule: str = field(default="authors", metadata={"help": "authors (their optimizer numerics) | additive (the "
                                                                  "first-moment injection without its extra decay)"})
    compensate: str = field(default=DEFAULT_COMPENSATE, metadata={"help": "on | off: fold what the removed channels still carry "
                            "into the kept ones (least squares on calibration batches of the corpus; nothing to do when the "
                            "masked entries are 0, as after the short recipe). See benchmarks/QUALITY.md"})
    calibration_batches: int = field(default=CALIBRATION_BATCHES, metadata={"help": "--compensate on: batches of "
                                     "16 sequences read for the compensation"})
    recipe: str = field(default="auto", metadata={"help": "auto (from the budget) | paper (the authors' schedule alone) | "
                                                          "short (masked entries also shrink linearly to exactly 0 by the "
                                                          "end, so the cut is exact at any budget)"})
    schedule_rounding: str = field(default="authors", metadata={"help": "authors (their pruned counts per mask update) | "
                                                                        "ceil (even growth, rounded up)"})
    w_step: int | None = field(default=None, metadata={"help": "steps between mask updates (default 500, fitted to max_steps)"})
    penalty: float = field(default=20.0, metadata={"help": "λ of the update rule"})
    hidden_updates: int = field(default=8, metadata={"help": "mask updates until H reaches its target (dim)"})
    attention_updates: int = field(default=8, metadata={"help": "mask updates until each A_l reaches its target (dim)"})
    intermediate_updates: int = field(default=16, metadata={"help": "mask updates until each F_l reaches its target"})
    mlm_updates: int = field(default=16, metadata={"help": "mask updates until M reaches its target"})
    updates_per_head: int = field(default=2, metadata={"help": "head strategy: mask updates per removed head"})
    teacher_lr: float = field(default=1e-6, metadata={"help": "learning rate of the inherited teacher weights"})
    compactor_lr: float = field(default=5e-5, metadata={"help": "learning rate of the compactors"})
    backend: str | None = field(default=None, metadata={"help": "kernel backend: auto | reference | torch | triton | cuda "
                                                              "(default: $WID_BACKEND, else auto)"})
    head_warmup_steps: int | None = field(default=None, metadata={"help": "MLM-head warm-up steps (encoder frozen); default: 0 if the teacher has a head"})
    head_warmup_lr: float = field(default=5e-4, metadata={"help": "learning rate of the head warm-up"})
    save_widths: list[float] | None = field(default=None, metadata={"help": "also write students when the hidden width passes these fractions, e.g. 0.75 0.5"})
    max_seq_length: int = field(default=128, metadata={"help": "tokens per training sequence"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "allow writing into a non-empty output_dir"})
    method: str = field(default="wid", metadata={"help": "wid | kd | mlm | prune: WID, or a baseline of the same shape and "
                                                         "budget (see wid/baselines.py; baselines train with --learning_rate)"})
    kd_temperature: float = field(default=2.0, metadata={"help": "method kd: softmax temperature of the teacher-logit loss"})
    kd_alpha: float = field(default=0.5, metadata={"help": "method kd: weight of the teacher-logit loss (1 - alpha: MLM loss)"})


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def teacher_config(name_or_path: str):
    """The teacher's config, checked for WID support (no weights loaded: bad input fails fast). A local folder must
    hold a readable config.json and a weights file, and must not be a wid training checkpoint."""
    from .export import plain_model_config

    local = Path(name_or_path).is_dir()
    if local:
        config = plain_model_config(name_or_path, RunError, role="teacher")
    else:
        try:
            config = AutoConfig.from_pretrained(name_or_path)
        except Exception as exc:
            raise RunError(f"cannot load the teacher '{name_or_path}' ({type(exc).__name__}); pass a local model directory "
                           "(config.json + weights) or a hub name while online") from None
    check_supported_config(config)
    if local and not any((Path(name_or_path) / name).is_file() for name in WEIGHT_FILES):
        raise RunError(f"the teacher folder {name_or_path} has no weights ({' or '.join(WEIGHT_FILES[::2])}); save the "
                       "model there with save_pretrained or re-download it")
    return config


def load_teacher(name_or_path: str):
    """(model, tokenizer, has_mlm_head): the family's masked-LM model, with a fresh head if the checkpoint had none
    (a base encoder, a sentence encoder, an ELECTRA discriminator). In fp32 whatever the dtype it was saved in: the
    weights are the run's master weights (`--bf16` is autocast), and a 1e-6 step vanishes in bf16/fp16 weights."""
    from .data import load_tokenizer

    config = teacher_config(name_or_path)
    tokenizer = load_tokenizer(name_or_path, config.vocab_size, RunError)  # before any weights
    head = family_of(config).head
    try:
        with quiet_transformers():
            model, info = mlm_model_class(config).from_pretrained(name_or_path, output_loading_info=True, dtype=torch.float32)
        has_head = not any(key.split(".")[0] in head for key in info["missing_keys"])
        if not has_head:
            with quiet_transformers():
                encoder, info = encoder_model_class(config).from_pretrained(name_or_path, output_loading_info=True,
                                                                            dtype=torch.float32)
            model = ensure_mlm_head(encoder)
    except Exception as exc:  # noqa: BLE001 - safetensors, torch and transformers each raise their own kind
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise RunError(f"cannot load the teacher's weights from {name_or_path} ({type(exc).__name__}: {reason}); the weight "
                       "file is missing, truncated or corrupt: re-download the teacher or save it again") from None
    # the load report is hidden (a head-less encoder is expected to miss the head): encoder gaps are refused here,
    # never trained from random weights
    gaps = [key for key in info["missing_keys"] if key.split(".")[0] not in head and "pooler." not in key]
    if gaps:
        raise RunError(f"the teacher's weights in {name_or_path} lack part of the encoder ({', '.join(gaps[:3])}, ...); "
                       "the checkpoint is incomplete or of another architecture: pass a complete model folder")
    return model, tokenizer, has_head


def check_numeric_arguments(args: DistillArguments, training_args: TrainingArguments) -> None:
    """Refuse nonsense numbers before anything is loaded or written (one line each, naming the fix)."""
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        raise RunError(f"--max_steps must be at least 1, got {training_args.max_steps} (leave it unset to train for "
                       "--num_train_epochs instead)")
    if training_args.max_steps == -1 and not training_args.num_train_epochs > 0:
        raise RunError(f"--num_train_epochs must be positive, got {training_args.num_train_epochs:g} (or give --max_steps)")
    for flag in ("gradient_accumulation_steps", "per_device_train_batch_size"):
        if getattr(training_args, flag) < 1:
            raise RunError(f"--{flag} must be at least 1, got {getattr(training_args, flag)}")
    if not training_args.learning_rate > 0:
        raise RunError(f"--learning_rate must be positive, got {training_args.learning_rate:g}")
    if args.w_step is not None and args.w_step < 1:
        raise RunError(f"--w_step must be at least 1 step between mask updates, got {args.w_step}")
    if args.head_warmup_steps is not None and args.head_warmup_steps < 0:
        raise RunError(f"--head_warmup_steps must be 0 or more, got {args.head_warmup_steps}")
    if args.head_warmup_lr <= 0:
        raise RunError(f"--head_warmup_lr must be positive, got {args.head_warmup_lr}")
    if args.max_seq_length < 3:
        raise RunError(f"--max_seq_length must be at least 3 ([CLS] + a token + [SEP]), got {args.max_seq_length}")
    for fraction in args.save_widths or ():
        if not 0 < fraction < 1:
            raise RunError(f"--save_widths takes fractions of the teacher's hidden width between 0 and 1 (e.g. 0.75 0.5), "
                           f"got {fraction:g}")
    if args.kd_temperature <= 0 or not 0 <= args.kd_alpha <= 1:
        raise RunError(f"--kd_temperature must be positive and --kd_alpha in [0, 1], got {args.kd_temperature:g} and "
                       f"{args.kd_alpha:g}")
    check_compensate(args.compensate)
    if args.calibration_batches < 1:
        raise RunError(f"--calibration_batches must be at least 1, got {args.calibration_batches}")


def check_backend(name: str, source: str = "--backend") -> None:
    """A backend asked for by name runs as it is (no fallback): one that cannot load here is refused, not replaced.
    `source` names where the choice came from (the flag or the WID_BACKEND variable)."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return
    given = f"--backend {name}" if source == "--backend" else f"{source}={name}"
    status = wid_kernels.available_backends()
    if name not in status:
        raise RunError(f"unknown backend in {given}; choose one of auto, {', '.join(status)}")
    if status[name] is not None:
        raise RunError(f"{given} is unavailable here ({status[name]}); use --backend auto (per op, checked, with "
                       "fallback) or one that `wid info` lists as available")


def check_reporting(training_args: TrainingArguments) -> None:
    """Build the --report_to integrations' callbacks once, before any loading: one that is not installed (or not known)
    is then one line, not a traceback after the teacher has loaded."""
    from transformers.integrations import get_reporting_integration_callbacks

    try:
        for callback in get_reporting_integration_callbacks(training_args.report_to):
            callback()
    except (RuntimeError, ImportError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise RunError(f"--report_to {' '.join(training_args.report_to)}: {reason} (or pass --report_to none)") from None


def check_launch(training_args: TrainingArguments) -> None:
    """Refuse a multi-process launch the Trainer does not run distributed (torchrun on CPUs without --use_cpu): every
    process would act as the only one, so they would fight over the output folder and one would write an empty student."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and training_args.world_size != launched:
        raise RunError(f"{launched} processes were launched (torchrun/accelerate), but the Trainer runs "
                       f"{training_args.world_size} (not distributed); on CPUs pass --use_cpu true --ddp_backend gloo")


def wid_config_from(args: DistillArguments, dims: TeacherDims, default_preset: str | None = None) -> WIDConfig:
    preset = args.preset
    if preset is None and args.target_hidden is None:
        preset = default_preset or "half"
    return WIDConfig(
        target_hidden=args.target_hidden,
        target_intermediate=args.target_intermediate,
        target_heads=args.target_heads,
        preset=preset,
        strategy=args.strategy,
        alignment=args.alignment,
        criterion=args.criterion,
        update_rule=args.update_rule,
        bias_correction=args.bias_correction,
        schedule_rounding=args.schedule_rounding,
        w_step=args.w_step or 500,
        penalty=args.penalty,
        hidden_updates=args.hidden_updates,
        attention_updates=args.attention_updates,
        intermediate_updates=args.intermediate_updates,
        mlm_updates=args.mlm_updates,
        updates_per_head=args.updates_per_head,
        teacher_lr=args.teacher_lr,
        compactor_lr=args.compactor_lr,
    ).for_teacher(dims)


def _trainer_args(base: TrainingArguments, **changes) -> TrainingArguments:
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    values.update(changes)
    return TrainingArguments(**{k: v for k, v in values.items() if not k.startswith("_")})


def _encoder_parameters(model) -> int:
    prefix = base_prefix(model) + "."
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith(prefix) and "compactor" not in name)


def check_save_widths(fractions, config: WIDConfig, dims: TeacherDims) -> None:
    """Refuse --save_widths fractions that are never reached, or that the schedule passes at the same mask update (its
    hidden width moves in steps: whole heads with --strategy head), which would write one student under two names."""
    first_at = {}
    widths = [kept_widths(config, dims, update).hidden for update in range(config.mask_updates_to_target(dims) + 1)]
    for fraction in sorted(set(fractions), reverse=True):
        if fraction * dims.hidden < config.target_hidden:
            lowest = math.ceil(config.target_hidden / dims.hidden * 1000) / 1000
            raise RunError(f"--save_widths {fraction:g} is below the student's width ({config.target_hidden} of "
                           f"{dims.hidden}), so it is never reached; pass fractions of at least {lowest:g} and below 1")
        width = next(width for width in widths if width <= fraction * dims.hidden)
        if width in first_at:
            steps = ", ".join(str(w) for w in sorted(set(widths), reverse=True))
            raise RunError(f"--save_widths {first_at[width]:g} and {fraction:g} are both first passed at hidden width {width} "
                           f"(the schedule's hidden widths are {steps} of {dims.hidden}), so they would be the same student; "
                           "keep one of them")
        first_at[width] = fraction


def _has_checkpoints(folder: Path) -> bool:
    """Whether the run saved any checkpoint in `folder`; an empty one (--save_strategy no) is removed."""
    if any(folder.glob("checkpoint-*")):
        return True
    with contextlib.suppress(OSError):
        folder.rmdir()  # only when empty: TensorBoard logs (checkpoints/runs) stay
    return False


def _count(parameters: int) -> str:
    """A parameter count in M (in k below 0.1 M, where two decimals of M would read 0.00)."""
    return f"{parameters / 1e6:.2f} M" if parameters >= 100_000 else f"{parameters / 1e3:.1f} k"


def sequences_per_step(training_args) -> int:
    """Sequences per optimizer step: per-device batch × accumulation × processes."""
    return training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * training_args.world_size


def _last_loss(trainer, key: str = "loss") -> float | None:
    losses = [entry[key] for entry in trainer.state.log_history if key in entry]
    return float(losses[-1]) if losses else None


def warm_up_head(model, dataset, tokenizer, args: TrainingArguments, steps: int, lr: float, output_dir: Path,
                 cache_key: str | None = None):
    """Train only the MLM head (transform + decoder bias; encoder and tied decoder frozen): (final loss, source).

    A finished warm-up is kept in the user's cache (wid.mlm_head.cache_dir) under `cache_key`, which names the
    teacher's weights, the corpus and the settings, and is reused only on an exact match; only the head's own
    tensors are stored, so a cached head can never replace a teacher's encoder."""
    from .mlm_head import cache_dir, head_parameters, read_head, load_head_state, save_head

    cached = cache_dir() / "heads" / f"{cache_key}.safetensors" if cache_key else None
    found = read_head(cached, cache_key) if cached else None
    if found is not None:
        load_head_state(model, found[0])
        return found[1].get("final_loss"), f"warmed up {steps} steps (cached: {cached})"
    trainable = {id(p) for p in head_parameters(model)}
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)
    warm_args = _trainer_args(args, output_dir=str(output_dir / "head-warmup.run"), max_steps=steps, learning_rate=lr,
                              save_strategy="no", remove_unused_columns=False, resume_from_checkpoint=None,
                              warmup_steps=0, lr_scheduler_type="linear", weight_decay=0.0)
    trainer = MaskedLMTrainer(model=model, args=warm_args, train_dataset=dataset, data_collator=default_data_collator,
                              processing_class=tokenizer)
    trainer.train()
    for made in (Path(warm_args.output_dir), output_dir):  # the Trainer makes them; nothing is saved there
        with contextlib.suppress(OSError):
            made.rmdir()  # only when empty
    for param in model.parameters():
        param.requires_grad_(True)
    loss = _last_loss(trainer)
    if cached and trainer.is_world_process_zero():
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            save_head(model, tmp, cache_key, dict(steps=steps, lr=lr, final_loss=loss))
            tmp.replace(cached)
        except OSError:  # a read-only cache only costs the next run the warm-up
            pass
    return loss, f"warmed up {steps} steps"


@torch.no_grad()
def heldout_loss(model, dataset, collator, batch_size: int = 16, max_batches: int = 8) -> float | None:
    """Mean masked-LM loss on held-out sequences (fixed masking seed, so comparable across models). The MLM
    head runs on the masked positions only: the vocabulary projection is most of the work at every other one."""
    if dataset is None or len(dataset) == 0:
        return None
    model.eval()
    device = next(model.parameters()).device
    state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    total, count = 0.0, 0
    try:
        for start in range(0, min(len(dataset), batch_size * max_batches), batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden = base_model(model)(**model_inputs(model, batch)).last_hidden_state
            masked = batch["labels"] != -100
            logits = head_logits(model, hidden[masked])
            total += float(torch.nn.functional.cross_entropy(logits.float(), batch["labels"][masked], reduction="sum"))
            count += int(masked.sum())
    finally:
        torch.random.set_rng_state(state)
    return total / max(count, 1)


@torch.no_grad()
def representation_spread(model, dataset, count: int = 64, batch_size: int = 16) -> float | None:
    """How much the encoder's output varies across inputs: the mean over channels of the standard deviation,
    across `count` sequences, of the mean-pooled last hidden state. About 0 when a model maps every input to
    the same representation, a collapse that the MLM loss alone does not reveal (benchmarks/QUALITY.md)."""
    if dataset is None or len(dataset) < 2:
        return None
    model.eval()
    encoder = base_model(model)
    device = next(model.parameters()).device
    pooled = []
    for start in range(0, min(len(dataset), count), batch_size):
        batch = default_data_collator([dataset[i] for i in range(start, min(start + batch_size, count, len(dataset)))])
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch.get("attention_mask", torch.ones_like(input_ids)).to(device)
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
        weights = attention_mask.unsqueeze(-1).float()
        pooled.append((hidden * weights).sum(1) / weights.sum(1).clamp_min(1))
    return float(torch.cat(pooled).std(dim=0).mean())


def run_distillation(args: DistillArguments, training_args: TrainingArguments, callbacks=()) -> dict:
    """The whole run; returns the summary (also written to output_dir/wid_summary.json).

    Everything that can be checked without loading weights is checked first; the output folder is then locked
    for the run (run_folder.RunFolder) and cleaned up if the run fails or is interrupted."""
    from .data import resolve_corpus
    from .teachers import default_teacher_path

    started = time.time()
    if not torch.cuda.is_available() or training_args.use_cpu:
        flush_denormals()  # before any torch work spawns the CPU thread pool
    check_numeric_arguments(args, training_args)
    check_launch(training_args)
    source = "--backend" if args.backend else "WID_BACKEND"
    args.backend = args.backend or os.environ.get("WID_BACKEND") or "auto"  # the flag, else the variable, as wid info
    check_backend(args.backend, source)
    check_reporting(training_args)
    if args.method not in METHODS:
        raise RunError(f"unknown --method {args.method}; choose one of {', '.join(METHODS)}")
    if args.save_widths and args.method != "wid":
        raise RunError("--save_widths needs --method wid (the baselines start at the student's widths)")
    teacher_name = args.teacher or default_teacher_path()
    teacher = teacher_config(encoder_folder(teacher_name))
    dims = TeacherDims.from_config(teacher)
    positions = max_positions(teacher)
    if positions is not None and args.max_seq_length > positions:
        raise RunError(f"--max_seq_length {args.max_seq_length} is beyond the teacher's {positions} position embeddings; "
                       f"pass --max_seq_length {positions} or less")
    config = wid_config_from(args, dims)
    check_save_widths(args.save_widths or (), config, dims)
    resolve_corpus(args.corpus)
    if training_args.resume_from_checkpoint:
        training_args = _trainer_args(training_args, resume_from_checkpoint=resume_checkpoint(training_args.resume_from_checkpoint))
    output_dir = Path(training_args.output_dir)
    if Path(teacher_name).is_dir() and output_dir.resolve() in (Path(teacher_name).resolve(),
                                                                 Path(encoder_folder(teacher_name)).resolve()):
        raise RunError(f"--output_dir {output_dir} is the teacher's folder: the student would replace the teacher; choose "
                       "another --output_dir")
    folder = RunFolder(output_dir, args.overwrite_output_dir, bool(training_args.resume_from_checkpoint),
                       main_process=training_args.process_index == 0)
    try:
        with folder:
            return _run(args, training_args, teacher_name, dims, config, callbacks, folder.notices, started)
    except KeyboardInterrupt:
        last = last_complete_checkpoint(output_dir / "checkpoints")
        how = (f"resume with the same command plus --resume_from_checkpoint {last}" if last else
               "no checkpoint was saved yet: run the same command again")
        raise RunInterrupted(f"interrupted; {how}") from None


def _run(args, training_args, teacher_name, dims: TeacherDims, config: WIDConfig, callbacks, notices: list, started: float) -> dict:
    """The run inside its locked output folder: teacher → data → (head warm-up) → WID or a baseline → student."""
    from .data import build_mlm_dataset, corpus_fingerprint, mlm_collator, resolve_corpus
    from .mlm_head import load_shipped_head, teacher_fingerprint, warmup_key
    from .teachers import DEFAULT_TEACHER_NAME

    output_dir = Path(training_args.output_dir)
    backend = wid_kernels.set_backend(args.backend)
    encoder_dir = encoder_folder(teacher_name)  # a sentence-transformers folder may keep it in 0_Transformer/
    model, tokenizer, has_head = load_teacher(encoder_dir)
    sentence_notice = sentence_gap(teacher_name)
    if sentence_notice:
        notices.append(sentence_notice)
    teacher_params = _encoder_parameters(model)

    dataset = build_mlm_dataset(tokenizer, args.corpus, seq_len=args.max_seq_length)
    heldout = build_mlm_dataset(tokenizer, None, seq_len=args.max_seq_length, heldout=True) if args.corpus is None else None
    collator = mlm_collator(tokenizer)
    if training_args.max_steps <= 0:  # epochs given: WID's schedule is in steps, so convert
        steps = math.ceil(len(dataset) / sequences_per_step(training_args)) * training_args.num_train_epochs
        training_args = _trainer_args(training_args, max_steps=max(1, int(steps)))
    recipe = None
    resumed = (read_run_record(training_args.resume_from_checkpoint) or {}) if training_args.resume_from_checkpoint else {}
    if args.method == "wid":
        saved_w_step = (resumed.get("wid_config") or {}).get("w_step")
        if args.w_step is None and saved_w_step:  # a resume with a larger --max_steps keeps the run's mask updates
            config = dataclasses.replace(config, w_step=saved_w_step)
        w_step, notice = fit_w_step(config, dims, training_args.max_steps)
        config = dataclasses.replace(config, w_step=w_step)
        if notice:
            notices.append(notice)
            print(f"[wid] {notice}")
        recipe, why = choose_recipe(args.recipe, config, dims, training_args.max_steps)
        started_with = resumed.get("recipe") if args.recipe == "auto" else None
        if started_with in RECIPES[1:] and started_with != recipe:  # a resume with other --max_steps keeps its run's recipe
            recipe, why = started_with, f"the resumed run's; --recipe auto alone would take {recipe} for {training_args.max_steps} steps"
    if training_args.max_grad_norm == CLIP_BY_RECIPE:
        training_args = _trainer_args(training_args, max_grad_norm=RECIPE_CLIPPING[recipe])
    if recipe is not None:
        print(f"[wid] recipe {recipe} ({why}): masked entries shrink to 0 by the last step "
              f"{'on' if recipe == 'short' else 'off'}, gradient clipping {training_args.max_grad_norm or 'off'}")
    record = dict(method=args.method, recipe=recipe, teacher=recorded_path(teacher_name),
                  teacher_fingerprint=teacher_fingerprint(encoder_dir), wid_config=config.to_dict(),
                  corpus=recorded_corpus(args.corpus), corpus_fingerprint=corpus_fingerprint(args.corpus),
                  max_seq_length=args.max_seq_length,
                  train_batch_size=sequences_per_step(training_args))
    if training_args.resume_from_checkpoint:
        check_resume_settings(training_args.resume_from_checkpoint, record)
        check_resume_step(training_args.resume_from_checkpoint, training_args.max_steps, output_dir)
    checkpoints = output_dir / "checkpoints"

    head_source = "the teacher's own"
    if not has_head:
        shipped = load_shipped_head(model, encoder_dir, DEFAULT_TEACHER_NAME)
        if shipped is not None:
            has_head = True
            head_source = (f"shipped with wid (wid/heads/{DEFAULT_TEACHER_NAME}.safetensors; held-out MLM loss "
                           f"{shipped['heldout_mlm_loss']:.2f})")
        else:
            head_source = "new (identity transform, tied decoder)"
    warmup_steps = args.head_warmup_steps if args.head_warmup_steps is not None else (0 if has_head else max(10, training_args.max_steps // 5))
    warmup_loss = None
    if warmup_steps > 0:
        key = warmup_key(encoder_dir, resolve_corpus(args.corpus), dict(
            steps=warmup_steps, lr=args.head_warmup_lr, seed=training_args.seed, seq_len=args.max_seq_length,
            batch=sequences_per_step(training_args),
            head=head_source))
        warmup_loss, how = warm_up_head(model, dataset, tokenizer, training_args, warmup_steps, args.head_warmup_lr, checkpoints, key)
        head_source = f"{head_source}, {how}"
    teacher_heldout = heldout_loss(model, heldout, collator)
    probe = heldout if heldout is not None else dataset
    teacher_spread = representation_spread(model, probe)

    if args.method == "wid":
        trained = _train_wid(model, config, dims, dataset, tokenizer, training_args, args, output_dir, notices, callbacks, record,
                             recipe, heldout)
    else:
        trained = _train_baseline(model, config, dataset, tokenizer, training_args, args, output_dir, callbacks, record)
    student, trainer = trained["student"], trained["trainer"]
    training_device = training_args.device if trainer is not None else torch.device("cpu")
    spread = representation_spread(student, probe)
    relative_spread = spread / teacher_spread if spread is not None and teacher_spread else None
    if relative_spread is not None and relative_spread < 0.05:
        notices.append(f"the student's output barely varies across inputs ({relative_spread:.2%} of the teacher's spread): it has "
                       "collapsed to a near-constant representation; use --recipe short with gradient clipping (its default), a lower "
                       "--teacher_lr, or train longer (see benchmarks/QUALITY.md)")
    summary = {
        "teacher": str(teacher_name),
        "student_dir": str(output_dir),
        # prune trains nothing and --save_strategy no saves nothing: no folder of checkpoints to name
        "checkpoints_dir": str(checkpoints) if _has_checkpoints(checkpoints) else None,
        "backend": backend,
        "backends_in_use": {op: name for op, (name, _) in wid_kernels.backends_in_use(training_device).items()},
        "teacher_encoder_parameters": teacher_params,
        "student_encoder_parameters": _encoder_parameters(student),
        "teacher_widths": {"hidden": dims.hidden, "heads": dims.heads, "intermediate": dims.intermediate, "layers": dims.layers},
        "student_widths": {"hidden": student.config.hidden_size, "heads": student.config.num_attention_heads,
                           "intermediate": intermediate_size(student.config), "layers": student.config.num_hidden_layers},
        "method": args.method,
        "wid_config": config.to_dict(),
        "steps": trainer.state.global_step if trainer is not None else 0,
        "head_warmup_steps": warmup_steps,
        "head_warmup_final_loss": warmup_loss,
        "teacher_mlm_head": head_source,
        # kd trains on (1-α)·MLM + α·T²·KL: its MLM part is what compares with the other methods
        "final_mlm_loss": _last_loss(trainer, "mlm_loss" if args.method == "kd" else "loss") if trainer is not None else None,
        "final_training_objective": _last_loss(trainer) if trainer is not None else None,
        "teacher_heldout_mlm_loss": teacher_heldout,
        "student_heldout_mlm_loss": heldout_loss(student, heldout, collator),
        "representation_spread_vs_teacher": relative_spread,
        "schedule_reached_target_at_step": trained.get("target_step"),
        "masked_entry_norm_before_fold": trained.get("masked_norm"),
        "masked_compactor_fraction_at_cut": trained.get("masked_fraction"),
        "compactor_lr_after_target": trained.get("lr_after_target"),
        "recipe": recipe,
        "update_rule": config.update_rule,
        "bias_correction": config.bias_correction,
        "max_grad_norm": training_args.max_grad_norm,
        "max_logit_difference_fold": trained.get("difference"),
        "max_logit_difference_to_trained": trained.get("to_trained"),
        "compensate": args.compensate if args.method == "wid" else None,
        "compensation": trained.get("compensation"),
        "intermediate_students": trained.get("student_dirs", {}),
        "notices": notices,
        "seconds": round(time.time() - started, 1),
    }
    if trainer is None or trainer.is_world_process_zero():
        save_student(student, output_dir, tokenizer, summary, sentence_teacher=teacher_name)
    return summary


def _main_phase_args(training_args, config: WIDConfig, output_dir: Path) -> TrainingArguments:
    """The Trainer settings of the main phase, the same for WID and the baselines (a fair budget)."""
    return _trainer_args(training_args, output_dir=str(output_dir / "checkpoints"),
                         warmup_steps=warmup_steps_for(config, training_args.max_steps), lr_scheduler_type="linear",
                         logging_nan_inf_filter=False, remove_unused_columns=False)


def _train_wid(model, config, dims, dataset, tokenizer, training_args, args, output_dir, notices, callbacks, record,
               recipe: str, heldout=None) -> dict:
    """Attach compactors, train with the WID schedule (w_step already fitted to the run), fold: the method itself.
    The short recipe also shrinks the masked entries to exactly 0 by the last step (training.shrink_factor);
    --compensate on folds what they still carry into the kept channels (wid.compensate)."""
    notice = None if recipe == "short" else penalty_budget_notice(config, dims, training_args.max_steps)
    if notice:
        notices.append(notice)
        print(f"[wid] {notice}")
    model = attach(model, config)
    if getattr(base_model(model), "pooler", None) is not None:
        base_model(model).pooler.requires_grad_(False)  # not part of WID training; kept for export (and DDP needs every trained param used)
    trainer = WIDTrainer(model=model, args=_main_phase_args(training_args, config, output_dir), train_dataset=dataset,
                         data_collator=default_data_collator, processing_class=tokenizer, run_record=record)
    student_dirs = {}

    def write_width(fraction, snapshot):
        path = output_dir / f"student-{round(fraction * 100)}pct"
        try:
            student = fold(snapshot, progressbar=False)
        except FoldError as error:
            notices.append(f"--save_widths {fraction:g}: not written ({error})")
            return
        widths = {"hidden": student.config.hidden_size, "heads": student.config.num_attention_heads,
                  "intermediate": intermediate_size(student.config), "layers": student.config.num_hidden_layers}
        save_student(student, path, tokenizer, {"hidden_fraction": fraction, "step": trainer.state.global_step,
                                                "teacher": record["teacher"], "student_widths": widths,
                                                "note": "cut at this mask update from the model in training (the hidden "
                                                        "width is the fraction's; the FFN is as far as its own schedule got)"},
                     sentence_teacher=record["teacher"])
        student_dirs[fraction] = str(path)

    shrink_until = training_args.max_steps if recipe == "short" else None
    schedule = WIDScheduleCallback(trainer, args.save_widths or (), write_width, shrink_until)
    trainer.add_callback(schedule)
    for callback in callbacks:
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    for fraction in schedule.saved - set(student_dirs):  # passed before a resume: written by the run that stopped
        path = output_dir / f"student-{round(fraction * 100)}pct"
        if (path / "config.json").is_file():
            student_dirs[fraction] = str(path)
        else:
            notices.append(f"--save_widths {fraction:g}: passed before the resume, but {path} is gone; it cannot be written again")

    model = trained_model(trainer)
    cut_at_once = not at_target(model)
    left = masked_compactor_fraction(model)
    lr_after_target = compactor_lr_after(config, training_args.max_steps, config.steps_to_target(dims))
    print(f"[wid] at the cut: masked compactor entries hold {left:.3g} of their initial size; cumulative compactor lr "
          f"after the target {lr_after_target:.3g}")
    if left > 0.1:
        notices.append(f"the masked compactor entries still held {left:.0%} of their initial size at the cut (masked-entry norm "
                       f"{masked_entry_norm(model):.3g}, cumulative compactor lr after the target {lr_after_target:.3g}): "
                       "the student lost what they carried; train longer after the target")
    calibration = calibration_source(dataset, args.calibration_batches, heldout) if args.compensate == "on" else None
    student, masked_norm, difference, compensation, to_trained = fold_trained(model, calibration)
    if cut_at_once:
        notices.append(f"the schedule had not reached the target when training stopped: the remaining channels were cut at "
                       f"once (student vs the model as trained: logits max diff {to_trained:.3g})")
    if compensation is not None:
        compensation.update(corpus=recorded_corpus(args.corpus), corpus_fingerprint=record.get("corpus_fingerprint"),
                            max_seq_length=args.max_seq_length, calibration_batches=args.calibration_batches)
        if compensation["applied"]:
            print(f"[wid] {compensation_line(compensation)}")
    target_step = config.steps_to_target(dims)
    return dict(student=student, trainer=trainer, masked_norm=masked_norm, difference=difference, compensation=compensation,
                to_trained=to_trained,
                target_step=target_step if target_step <= training_args.max_steps else None, student_dirs=student_dirs, masked_fraction=left,
                lr_after_target=lr_after_target)


def _train_baseline(model, config, dataset, tokenizer, training_args, args, output_dir, callbacks, record) -> dict:
    """A baseline of the same student shape and budget (wid/baselines.py)."""
    if getattr(base_model(model), "pooler", None) is not None:
        base_model(model).pooler.requires_grad_(False)  # as in WID: unused by MLM training
    student, trainer = train_baseline(args.method, model, config, dataset, tokenizer,
                                      _main_phase_args(training_args, config, output_dir), args.kd_temperature,
                                      args.kd_alpha, resume=training_args.resume_from_checkpoint, callbacks=callbacks,
                                      run_record=record)
    return dict(student=student, trainer=trainer)


def compensation_line(compensation: dict) -> str:
    line = (f"compensated cut: {compensation['linears_compensated']} linears on {compensation['calibration_tokens']} calibration "
            "tokens; ")
    if compensation.get("kl_to_trained_compensated") is None:
        return line + "KL to the trained model not measured (every sequence of the corpus went into the calibration)"
    return line + (f"KL to the trained model on {compensation.get('kl_evaluation_sequences', '?')} other sequences "
                   f"{compensation['kl_to_trained_plain_cut']:.4g} (plain cut) → {compensation['kl_to_trained_compensated']:.4g} "
                   "nats/token")


def format_summary(summary: dict) -> str:
    t, s = summary["teacher_widths"], summary["student_widths"]
    method = summary.get("method", "wid")

    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    lines = [
        "WID distillation finished" if method == "wid" else f"baseline '{method}' finished (same student shape and budget as WID)",
        f"  teacher   {summary['teacher']}",
        f"  widths    hidden {t['hidden']} → {s['hidden']}, heads {t['heads']} → {s['heads']} × {s['hidden'] // s['heads']}, "
        f"FFN {t['intermediate']} → {s['intermediate']}, layers {s['layers']}",
        f"  params    encoder {_count(summary['teacher_encoder_parameters'])} → {_count(summary['student_encoder_parameters'])}",
        f"  steps     {summary['steps']} {'WID' if method == 'wid' else method} steps (+{summary['head_warmup_steps']} head warm-up)"
        + (("; masks at target from step {}".format(summary["schedule_reached_target_at_step"])
            if summary["schedule_reached_target_at_step"] is not None else "; masks never reached the target (cut at once)")
           if method == "wid" else "")
        + (f"; recipe {summary['recipe']}" if summary.get("recipe") else ""),
        f"  MLM head  {summary.get('teacher_mlm_head', 'n/a')}",
        f"  MLM loss  final training {fmt(summary['final_mlm_loss'])}"
        + (f" (objective with the KD term {fmt(summary.get('final_training_objective'))})" if method == "kd" else "")
        + f"; held-out teacher {fmt(summary['teacher_heldout_mlm_loss'])} vs student {fmt(summary['student_heldout_mlm_loss'])}",
        f"  spread    the student's outputs vary across inputs {fmt(summary.get('representation_spread_vs_teacher'))}× as much as "
        "the teacher's (≈0: collapsed)",
    ]
    if summary.get("masked_compactor_fraction_at_cut") is not None:
        lines.append(f"  penalty   masked compactor entries at the cut {summary['masked_compactor_fraction_at_cut']:.3g} of their "
                     f"initial size; cumulative compactor lr after the target {summary['compactor_lr_after_target']:.3g}")
    compensation = summary.get("compensation")
    if compensation and compensation.get("applied"):
        lines.append(f"  {compensation_line(compensation)}")
    if summary["max_logit_difference_fold"] is not None:
        against = compensation["fold_check_against"] if compensation else "the compactor model"
        lines.append(f"  fold      masked-entry norm {summary['masked_entry_norm_before_fold']:.3g}; folded vs {against}: logits "
                     f"max diff {summary['max_logit_difference_fold']:.2e}"
                     + (f" ({compensation['reason']})" if compensation and not compensation.get("applied") else ""))
        if summary.get("max_logit_difference_to_trained") is not None:
            lines.append(f"  cut       student vs the model as trained: logits max diff {summary['max_logit_difference_to_trained']:.2e} "
                         "(what the cut cost; ≈0: exact)")
    lines += [
        f"  student   {summary['student_dir']}  (AutoModelForMaskedLM.from_pretrained / AutoModel)",
    ]
    if summary["checkpoints_dir"] is not None:
        lines.append(f"  checkpoints {summary['checkpoints_dir']}")
    for fraction, path in summary["intermediate_students"].items():
        lines.append(f"  student at {fraction:.0%} width: {path}")
    lines += [f"  note: {n}" for n in summary["notices"]]
    ops = summary.get("backends_in_use") or {}
    lines.append(f"  time      {summary['seconds']:.0f} s, backend {summary['backend']}"
                 + (" (" + ", ".join(f"{op} {name}" for op, name in ops.items()) + ")" if ops else ""))
    return "\n".join(lines)
