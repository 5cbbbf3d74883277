"""Compensation for the cut: what the removed channels carried, folded into the channels that remain.

The fold is exact only when the masked entries have reached zero. The short recipe guarantees that; the paper
recipe on a short budget does not (benchmarks/QUALITY.md), and cutting entries that still hold weight changes
every linear that reads a removed channel. `CutCompensation` records, on a few calibration batches of the
corpus, the inputs of every compacted linear of the trained model and replaces each removed input channel by its
least-squares prediction from the kept ones (centred covariances Σ, means μ, kept K, removed C):

    x_C ≈ A·x_K + c,   A = Σ_CK (Σ_KK + δ·mean(diag Σ_KK)·I)⁻¹,   c = μ_C − A·μ_K

so that the student's linear is W_K + W_C·A with bias b + W_C·c, where W, b are the trained Q·W·L and Q·b (the
masked bias entries included). With A = 0 this is the "mean into the bias" compensation. Two exceptions: the
attention scores are bilinear in the query and key, so removed query/key channels are cut plainly; and a decoder
tied to the word embeddings gets the bias part only, so the student keeps the tie (and its size).

`applied(model)` makes the trained model compute what the compensated student computes (each removed input
channel replaced by its prediction, removed query/key channels zeroed): the fold check compares against it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .architecture import family_of, model_inputs
from .compactors import wid_state
from .masks import finalize, masked_entry_norm

DAMPING = 1e-2  # ridge δ, relative to the mean variance of the kept channels
COMPENSATE_CHOICES = ("on", "off")
# Off by measurement (benchmarks/QUALITY.md, "Compensation of the cut", 2026-12-02): on the WID cuts where masked
# entries still held weight it always lowered the held-out MLM loss (6.72 → 5.93; 9.74 → 6.69 for the 5x paper
# run) but never raised downstream accuracy (0.837 → 0.838, 0.822 → 0.8085, collapsed 0.784 → 0.7055). After the
# short recipe (the default) the cut is exact and it does nothing.
DEFAULT_COMPENSATE = "off"
CALIBRATION_BATCHES = 8
CALIBRATION_BATCH_SIZE = 16


def spread_picks(length: int, count: int, exclude=frozenset()) -> list[int]:
    """`count` evenly spaced indices of range(length) outside `exclude` (fewer when fewer are left)."""
    pool = [index for index in range(length) if index not in exclude]
    count = min(len(pool), count)
    return sorted({pool[int(i * len(pool) / count)] for i in range(count)}) if count else []


def batches_at(dataset, picks: list[int], batch_size: int = CALIBRATION_BATCH_SIZE) -> list[dict]:
    """Model inputs of the picked sequences of a tokenised dataset (plain text, no MLM masking: the student is used
    on plain text)."""
    inputs = []
    for start in range(0, len(picks), batch_size):
        rows = [dataset[i] for i in picks[start:start + batch_size]]
        batch = {"input_ids": torch.stack([torch.as_tensor(row["input_ids"]) for row in rows])}
        for key in ("attention_mask", "token_type_ids"):
            if key in rows[0]:
                batch[key] = torch.stack([torch.as_tensor(row[key]) for row in rows])
        batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
        inputs.append(batch)
    return inputs


def calibration_batches(dataset, batches: int = CALIBRATION_BATCHES, batch_size: int = CALIBRATION_BATCH_SIZE) -> list[dict]:
    """`batches` batches of evenly spaced sequences of a tokenised dataset."""
    return batches_at(dataset, spread_picks(len(dataset), batches * batch_size), batch_size)


class InputStatistics:
    """Running mean and covariance (against the kept channels) of one linear's input, in fp64."""

    def __init__(self, keep: torch.Tensor, width: int):
        self.keep = keep
        self.count = 0
        self.total = torch.zeros(width, dtype=torch.float64)
        self.gram = torch.zeros(width, len(keep), dtype=torch.float64)

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to(device="cpu", dtype=torch.float64)
        self.count += rows.shape[0]
        self.total += rows.sum(dim=0)
        self.gram += rows.t() @ rows[:, self.keep]

    def predictor(self, cut: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, c) of x_C ≈ A·x_K + c: the ridge least-squares fit on what was recorded; an infinite damping gives its
        limit A = 0, c = μ_C (the mean into the bias)."""
        mean = self.total / max(self.count, 1)
        if damping == float("inf"):
            return torch.zeros(len(cut), len(self.keep), dtype=torch.float64), mean[cut]
        covariance = self.gram / max(self.count, 1) - torch.outer(mean, mean[self.keep])
        kept = covariance[self.keep]
        ridge = damping * kept.diagonal().mean().clamp_min(1e-12)
        fit = torch.linalg.solve(kept + ridge * torch.eye(len(self.keep), dtype=torch.float64), covariance[cut].t()).t()
        return fit, mean[cut] - fit @ mean[self.keep]


@dataclass
class InputPrediction:
    """How one linear's removed input channels are replaced: x_C ← A·x_K + c."""

    keep: torch.Tensor
    cut: torch.Tensor
    fit: torch.Tensor  # A, |C| × |K| (zeros: mean only)
    offset: torch.Tensor  # c, |C|


def _complement(keep: torch.Tensor, width: int) -> torch.Tensor:
    mask = torch.ones(width, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().flatten()


class CutCompensation:
    """Calibration statistics of a trained compactor model (masked entries as trained, masks at their final
    widths) and the compensated student tensors they give (see the module docstring)."""

    def __init__(self, model, kept: dict, damping: float = DAMPING):
        from .fold import linear_folds

        self.model = model
        self.damping = damping
        self.folds = linear_folds(model, kept)
        self.statistics: dict[str, InputStatistics] = {}
        self.sites: dict[str, str] = {}  # linear → the linear whose statistics it shares (the same input tensor)
        self.predictions: dict[str, InputPrediction] = {}
        self.tokens = 0
        self._width = {spec.name: spec.module.in_features for spec in self.folds}
        self.decoder = family_of(model).decoder

    def _cut(self, spec) -> torch.Tensor:
        return _complement(spec.keep_in, self._width[spec.name])

    @torch.no_grad()
    def calibrate(self, batches: list[dict]) -> "CutCompensation":
        """Record the inputs of every linear that loses input channels, at the real tokens of `batches`."""
        cutting = {spec.name: spec for spec in self.folds if len(self._cut(spec))}
        token_mask, previous = {}, {}

        def record(name):
            def hook(module, args):
                x = args[0]
                if name not in self.sites:  # first batch: linears reading the very tensor the previous one read share
                    last = previous.get("input")
                    same = last is not None and last[0] is x and cutting[last[1]].module.input_group == module.input_group
                    self.sites[name] = self.sites[last[1]] if same else name
                    if not same:
                        self.statistics[name] = InputStatistics(cutting[name].keep_in, x.shape[-1])
                previous["input"] = (x, name)
                if self.sites[name] == name:
                    self.statistics[name].add(x[token_mask["now"]] if x.dim() == 3 else x.reshape(-1, x.shape[-1]))
            return hook

        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        handles = [spec.module.register_forward_pre_hook(record(name)) for name, spec in cutting.items()]
        try:
            for batch in batches:
                batch = {key: value.to(device) for key, value in batch.items()}
                token_mask["now"] = batch["attention_mask"].bool()
                self.tokens += int(token_mask["now"].sum())
                self.model(**model_inputs(self.model, batch))
                previous.clear()
        finally:
            for handle in handles:
                handle.remove()
            self.model.train(was_training)
        return self

    def prepare(self, keep_tie: bool) -> None:
        """Fit the predictions from the statistics (before `student_tensors` or `applied`); `keep_tie`: the student's
        decoder stays tied to its word embeddings, so the decoder gets the mean (bias) part only."""
        for spec in self.folds:
            cut = self._cut(spec)
            if not len(cut) or spec.name not in self.sites:
                continue
            damping = float("inf") if keep_tie and spec.name == self.decoder else self.damping  # a tied decoder: mean only
            fit, offset = self.statistics[self.sites[spec.name]].predictor(cut, damping)
            self.predictions[spec.name] = InputPrediction(spec.keep_in, cut, fit, offset)

    @torch.no_grad()
    def student_tensors(self, keep_tie: bool) -> dict[str, torch.Tensor]:
        """The compensated weight and bias of every linear of the student, by tensor name. Biases are the trained
        model's, masked entries included (their contribution through the output compactor is not lost either)."""
        self.prepare(keep_tie)
        out = {}
        for spec in self.folds:
            weight, bias = spec.folded()
            prediction = self.predictions.get(spec.name)
            if prediction is not None:
                removed, _ = spec.folded(keep_in=prediction.cut)
                removed = removed.double()
                weight = (weight.double() + removed @ prediction.fit).float()
                if bias is not None:
                    bias = (bias.double() + removed @ prediction.offset).float()
            if not (keep_tie and spec.name == self.decoder):
                out[f"{spec.name}.weight"] = weight
            for key in spec.bias_keys if bias is not None else ():
                out[key] = bias
        return out

    @contextlib.contextmanager
    def applied(self):
        """Inside, the trained model computes the compensated cut: what the compensated student computes."""
        handles = []

        def replace(prediction):
            def hook(module, args):
                x = args[0].clone()
                fit, offset = prediction.fit.to(x), prediction.offset.to(x)
                x[..., prediction.cut.to(x.device)] = x[..., prediction.keep.to(x.device)] @ fit.t() + offset
                return (x, *args[1:])
            return hook

        def cut_scores(keep_out):
            def hook(module, args, output):
                kept = torch.zeros(output.shape[-1], dtype=output.dtype, device=output.device)
                kept[keep_out.to(output.device)] = 1
                return output * kept
            return hook

        try:
            for spec in self.folds:
                if spec.name in self.predictions:
                    handles.append(spec.module.register_forward_pre_hook(replace(self.predictions[spec.name])))
                if spec.feeds_scores and spec.keep_out is not None:
                    handles.append(spec.module.register_forward_hook(cut_scores(spec.keep_out)))
            yield self.model
        finally:
            for handle in handles:
                handle.remove()

    def report(self) -> dict:
        return {"calibration_tokens": self.tokens, "linears_compensated": len(self.predictions), "damping": self.damping}


@torch.no_grad()
def logit_divergence(reference, student, batches: list[dict], chunk: int = 4) -> float:
    """Mean KL(reference ‖ student) per real token of the MLM logits, in nats: how much the cut changed the model."""
    total, tokens = 0.0, 0
    reference_device = next(reference.parameters()).device
    was_training = reference.training
    reference.eval()
    try:
        for batch in batches:
            for start in range(0, batch["input_ids"].shape[0], chunk):
                part = {key: value[start:start + chunk] for key, value in model_inputs(student, batch).items()}
                keep = part["attention_mask"].bool()
                expected = reference(**{k: v.to(reference_device) for k, v in part.items()}).logits.float().cpu()[keep]
                got = student(**part).logits.float()[keep]
                total += float(torch.nn.functional.kl_div(got.log_softmax(-1), expected.log_softmax(-1), log_target=True,
                                                          reduction="sum"))
                tokens += int(keep.sum())
    finally:
        reference.train(was_training)
    return total / max(tokens, 1)


def _copy_masks(source, target) -> None:
    """Give `target` the masks of `source` (buffers only: tied compactors stay as they are)."""
    target_state = wid_state(target)
    for name, buffer in wid_state(source).named_buffers():
        target_state.get_buffer(name).copy_(buffer)
    target_state.refresh()


def check_compensate(value: str) -> None:
    if value not in COMPENSATE_CHOICES:
        raise ValueError(f"--compensate {value} is not known; pass --compensate on or --compensate off")


def finalize_calibrated(model, calibration: list[dict], damping: float = DAMPING) -> tuple:
    """`masks.finalize(model)` (masks at the target, masked entries zeroed: the model the plain fold reads), after
    keeping a copy of the model as trained; returns (that copy, with the final masks; its calibrated compensation)."""
    import copy

    from .fold import kept_indices

    trained = copy.deepcopy(model)
    finalize(model)
    _copy_masks(model, trained)
    return trained, CutCompensation(trained, kept_indices(model), damping).calibrate(calibration)


def fold_compensated(model, calibration: list[dict], evaluation: list[dict] | None = None, damping: float = DAMPING) -> tuple:
    """`export.fold_trained` with compensation: (student, max logit difference against the compensated trained model,
    report). The report has the KL of the plain and of the compensated student to the trained model on `evaluation`."""
    from .fold import fold, verify_fold

    trained, compensation = finalize_calibrated(model, calibration, damping)
    student = fold(model, compensation=compensation)
    with compensation.applied():
        difference = verify_fold(trained, student)
    report = compensation.report()
    report["kl_evaluation_sequences"] = sum(len(batch["input_ids"]) for batch in evaluation or ())
    report["kl_to_trained_plain_cut"] = report["kl_to_trained_compensated"] = None
    if evaluation:
        report["kl_to_trained_plain_cut"] = logit_divergence(trained, fold(model, progressbar=False), evaluation)
        report["kl_to_trained_compensated"] = logit_divergence(trained, student, evaluation)
    return student, difference, report


def needs_compensation(model) -> bool:
    """False when the masked entries are already exactly zero (the cut is exact: nothing to compensate)."""
    return not masked_entry_norm(model) == 0.0


def calibration_source(dataset, batches: int = CALIBRATION_BATCHES, evaluation_dataset=None):
    """A callable giving (calibration batches, evaluation batches): built only if there is something to compensate.
    Evaluation uses held-out sequences when given, else other sequences of `dataset`."""
    def build():
        picks = spread_picks(len(dataset), batches * CALIBRATION_BATCH_SIZE)
        if evaluation_dataset is not None and len(evaluation_dataset):
            evaluation = calibration_batches(evaluation_dataset, 2)
        else:  # sequences the calibration did not see (none left: the KL is not measured, and the report says so)
            evaluation = batches_at(dataset, spread_picks(len(dataset), 2 * CALIBRATION_BATCH_SIZE, exclude=set(picks)))
        return batches_at(dataset, picks), evaluation
    return build


def corpus_calibration(tokenizer, corpus, seq_len: int, batches: int = CALIBRATION_BATCHES):
    """`calibration_source` over a corpus as `wid distill` reads it (None: the shipped corpus and its held-out split)."""
    def build():
        from .data import build_mlm_dataset

        dataset = build_mlm_dataset(tokenizer, corpus, seq_len=seq_len)
        heldout = build_mlm_dataset(tokenizer, None, seq_len=seq_len, heldout=True) if corpus is None else None
        return calibration_source(dataset, batches, heldout)()
    return build
