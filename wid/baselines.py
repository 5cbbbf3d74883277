"""Baselines with the student shape and training budget of a WID run, so WID is compared fairly.

    prune  one-shot `wid.prune` of the teacher with identity compactors, folded; no training. Identity
           compactors score every channel alike and ties keep the lower index, so this is the teacher
           truncated to the student's widths (the first channels of every group, of every head in dim mode).
    mlm    that truncated teacher trained with the masked-LM loss alone (AdamW, `--learning_rate`).
    kd     the same with DistilBERT's teacher-logit distillation added: (1-α)·MLM + α·T²·KL(teacher ‖ student)
           at the masked positions, temperatures T on both sides (Sanh et al., 2019).

All three start after the teacher's head warm-up, like WID, and use the same steps, batch and
learning-rate schedule (1% warm-up, linear decay). The KD teacher runs in eval mode without
gradients; its forward is extra work a WID step does not do.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from transformers import default_data_collator

from .architecture import head_input
from .compactors import attach
from .config import WIDConfig
from .fold import fold
from .masks import prune
from .training import MaskedLMTrainer, MaskedPositionSelector, trained_model

METHODS = ("wid", "kd", "mlm", "prune")


def truncated_student(teacher, config: WIDConfig):
    """The teacher cut to the student's widths (a plain model of the teacher's class); the teacher is left unchanged."""
    model = attach(copy.deepcopy(teacher).to("cpu").float(), config)
    prune(model)
    return fold(model, progressbar=False)


class DistillationTrainer(MaskedLMTrainer):
    """Masked-LM training with the teacher's logits at the masked positions as soft targets."""

    def __init__(self, *args, teacher, temperature: float = 2.0, alpha: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0.0 <= alpha <= 1.0 or temperature <= 0:
            raise ValueError(f"kd_alpha must be in [0, 1] and kd_temperature > 0 (got {alpha}, {temperature})")
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.teacher_selector = MaskedPositionSelector(head_input(self.teacher))
        self.temperature, self.alpha = temperature, alpha
        self._parts = None  # on the device: summed MLM loss, summed KD loss, micro-batches since the last log

    def log(self, logs, *args, **kwargs):
        """Log the objective's two parts beside it (`mlm_loss` is comparable with the other methods' `loss`); read
        here, where the Trainer reads the loss anyway, not every step."""
        if self._parts is not None and "loss" in logs:  # every process logs (the Trainer gathers the loss there too)
            mlm, kd, count = self.accelerator.reduce(self._parts, reduction="sum").tolist()
            logs.update(mlm_loss=mlm / max(count, 1), kd_loss=kd / max(count, 1))
            self._parts = None
        super().log(logs, *args, **kwargs)

    def masked_loss(self, logits, targets, inputs, rows):
        mlm = super().masked_loss(logits, targets, inputs, rows)
        with torch.no_grad():
            self.teacher_selector.positions = rows
            try:
                teacher_logits = self.teacher(**inputs).logits
            finally:
                self.teacher_selector.positions = None
        t = self.temperature
        kl = F.kl_div(F.log_softmax(logits.float() / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1),
                      log_target=True, reduction="sum") / max(rows.numel(), 1)
        if self.model.training:
            parts = torch.stack([mlm.detach().float(), kl.detach().float() * t * t, torch.ones((), device=mlm.device)])
            self._parts = parts if self._parts is None else self._parts + parts
        return self.alpha * t * t * kl + (1.0 - self.alpha) * mlm


def train_baseline(method: str, teacher, config: WIDConfig, dataset, tokenizer, training_args,
                   kd_temperature: float = 2.0, kd_alpha: float = 0.5, resume=None, callbacks=(), run_record=None):
    """(student, trainer or None) for `method` in prune | mlm | kd; `training_args` as for the WID run."""
    if method not in METHODS[1:]:
        raise ValueError(f"unknown baseline method '{method}'; choose one of {', '.join(METHODS)}")
    student = truncated_student(teacher, config)
    if method == "prune":
        return student, None
    common = dict(model=student, args=training_args, train_dataset=dataset, data_collator=default_data_collator,
                  processing_class=tokenizer, callbacks=list(callbacks), run_record=run_record)
    if method == "kd":
        trainer = DistillationTrainer(teacher=teacher, temperature=kd_temperature, alpha=kd_alpha, **common)
    else:
        trainer = MaskedLMTrainer(**common)
    trainer.train(resume_from_checkpoint=resume)
    return trained_model(trainer).eval(), trainer
