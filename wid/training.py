"""The WID distillation run on `transformers.Trainer` (WID_METHOD §5, §7).

`MaskedLMTrainer` computes the masked-LM loss with the vocabulary projection run only at the
masked positions (15% of tokens): a forward pre-hook on the MLM head selects them, so the call
still goes through the (possibly DDP/FSDP-wrapped) model. `WIDTrainer` adds the WID optimizer
and learning-rate schedule, and `WIDScheduleCallback` runs the mask updates every `w_step`
steps, logs the kept widths and the norm of the masked entries, writes intermediate students
(`save_widths`), and stops a run whose loss is not finite, naming the last good checkpoint.
Mixed precision, gradient accumulation, many GPUs, logging and resuming come from the Trainer.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

from .architecture import head_input
from .compactors import unwrap, wid_state
from .data import mask_tokens
from .masks import (KeptWidths, apply_widths, current_widths, masked_entry_norm, masked_parameters, scale_masked_entries,
                    update_masks, zero_masked_entries)


def flush_denormals() -> None:
    """Treat denormal floats as zero on the CPU.

    Adam's second moments of rarely-hit rows (embeddings, masked compactor entries) sink into
    denormals, which x86 CPUs compute ~50x slower: measured 11 s vs 0.2 s per MiniLM optimizer step.
    The flag is per thread and CPU worker threads inherit it when they are created, so call this
    before the first parallel torch op of the process (the run does; the trainer calls it too).
    """
    torch.set_flush_denormal(True)
    try:
        from wid_kernels import _C

        _C.flush_denormals_all_threads()  # also the worker threads that already exist
    except (ImportError, AttributeError):
        pass


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


def masked_rows(positions: torch.Tensor) -> torch.Tensor:
    """Flat row indices (into batch × sequence) of the True entries of a bool mask of masked positions.

    How many there are is data-dependent, so on a GPU this is the training step's one host sync (the MLM head's
    input has that many rows). The trainer computes it once per step and the MLM head, the labels and the kd
    teacher's head all take these rows (boolean indexing would sync once for each).
    """
    return positions.reshape(-1).nonzero().squeeze(1)


class MaskedPositionSelector:
    """While `positions` is set, the MLM head only sees the hidden states at those positions: a bool mask over batch
    × sequence, or the row indices `masked_rows` makes of one."""

    def __init__(self, head: torch.nn.Module):
        self.positions = None
        head.register_forward_pre_hook(self._select)

    def _select(self, module, args):
        if self.positions is None:
            return None
        rows = masked_rows(self.positions) if self.positions.dtype == torch.bool else self.positions
        hidden = args[0]
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows),) + tuple(args[1:])


def trained_model(trainer):
    """The trainer's model after training, on the CPU in fp32, without the autocast wrapper that mixed precision
    (--bf16/--fp16) put on its forward: checks and metrics after training must run in fp32 like the student's."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(trainer.model, keep_fp32_wrapper=False).to("cpu").float()


class LogLastStep(TrainerCallback):
    """Log at the last step too, so that a run shorter than `logging_steps` (or not a multiple of it) still reports
    its final loss (the summary's `final_mlm_loss` reads the logged losses)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            control.should_log = True
        return control


class MaskedLMTrainer(Trainer):
    """Trainer whose loss is the masked-LM cross-entropy computed at the masked positions only.

    Its checkpoints are safe to resume from: each is written to a staging folder and renamed into place (a kill
    never leaves a half one), only when every weight is finite, with `run_record` (what produced it) beside it;
    loading a damaged one, or a loss that turns NaN, ends in one line naming the last good checkpoint; a resume
    takes the learning rates and optimizer settings given now, not the checkpoint's."""

    def __init__(self, *args, run_record: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(LogLastStep())
        self.selector = MaskedPositionSelector(head_input(unwrap(self.model)))
        self.model_accepts_loss_kwargs = False  # mean loss per micro-batch; the Trainer scales for accumulation
        self.run_record = run_record
        self.saved_checkpoints: list[tuple[int, Path]] = []  # (step, folder) written by this run, oldest first
        self.resumed_from: str | None = None
        self._first_bad = None  # on the loss's device: (step, loss) of the first non-finite loss, step -1 if none
        if self.args.device.type == "cpu":
            flush_denormals()

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self.resumed_from = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        self._first_bad = None
        result = super().train(resume_from_checkpoint, *args, **kwargs)
        self.check_finite_losses()
        return result

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        special_tokens_mask = inputs.pop("special_tokens_mask", None)
        if "labels" not in inputs:  # dynamic masking here, after the Trainer has restored RNG state
            tokenizer = self.processing_class
            inputs["input_ids"], inputs["labels"] = mask_tokens(
                inputs["input_ids"], special_tokens_mask, tokenizer.mask_token_id, len(tokenizer)
            )
        labels = inputs.pop("labels")
        rows = masked_rows(labels != -100)
        self.selector.positions = rows
        try:
            outputs = model(**inputs)
        finally:
            self.selector.positions = None
        loss = self.masked_loss(outputs.logits, labels.reshape(-1).index_select(0, rows), inputs, rows)
        return (loss, outputs) if return_outputs else loss

    def masked_loss(self, logits, targets, inputs, rows):
        """Mean cross-entropy over the masked positions (`logits` holds only those rows; `rows` are their indices)."""
        summed = F.cross_entropy(logits.float(), targets, reduction="sum")
        return summed / max(rows.numel(), 1)  # a batch without masked tokens gives 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The step, with the first non-finite loss recorded on the device: reading it every step would stop a GPU
        once per step (a host sync); it is read where the Trainer syncs anyway (`check_finite_losses`)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        detached = loss.detach().float().reshape(())
        if self._first_bad is None or self._first_bad[0].device != detached.device:
            self._first_bad = (torch.full((), -1, dtype=torch.long, device=detached.device), torch.zeros((), device=detached.device))
        step, value = self._first_bad
        new = ~torch.isfinite(detached) & (step < 0)
        step.copy_(torch.where(new, self.state.global_step, step))
        value.copy_(torch.where(new, detached, value))
        return loss

    def check_finite_losses(self) -> None:
        """Raise TrainingDivergedError if a step's loss was NaN or infinite (one host sync): before every log line,
        checkpoint and mask update, and at the end of training, so nothing is logged, saved or pruned from weights
        that gave such a loss. The error names the step and the newest checkpoint saved before it."""
        if self._first_bad is None:
            return
        step = int(self._first_bad[0])
        if step >= 0:
            loss = float(self._first_bad[1])
            self._first_bad = None
            raise TrainingDivergedError(self._divergence_message(loss, step))

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        if self.control.should_log or self.control.should_save or self.control.should_evaluate:
            self.check_finite_losses()
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    def last_good_checkpoint(self, before_step: int | None = None) -> str | None:
        """The newest checkpoint of this run (or the one it resumed from) saved before `before_step`."""
        good = [str(path) for step, path in self.saved_checkpoints if before_step is None or step < before_step]
        return good[-1] if good else self.resumed_from

    def _divergence_message(self, loss: float, step: int | None = None) -> str:
        """The loss was computed from the weights after `global_step` steps, so a checkpoint of that step (or later)
        holds weights that give it: it is renamed `diverged-checkpoint-N` (never resumed from by accident)."""
        step = self.state.global_step if step is None else step
        for saved_step, path in self.saved_checkpoints:
            if saved_step >= step and path.is_dir() and self.is_world_process_zero():
                path.rename(path.with_name(f"diverged-{path.name}"))
        last = self.last_good_checkpoint(before_step=step)
        where = f"resume from {last}" if last else "no good checkpoint was saved yet; restart"
        return f"the loss became {loss} at step {step + 1}; {where} with a lower learning rate or fp32"

    # -- checkpoints ----------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import rotate_checkpoints

        from .run_folder import RUN_FILE, STAGING_PREFIX

        step = self.state.global_step
        if not weights_finite(self.model):
            print(f"[wid] step {step}: some weights are NaN or infinite; checkpoint-{step} is not written")
            return
        run_dir = Path(self.args.output_dir)
        staging = run_dir / f"{STAGING_PREFIX}{step}"
        self.args.output_dir = str(staging)  # the Trainer writes every file of the checkpoint there, on every rank
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = str(run_dir)
        written, target = staging / f"checkpoint-{step}", run_dir / f"checkpoint-{step}"
        if self.is_world_process_zero() and self.run_record is not None:
            (written / RUN_FILE).write_text(json.dumps(self.run_record, indent=2, default=str))
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            if target.exists():
                shutil.rmtree(target)
            os.replace(written, target)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()
        self.saved_checkpoints.append((step, target))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        with _damaged_checkpoint(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _issue_warnings_after_load(self, load_result):
        """The Trainer warns about every key a checkpoint lacks; the tied decoder is left out by design (save_pretrained
        drops tied tensors, and here they share the embeddings' storage, which is loaded), so only real gaps are named."""
        from .export import tied_keys

        tied = set(tied_keys(unwrap(self.model)))
        missing = [key for key in load_result.missing_keys if key not in tied]
        if hasattr(load_result, "_replace"):  # torch's _IncompatibleKeys (a named tuple)
            load_result = load_result._replace(missing_keys=missing)
        super()._issue_warnings_after_load(load_result)

    def _load_rng_state(self, checkpoint):
        with _damaged_checkpoint(checkpoint):
            super()._load_rng_state(checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """Load the checkpoint's optimizer moments and schedule position, but keep the learning rates and optimizer
        settings of this run: a resume after a divergence must be able to lower them."""
        if checkpoint is None or self.optimizer is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        wanted = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        with _damaged_checkpoint(checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)
        scheduler = self.lr_scheduler
        changed = []
        for index, (group, fresh) in enumerate(zip(self.optimizer.param_groups, wanted)):
            base = fresh.get("initial_lr", fresh["lr"])
            if group.get("initial_lr", base) != base:
                changed.append(f"group {index} lr {base:g} (checkpoint {group['initial_lr']:g})")
            for key, value in fresh.items():
                if key not in ("lr", "initial_lr") and group.get(key) != value:
                    changed.append(f"group {index} {key} {value} (checkpoint {group.get(key)})")
                    group[key] = value
            group["initial_lr"] = base
        if hasattr(scheduler, "lr_lambdas") and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
            _apply_schedule(scheduler)
        if changed:
            print(f"[wid] resuming from {checkpoint} with this run's optimizer settings: {'; '.join(changed)}")


def with_bias_correction(scheduler, config):
    """A LambdaLR's factors times Adam's bias-correction factor, when `config.bias_correction` asks for it."""
    if config.bias_correction:
        beta1, beta2 = config.adam_betas
        scheduler.lr_lambdas = [
            lambda k, base=base: base(k) * bias_correction_factor(k + 1, beta1, beta2) for base in scheduler.lr_lambdas]
        _apply_schedule(scheduler)
    return scheduler


def _apply_schedule(scheduler) -> None:
    """Set every group's lr from a LambdaLR's base_lrs and lr_lambdas at its current position (after either changed)."""
    for group, factor, base in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, scheduler.base_lrs):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


@contextlib.contextmanager
def _damaged_checkpoint(checkpoint):
    """Turn whatever a truncated or corrupt checkpoint file raises into one line that names what to do."""
    from .run_folder import RunError

    try:
        yield
    except RunError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.load, safetensors and pickle each raise their own kind
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise RunError(f"cannot resume from {checkpoint} ({type(exc).__name__}: {reason}): a file of the checkpoint is "
                       "truncated or corrupt; resume from an earlier checkpoint-N") from None


@torch.no_grad()
def weights_finite(model) -> bool:
    """Whether every parameter is finite (one device sync)."""
    checks = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack([c.to(checks[0].device) for c in checks]).all()) if checks else True


class WIDTrainer(MaskedLMTrainer):
    """MaskedLMTrainer with the WID optimizer (update rule, per-group learning rates, no bias correction)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pending_logs: dict = {}

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            from .optim import build_optimizer

            self.optimizer = build_optimizer(unwrap(self.model))
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The Trainer's schedule, times Adam's bias-correction factor when the WID config asks for it."""
        created = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if created and hasattr(scheduler, "lr_lambdas"):
            with_bias_correction(scheduler, wid_state(unwrap(self.model)).config)
        return scheduler

    def log(self, logs, *args, **kwargs):
        logs.update(self.pending_logs)
        self.pending_logs = {}
        super().log(logs, *args, **kwargs)


def width_logs(model) -> dict:
    widths = current_widths(model)
    return {
        "wid/hidden": widths["hidden"],
        "wid/attention_min": min(widths["attention"]),
        "wid/intermediate_min": min(widths["intermediate"]),
        "wid/mlm": widths["mlm"],
        "wid/masked_norm": masked_entry_norm(model),
        "wid/mask_updates": int(wid_state(model).mask_updates),
    }


def uniform_snapshot(model, widths: KeptWidths):
    """A CPU copy of the model with masks forced to one uniform width and masked entries zeroed."""
    snapshot = copy.deepcopy(unwrap(model)).to("cpu").float()
    apply_widths(snapshot, widths)
    zero_masked_entries(snapshot)
    return snapshot


class WIDScheduleCallback(TrainerCallback):
    """Mask updates every `w_step` steps, their logs, and students at chosen widths along the way."""

    def __init__(self, trainer: WIDTrainer, save_widths=(), on_width=None, shrink_until: int | None = None):
        self.trainer = trainer
        self.shrink_until = shrink_until  # short recipe: masked entries shrink linearly to exactly 0 at this step
        self._masked = None
        self.save_widths = sorted(set(save_widths), reverse=True)  # fractions of the teacher's hidden width
        self.on_width = on_width  # callable(fraction, snapshot_model) that writes a student
        self.saved: set = set()

    def on_train_begin(self, args, state, control, **kwargs):
        # a resumed run has just loaded its checkpoint, possibly without going through load_state_dict
        model = unwrap(self.trainer.model)
        wid_state(model).refresh()
        if wid_state(model).masks_active:  # widths the resumed run had passed: their students were written then
            hidden, dims = current_widths(model)["hidden"], wid_state(model).dims
            self.saved.update(f for f in self.save_widths if hidden <= f * dims.hidden)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        model = unwrap(self.trainer.model)
        config = wid_state(model).config
        if state.global_step % config.w_step == 0:
            self.trainer.check_finite_losses()  # never rank channels by weights that gave a NaN loss
            update_masks(model)
            self.trainer.pending_logs.update(width_logs(model))
            control.should_log = True
            self._maybe_save_widths(model)
        if self.shrink_until is not None and wid_state(model).masks_active:
            if self._masked is None:  # the same parameters for the whole run: walk the modules once
                self._masked = masked_parameters(model)
            scale_masked_entries(model, shrink_factor(state.global_step, self.shrink_until), self._masked)
        return control

    def _maybe_save_widths(self, model):
        if not self.save_widths or self.on_width is None:
            return
        dims = wid_state(model).dims
        widths = current_widths(model)
        for fraction in self.save_widths:
            if fraction in self.saved or widths["hidden"] > fraction * dims.hidden:
                continue
            self.saved.add(fraction)
            uniform = KeptWidths(
                hidden=widths["hidden"], attention=widths["hidden"], intermediate=min(widths["intermediate"]),
                mlm=widths["hidden"] if dims.mlm_follows_hidden else dims.mlm,
            )
            if self.trainer.is_world_process_zero():
                self.on_width(fraction, uniform_snapshot(model, uniform))


def warmup_steps_for(config, steps: int) -> int:
    """The linear warm-up in steps: `warmup_ratio` of the run, rounded up. Passed to the Trainer as an int, which
    means steps on every transformers version (a float `warmup_steps` is a ratio only from transformers 5 on)."""
    return math.ceil(config.warmup_ratio * steps)


def compactor_lr_after(config, steps: int, start: int) -> float:
    """Sum of the compactor learning rate over the optimizer steps after global step `start` (linear warm-up,
    then linear decay to 0 at `steps`: the Trainer's schedule; times Adam's bias-correction factor when the config
    has it). The step that makes global step k runs at lr · λ(k − 1), where λ is transformers' own linear schedule."""
    from transformers import get_linear_schedule_with_warmup

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    factor = get_linear_schedule_with_warmup(dummy, warmup_steps_for(config, steps), steps).lr_lambdas[0]
    corrected = (lambda k: bias_correction_factor(k + 1, *config.adam_betas)) if config.bias_correction else (lambda k: 1.0)
    return config.compactor_lr * sum(factor(k) * corrected(k) for k in range(max(start, 0), steps))


def penalty_lr_needed(config, fraction: float = 0.01, limit: int = 200_000) -> float | None:
    """The cumulative compactor learning rate the update rule needs to shrink a masked compactor entry from 1
    (identity) to `fraction` of it: one entry simulated with the reference step at a constant compactor_lr
    (no loss gradient; masked from its first step). None if it does not get there within `limit` steps."""
    return _simulated_penalty_lr(config.compactor_lr, tuple(config.adam_betas), config.adam_eps, config.weight_decay,
                                 config.penalty, config.update_rule, fraction, limit)


@functools.lru_cache(maxsize=32)
def _simulated_penalty_lr(lr, betas, eps, weight_decay, penalty, update_rule, fraction, limit) -> float | None:
    """penalty_lr_needed's simulation, once per setting (a run asks for it more than once)."""
    from wid_kernels import reference

    p, m, v = (torch.tensor([value], dtype=torch.float64) for value in (1.0, 0.0, 0.0))
    zero, masked = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.bool)
    for step in range(1, limit + 1):
        reference.wid_adamw_step(p, zero, m, v, masked, 0, lr, *betas, eps, weight_decay, penalty, True, True, update_rule)
        if abs(float(p)) <= fraction:
            return step * lr
    return None


def penalty_budget(config, dims, steps: int) -> tuple[float, float | None]:
    """(given, needed): the cumulative compactor learning rate after the last mask increase, and what the update
    rule needs to bring a masked compactor entry to 1% (None: not within the simulation)."""
    return compactor_lr_after(config, steps, config.steps_to_target(dims)), penalty_lr_needed(config)


def penalty_budget_notice(config, dims, steps: int) -> str | None:
    """A warning when the learning rate left after the masks reach their target cannot drive the masked
    compactor entries to ~0 (1% of their initial size), so that the final cut removes channels that still
    carry signal. Stated in cumulative compactor learning rate: what the run gives after the last mask
    increase (`compactor_lr_after`) against what the rule needs (`penalty_lr_needed`)."""
    given, needed = penalty_budget(config, dims, steps)
    if needed is not None and given >= needed:
        return None
    need = "more than the simulation's 200000 steps" if needed is None else f"≈{needed:.3g}"
    return (f"after the last mask increase (step {min(config.steps_to_target(dims), steps)} of {steps}) the run gives a "
            f"cumulative compactor learning rate of {given:.3g}, and the update rule needs {need} to shrink a masked "
            f"compactor entry to 1% of its initial size (one entry simulated at compactor_lr={config.compactor_lr:g}): "
            "the final cut will remove channels that still carry signal; give more --max_steps after the target or a "
            "smaller --w_step")


def bias_correction_factor(step: int, beta1: float, beta2: float) -> float:
    """Adam's bias correction as a learning-rate factor for optimizer step `step` (1-based): √(1 − β2^t) / (1 − β1^t).
    Exact for the update direction; eps and the decoupled weight decay then see the corrected learning rate."""
    return math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)


def shrink_factor(step: int, end: int) -> float:
    """The short recipe's factor for the masked entries after global step `step`: (end − step) / (end − step + 1),
    so that an entry masked at step t0 falls linearly, p·(end − t)/(end − t0), to exactly 0 at step `end`. It works
    beside the update rule's penalty, not through Adam's adaptive step, so it finishes within any budget."""
    left = max(end - step, 0)
    return left / (left + 1)


RECIPES = ("auto", "paper", "short")


def choose_recipe(recipe: str, config, dims, steps: int) -> tuple[str, str]:
    """(recipe, why): `paper` (the authors' schedule alone) or `short` (plus the linear shrink of masked entries
    to 0 by the end of the run). `auto` takes `paper` when the run's learning rate after the last mask increase is
    enough for the penalty to bring masked compactor entries to 1% (penalty_budget_notice), else `short`."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown --recipe {recipe}; choose one of {', '.join(RECIPES)}")
    if recipe != "auto":
        return recipe, "given with --recipe"
    given, needed = penalty_budget(config, dims, steps)
    if needed is not None and given >= needed:
        return "paper", "the run's learning rate after the target lets the penalty finish"
    return "short", (f"chosen by --recipe auto: the cumulative compactor lr after the target, {given:.3g}, is below the "
                     f"{'≈' + format(needed, '.3g') if needed else 'unreachable amount'} the penalty needs")


def fit_w_step(config, dims, steps: int) -> tuple[int, str | None]:
    """A w_step that lets the schedule reach its target by 80% of `steps`, and a notice if it changed."""
    updates = config.mask_updates_to_target(dims)
    if updates == 0 or config.w_step * updates <= 0.8 * steps:
        return config.w_step, None
    fitted = max(1, math.floor(0.8 * steps / updates))
    if fitted * updates <= steps and fitted == config.w_step:  # fits, if not within 80%: nothing to change or say
        return fitted, None
    if fitted * updates > steps:
        return fitted, (
            f"max_steps={steps} is shorter than the schedule's {updates} mask updates: masks are updated every step "
            f"and the remaining channels are cut at once at the end"
        )
    return fitted, (
        f"w_step={config.w_step} × {updates} mask updates = {config.w_step * updates} steps does not fit in max_steps={steps}; "
        f"using w_step={fitted} so the masks reach the target at step {fitted * updates}"
    )
