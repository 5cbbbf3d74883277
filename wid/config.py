"""The target student and every WID hyper-parameter, in one dataclass (WID_METHOD §3–§5).

`WIDConfig` is validated on creation; `WIDConfig.for_teacher(teacher_config)` resolves presets
into concrete widths for a given teacher and checks that the target is reachable, raising a
ValueError that says what would work. Presets are defined relative to BERT-base and scaled to any
teacher by width ratio, so `wid55` gives the paper's 516/12×43/2064 on BERT-base.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from wid_kernels.reference import UPDATE_RULES  # one list of rules, next to the math that defines them

from .architecture import TeacherDims

STRATEGIES = ("dim", "head")
ALIGNMENTS = ("mask", "tied")
CRITERIA = ("representative", "group")
ROUNDINGS = ("authors", "ceil")


@dataclass(frozen=True)
class Preset:
    """Widths as fractions of the teacher: per-head width (dim) / head count (head), and FFN width."""

    hidden_ratio: float
    intermediate_ratio: float
    description: str


PRESETS = {
    "wid55": Preset(43 / 64, 2064 / 3072, "WID55: 54.9 M params from BERT-base (hidden 516 = 12×43, FFN 2064)"),
    "wid11": Preset(16 / 64, 768 / 3072, "WID11: 11.3 M params from BERT-base (hidden 192, FFN 768)"),
    "half": Preset(0.5, 0.5, "half the teacher's hidden and FFN widths"),
}


def per_head_cut_after(cut: int, updates: int, length: int, rounding: str) -> int:
    """Channels cut from each head after `updates` mask updates (dim strategy, H and A_l), of `cut` in all.

    "authors": a fixed max(1, cut // length) more per update until `cut` (their trainer adds
    int(cut/8) per update, so WID55's 21 per head takes 11 updates of 2, not 8; the max(1, ·) is ours:
    with fewer than `length` channels to cut theirs would never cut). "ceil": ceil(cut·updates/length).
    """
    if cut <= 0 or updates <= 0:
        return 0
    if rounding == "authors":
        return min(cut, updates * max(1, cut // length))
    return -(-cut * min(updates, length) // length)


def updates_to_cut(cut: int, length: int, rounding: str) -> int:
    """Mask updates until `per_head_cut_after` reaches `cut`."""
    if cut <= 0:
        return 0
    return -(-cut // max(1, cut // length)) if rounding == "authors" else length


def _round_to_multiple(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class WIDConfig:
    """Target student + WID hyper-parameters (defaults are the paper's)."""

    target_hidden: int | None = None
    target_intermediate: int | None = None
    target_heads: int | None = None  # None: the teacher's head count (dim) / target_hidden / head width (head)
    preset: str | None = None
    strategy: str = "dim"
    alignment: str = "mask"
    criterion: str = "representative"
    update_rule: str = "authors"  # authors: their optimizer numerics; additive: this package's earlier variant
    schedule_rounding: str = "authors"  # authors: their per-update counts; ceil: even growth, rounded up
    w_step: int = 500  # steps between mask updates
    penalty: float = 20.0  # λ of the update rule
    hidden_updates: int = 8  # mask updates until H reaches its target (dim strategy)
    attention_updates: int = 8  # mask updates until every A_l reaches its target (dim strategy)
    intermediate_updates: int = 16  # mask updates until every F_l reaches its target
    mlm_updates: int = 16  # mask updates until M reaches its target
    updates_per_head: int = 2  # head strategy: one more head pruned every this many mask updates
    teacher_lr: float = 1e-6
    compactor_lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.01
    adam_betas: tuple = (0.9, 0.999)
    # Adam's bias correction, which the authors' optimizer leaves out; applied as a factor on the learning rate
    # (training.bias_correction_factor). Without it a run far shorter than 1/(1 − β2) = 1000 steps takes steps
    # several times Adam's usual size (≈10× at step 10, ≈3× at step 100).
    bias_correction: bool = False
    adam_eps: float = 1e-6

    def __post_init__(self):
        self.adam_betas = tuple(self.adam_betas)
        for name, allowed in (("strategy", STRATEGIES), ("alignment", ALIGNMENTS), ("criterion", CRITERIA),
                              ("update_rule", UPDATE_RULES), ("schedule_rounding", ROUNDINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid; choose one of {', '.join(allowed)}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.preset is None and self.target_hidden is None and not (self.strategy == "head" and self.target_heads):
            raise ValueError(f"give target_hidden (and target_intermediate), target_heads with strategy='head', or a preset "
                             f"({', '.join(PRESETS)})")
        for name in ("target_hidden", "target_intermediate", "target_heads"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("w_step", "hidden_updates", "attention_updates", "intermediate_updates", "mlm_updates", "updates_per_head"):
            value = getattr(self, name)
            if not _positive_int(value):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        # NaN passes every `<` test: without these checks a NaN learning rate trains until the loss is NaN
        for name, low, low_allowed, what in (("penalty", 0, True, ">= 0"), ("teacher_lr", 0, True, ">= 0 (0 freezes the "
                                             "teacher weights)"), ("compactor_lr", 0, False, "> 0"),
                                             ("weight_decay", 0, True, ">= 0"), ("adam_eps", 0, False, "> 0")):
            value = getattr(self, name)
            if not _finite_number(value) or value < low or (value == low and not low_allowed):
                raise ValueError(f"{name} must be a finite number {what}, got {value!r}")
        if not _finite_number(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if len(self.adam_betas) != 2 or not all(_finite_number(b) and 0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1) (β1, β2), got {self.adam_betas!r}")

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, teacher_config=None, **overrides) -> "WIDConfig":
        """A config for preset `name`; with `teacher_config`, its widths are resolved at once."""
        config = cls(preset=name, **overrides)
        return config.for_teacher(teacher_config) if teacher_config is not None else config

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["adam_betas"] = list(self.adam_betas)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "WIDConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    # ------------------------------------------------------------------ resolution
    def for_teacher(self, teacher_config) -> "WIDConfig":
        """Concrete widths for this teacher, validated; raises ValueError saying what would work."""
        dims = teacher_config if isinstance(teacher_config, TeacherDims) else TeacherDims.from_config(teacher_config)
        hidden, intermediate, heads = self.target_hidden, self.target_intermediate, self.target_heads
        if hidden is None and heads is not None and self.strategy == "head":
            if not 1 <= heads <= dims.heads:
                raise ValueError(f"target_heads={heads}, but the teacher has {dims.heads} heads; choose at least 1 and at most "
                                 f"{dims.heads}")
            hidden = heads * dims.head_dim  # whole heads removed: the head count sets the width, not the preset
        if self.preset is not None:
            preset = PRESETS[self.preset]
            if hidden is None:
                if self.strategy == "dim":
                    hidden = dims.heads * max(1, round(dims.head_dim * preset.hidden_ratio))
                else:
                    hidden = dims.head_dim * max(1, round(dims.heads * preset.hidden_ratio))
            if intermediate is None:
                intermediate = max(1, round(dims.intermediate * preset.intermediate_ratio))
        if intermediate is None:
            intermediate = max(1, round(dims.intermediate * hidden / dims.hidden))
        if hidden > dims.hidden:
            raise ValueError(f"target_hidden={hidden} is larger than the teacher's hidden size {dims.hidden}; choose at most {dims.hidden}")
        if intermediate > dims.intermediate:
            raise ValueError(
                f"target_intermediate={intermediate} is larger than the teacher's FFN width {dims.intermediate}; "
                f"choose at most {dims.intermediate}"
            )
        if self.strategy == "dim":
            if heads is not None and heads != dims.heads:
                raise ValueError(
                    f"strategy='dim' keeps all {dims.heads} heads, but target_heads={heads}; "
                    f"drop target_heads or use strategy='head'"
                )
            heads = dims.heads
            if hidden % heads:
                low = max(heads, hidden // heads * heads)
                raise ValueError(
                    f"target_hidden={hidden} gives a head width of {hidden / heads:.2f} over {heads} heads; "
                    f"use a multiple of {heads} such as {low} or {min(low + heads, dims.hidden)}"
                )
        else:
            if heads is not None and not 1 <= heads <= dims.heads:
                raise ValueError(f"target_heads={heads}, but the teacher has {dims.heads} heads; choose at least 1 and at most "
                                 f"{dims.heads}")
            if hidden % dims.head_dim:
                low = _round_to_multiple(hidden, dims.head_dim)
                raise ValueError(
                    f"strategy='head' removes whole heads of width {dims.head_dim}, so target_hidden must be a multiple "
                    f"of {dims.head_dim} (e.g. {min(low, dims.hidden)}); or use strategy='dim'"
                )
            if heads is not None and heads * dims.head_dim != hidden:
                raise ValueError(
                    f"target_heads={heads} × head width {dims.head_dim} = {heads * dims.head_dim} ≠ target_hidden={hidden}; "
                    f"use target_heads={hidden // dims.head_dim}"
                )
            heads = hidden // dims.head_dim
        if not dims.mlm_follows_hidden and hidden == dims.mlm:
            raise ValueError(
                f"target_hidden={hidden} equals the teacher's embedding_size; an ELECTRA model of equal widths has no "
                f"embeddings_project, so this student cannot hold it: choose another target_hidden"
            )
        return dataclasses.replace(self, target_hidden=hidden, target_intermediate=intermediate, target_heads=heads)

    @property
    def resolved(self) -> bool:
        return None not in (self.target_hidden, self.target_intermediate, self.target_heads)

    def student_head_dim(self) -> int:
        return self.target_hidden // self.target_heads

    def mask_updates_to_target(self, dims: TeacherDims) -> int:
        """How many mask updates the schedule needs before every group sits at its target."""
        if self.strategy == "dim":
            cut = dims.head_dim - self.student_head_dim()
            stream = max(updates_to_cut(cut, self.hidden_updates, self.schedule_rounding),
                         updates_to_cut(cut, self.attention_updates, self.schedule_rounding))
        else:
            stream = self.updates_per_head * (dims.heads - self.target_heads)
        return max(stream, self.intermediate_updates, self.mlm_updates)

    def steps_to_target(self, dims: TeacherDims) -> int:
        return self.w_step * self.mask_updates_to_target(dims)

