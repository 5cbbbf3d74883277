"""Checkpoints in, students out: loading a WID training checkpoint, folding it, writing the
student atomically, and re-checking a student against its checkpoint (WID_METHOD §8).

A student directory is written to a temporary folder beside it and moved in with `config.json`
last, so a killed run never leaves something `from_pretrained` would load half-way.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig

from .architecture import base_prefix, encoder_model_class, family_of, intermediate_size, mlm_model_class
from .compactors import attach, wid_state
from .compensate import (CALIBRATION_BATCHES, DAMPING, DEFAULT_COMPENSATE, check_compensate, corpus_calibration, finalize_calibrated,
                         fold_compensated, needs_compensation)
from .config import WIDConfig
from .data import TOKENIZER_FILES
from .fold import check_logits, fold, fold_check_inputs, verify_fold
from .masks import at_target, finalize, masked_entry_norm


class CheckpointError(ValueError):
    """A checkpoint or student directory that cannot be read."""


def _weight_files(path: Path) -> list[Path]:
    """The weight files of a saved model: one file, or the shards its index names (save_pretrained(max_shard_size=))."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / single).exists():
            return [path / single]
        if (path / index).exists():
            shards = json.loads((path / index).read_text(encoding="utf-8"))["weight_map"].values()
            return [path / name for name in dict.fromkeys(shards)]
    return []


def _read_weights(path: Path) -> dict:
    try:
        weights = {}
        for file in _weight_files(path):
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file

                weights.update(load_file(str(file)))
            else:
                weights.update(torch.load(file, map_location="cpu", weights_only=True))
        if weights:
            return weights
    except Exception as exc:
        raise CheckpointError(f"cannot read the weights in {path} ({type(exc).__name__}: {exc}); the file is corrupt or "
                              "incomplete: use an earlier checkpoint") from None
    raise CheckpointError(f"{path} has no model.safetensors or pytorch_model.bin; pass a checkpoint-N folder written by wid distill")


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' load reports and progress bars while loading a plain folder into another class
    (an encoder out of a masked-LM folder, a classifier with a new head): the gaps are expected there."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def plain_model_config(model_dir, error=CheckpointError, role: str = "model"):
    """The config of a plain model folder (a teacher or a student), or `error` with the fix: no config.json,
    an unreadable one, or a `wid distill` training checkpoint (fold it with `wid export` first)."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise error(f"the {role} folder {path} has no config.json; pass a folder written by save_pretrained, wid distill or wid export")
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" at line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise error(f"the {role} config {path / 'config.json'} is not valid JSON{where}; the file is broken or truncated: "
                    "restore it (re-download or save_pretrained again)") from None
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable config gets the same advice
        reason = (str(exc).strip().splitlines() or [""])[0][:160]
        raise error(f"cannot read the {role} config {path / 'config.json'} ({type(exc).__name__}: {reason}); the folder is "
                    "corrupt") from None
    if isinstance(getattr(config, "wid", None), dict):
        raise error(f"the {role} folder {path} is a wid distill training checkpoint: fold it first with "
                    f"`wid export {path} STUDENT_DIR`, then use STUDENT_DIR")
    return config


def tied_keys(model) -> tuple[str, ...]:
    """State-dict names that Hugging Face may leave out of a saved file because they are tied to another tensor."""
    family = family_of(model)
    return (f"{family.decoder}.weight", f"{family.decoder}.bias")


def load_checkpoint(path, dtype: torch.dtype | None = None):
    """Rebuild the compactor model of a `wid distill` training checkpoint (masks included), or of an attached model
    saved with save_pretrained: in `dtype`, or the dtype it was saved in (None). Export and verify load fp32, the
    precision the fold computes in."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a WID training checkpoint (no config.json); pass a checkpoint-N folder written by wid distill")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path / 'config.json'} ({exc}); the checkpoint is corrupt: use an earlier one") from None
    settings = getattr(config, "wid", None)
    if not isinstance(settings, dict):
        from .run_folder import CHECKPOINTS, last_complete_checkpoint, read_run_record

        method = (read_run_record(path) or {}).get("method")
        if method not in (None, "wid"):
            raise CheckpointError(f"{path} is a checkpoint of a --method {method} run: its model already is a plain student, "
                                  "with nothing to fold; load it with from_pretrained, or take the run's own student folder")
        newest = last_complete_checkpoint(path / CHECKPOINTS)
        hint = f"; to fold this run's newest checkpoint again, pass {newest}" if newest else ""
        raise CheckpointError(f"{path} holds no WID settings (config.wid): it is a plain model, not a wid distill checkpoint{hint}")
    weights = _read_weights(path)
    try:
        family_of(config)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    with torch.device("cpu"):
        model = mlm_model_class(config)(config)
        prefix = base_prefix(model)
        if any(key.startswith(f"{prefix}.pooler.") for key in weights):  # a base-encoder teacher given an MLM head keeps its pooler
            setattr(model, prefix, encoder_model_class(config)(config, add_pooling_layer=True))
            model.tie_weights()
    model = attach(model, WIDConfig.from_dict(settings))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k not in tied_keys(model)]
    if missing or unexpected:
        names = (missing or unexpected)[:3]
        raise CheckpointError(f"the weights in {path} do not match its config ({'missing' if missing else 'unexpected'} {names}); "
                              "the checkpoint is corrupt or from another version")
    dtype = dtype or next((t.dtype for t in weights.values() if t.is_floating_point()), torch.float32)
    return (model.to(dtype) if dtype != torch.float32 else model).eval()


# What writing a model folder puts there (save_pretrained, a tokenizer, sentence-transformers files, wid's summary);
# found in a folder, they belong to the model saved there, and go when another model replaces it.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json", "training_args.bin", *TOKENIZER_FILES, "modules.json", "sentence_bert_config.json",
               "config_sentence_transformers.json", "wid_summary.json")
MODEL_FILE_PATTERNS = ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin")


def model_files(folder) -> list[Path]:
    """The files and sentence-transformers module folders of the model saved in `folder` (nothing else: a run folder's
    checkpoints/ and intermediate students stay)."""
    folder = Path(folder)
    found = [folder / name for name in MODEL_FILES if (folder / name).is_file()]
    found += [path for pattern in MODEL_FILE_PATTERNS for path in folder.glob(pattern)]
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        modules = []
    for module in modules if isinstance(modules, list) else ():
        path = str(module.get("path") or "") if isinstance(module, dict) else ""
        if path and "/" not in path and not path.startswith(".") and (folder / path).is_dir():
            found.append(folder / path)
    return found


def remove_paths(paths) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def write_atomically(output_dir, write) -> Path:
    """Call `write(tmp_dir)`, then move its files into `output_dir` with config.json last. What the model saved there
    before left behind and this one does not write (a sentence-transformers module, a shard, a tokenizer file) is
    removed before config.json goes in, so the folder never mixes two models."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    earlier = model_files(output_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-student-", dir=output_dir))
    try:
        write(tmp)
        items = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")
        written = {item.name for item in items}
        for item in items:
            if item.name == "config.json":
                remove_paths(path for path in earlier if path.name not in written)
            target = output_dir / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
        if "config.json" not in written:
            remove_paths(path for path in earlier if path.name not in written)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def write_json_atomically(path, data: dict) -> Path:
    """Write `data` as indented JSON to `path` through a temporary file, so that a reader never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def save_student(student, output_dir, tokenizer=None, summary: dict | None = None, sentence_teacher=None) -> Path:
    """Write a folded student (and tokenizer, and a JSON summary) so that it appears all at once. With
    `sentence_teacher` (a sentence-transformers teacher folder) the student gets its modules too (wid.sentence)."""
    from .sentence import write_sentence_files

    def write(tmp: Path):
        student.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if sentence_teacher is not None:
            write_sentence_files(sentence_teacher, tmp, student.config.hidden_size)
        if summary is not None:
            (tmp / "wid_summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    return write_atomically(output_dir, write)


def checkpoint_tokenizer(checkpoint_dir, vocab_size: int):
    """The tokenizer saved in a checkpoint, checked against its vocabulary (wid.data.load_tokenizer): without its
    files transformers builds a 5-token tokenizer, which the student would ship and the compensation would read the
    corpus with."""
    from .data import load_tokenizer

    return load_tokenizer(checkpoint_dir, vocab_size, CheckpointError)


EXACT_CUT = "the masked entries are already 0: the cut is exact"


def fold_trained(model, calibration=None) -> tuple:
    """(student, masked-entry norm before the cut, max logit difference after it, compensation report or None,
    max logit difference to the model as trained).

    Keeps the trained masks if they are at the target (else prunes to it), zeroes the masked entries, folds, and
    checks the student against the compactor model. `calibration` (wid.compensate.calibration_source) turns on the
    compensation of the cut; it is called only when there is something to compensate, and the check then compares
    against the compensated trained model (wid.compensate), as the report says. The last number compares the
    student with the model as it left training: what the cut cost, including channels a schedule cut short had
    to cut at once (which the masked-entry norm does not see: they were never masked).
    """
    masked_norm = masked_entry_norm(model)
    inputs = fold_check_inputs(model.config)
    as_trained = check_logits(model, inputs)
    if calibration is not None and needs_compensation(model):
        batches, evaluation = calibration()
        student, difference, report = fold_compensated(model, batches, evaluation)
        report = dict(applied=True, **report, fold_check_against="the compensated trained model")
    else:
        finalize(model)
        student = fold(model)
        difference = verify_fold(model, student)
        report = None if calibration is None else dict(applied=False, reason=EXACT_CUT,
                                                       fold_check_against="the trained model, masked entries zeroed")
    to_trained = float((as_trained - check_logits(student, inputs)).abs().max())
    return student, masked_norm, difference, report, to_trained


def check_writable_folder(folder, error=CheckpointError, what: str = "output folder") -> list[Path]:
    """Make sure files can be written in `folder` (created if missing) before any work is done; `error`, one line,
    if not. Returns the folders it created, outermost first, so a caller can remove them after a failure."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise error(f"the {what} {folder} is a file; choose a folder")
    created = [parent for parent in (folder, *folder.parents) if not parent.exists()][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        for made in reversed(created):
            with contextlib.suppress(OSError):
                made.rmdir()
        raise error(f"cannot write to the {what} {folder} ({exc.strerror or type(exc).__name__}); choose a writable "
                    "location") from None
    return created


@contextlib.contextmanager
def output_folder(folder, error=CheckpointError, what: str = "output folder"):
    """`check_writable_folder` around a command's work: if the work fails, the folders it created are removed again
    while still empty, so a refused or failed command leaves nothing behind."""
    created = check_writable_folder(folder, error, what)
    try:
        yield Path(folder)
    except BaseException:
        for made in reversed(created):
            with contextlib.suppress(OSError):
                made.rmdir()  # only succeeds on an empty folder
        raise


def check_export_target(checkpoint_dir, output_dir, overwrite: bool = False) -> None:
    """Refuse, before any work, a target that is the checkpoint itself or lies inside it (the export would
    destroy its own source), and a non-empty target unless `overwrite`."""
    source, target = Path(checkpoint_dir).resolve(), Path(output_dir).resolve()
    if target == source or source in target.parents:
        raise CheckpointError(f"the export target {output_dir} is (inside) the checkpoint {checkpoint_dir}; choose another folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise CheckpointError(f"the export target {output_dir} is not empty; pass --overwrite to write the student into it anyway, or choose another folder")


def checkpoint_calibration(checkpoint_dir, tokenizer, corpus=None, batches: int = CALIBRATION_BATCHES,
                           seq_len: int | None = None):
    """The calibration source of a checkpoint: its run's corpus and sequence length (wid_run.json) unless given."""
    from .data import corpus_fingerprint
    from .run_folder import read_run_record, recorded_corpus

    record = read_run_record(checkpoint_dir) or {}
    if not corpus and record.get("corpus"):
        from .data import CorpusError, resolve_corpus

        corpus = record["corpus"]
        try:
            resolve_corpus(corpus)
        except CorpusError as error:
            raise CheckpointError(f"the run's corpus (wid_run.json) cannot be read from here ({error}); pass the calibration "
                                  "text with --corpus FILE, or run wid export from the directory the run started in") from None
    seq_len = seq_len or record.get("max_seq_length") or 128
    settings = {"corpus": recorded_corpus(corpus), "corpus_fingerprint": corpus_fingerprint(corpus), "max_seq_length": seq_len,
                "calibration_batches": batches}
    return corpus_calibration(tokenizer, corpus, seq_len, batches), settings


def export_checkpoint(checkpoint_dir, output_dir, overwrite: bool = False, compensate: str = DEFAULT_COMPENSATE,
                      corpus=None, calibration_batches: int = CALIBRATION_BATCHES) -> dict:
    """Fold a training checkpoint into a student in `output_dir`; returns what was measured. `compensate="on"`:
    the cut is compensated on `calibration_batches` batches of `corpus` (default: the run's)."""
    check_compensate(compensate)
    check_export_target(checkpoint_dir, output_dir, overwrite)
    with output_folder(output_dir, CheckpointError, "export target"):
        return _export(checkpoint_dir, output_dir, compensate, corpus, calibration_batches)


def _export(checkpoint_dir, output_dir, compensate: str, corpus, calibration_batches: int) -> dict:
    model = load_checkpoint(checkpoint_dir, torch.float32)  # a damaged checkpoint is reported as such before anything else is read
    tokenizer = checkpoint_tokenizer(checkpoint_dir, model.config.vocab_size)
    calibration, settings = (checkpoint_calibration(checkpoint_dir, tokenizer, corpus, calibration_batches)
                             if compensate == "on" else (None, {}))
    state = wid_state(model)
    updates, needed, cut_at_once = int(state.mask_updates), state.config.mask_updates_to_target(state.dims), not at_target(model)
    student, masked_norm, difference, compensation, to_trained = fold_trained(model, calibration)
    if compensation is not None:
        compensation.update(settings)
    report = {
        "checkpoint": str(checkpoint_dir),
        "student": str(output_dir),
        "hidden_size": student.config.hidden_size,
        "num_attention_heads": student.config.num_attention_heads,
        "intermediate_size": intermediate_size(student.config),
        "masked_entry_norm_before_fold": masked_norm,
        "max_logit_difference_after_pruning": difference,
        "max_logit_difference_to_trained": to_trained,
        "compensate": compensate,
        "compensation": compensation,
    }
    if cut_at_once:
        _notice(report, f"the checkpoint's masks had not reached the target (mask update {updates} of {needed}): the "
                        f"remaining channels were cut at once (student vs the model as trained: logits max diff "
                        f"{to_trained:.3g}); a checkpoint after the schedule's last mask update cuts only what the penalty "
                        "has shrunk")
    teacher = _recorded_teacher(checkpoint_dir, report)
    save_student(student, output_dir, tokenizer, report, sentence_teacher=teacher)
    return report


def _notice(report: dict, notice: str) -> None:
    """A notice in the export report, and on stderr (the report goes to stdout)."""
    report.setdefault("notices", []).append(notice)
    print(f"[wid] {notice}", file=sys.stderr)


def _recorded_teacher(checkpoint_dir, report: dict) -> str | None:
    """The run's teacher folder (wid_run.json), whose sentence-transformers modules the student takes over; when it is
    no folder here (a hub name, or a relative path recorded by an older wid and read from another directory), the
    report says that the student is written without them."""
    from .run_folder import read_run_record
    from .sentence import MODULES_FILE

    teacher = (read_run_record(checkpoint_dir) or {}).get("teacher")
    if teacher is not None and not Path(teacher).is_dir():
        _notice(report, f"the run's teacher {teacher} is no folder here, so the student gets no sentence-transformers "
                        f"modules; if the teacher has a {MODULES_FILE}, run wid export where it is found (or from the "
                        "directory the run started in)")
    return teacher


def _student_compensation(student_dir) -> dict | None:
    """The compensation a student was folded with (its wid_summary.json), if one was applied."""
    try:
        summary = json.loads((Path(student_dir) / "wid_summary.json").read_text())
    except (OSError, ValueError):
        return None
    compensation = summary.get("compensation") if isinstance(summary, dict) else None
    return compensation if isinstance(compensation, dict) and compensation.get("applied") else None


def verify_student(checkpoint_dir, student_dir, tolerance: float = 1e-4) -> dict:
    """Compare a student with the checkpoint it came from: max logit difference, masked entries left, and
    `matches` (the difference after pruning within `tolerance`; a student of another shape or vocabulary
    does not match)."""
    from transformers import AutoModelForMaskedLM

    model = load_checkpoint(checkpoint_dir, torch.float32)
    try:
        student = AutoModelForMaskedLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    except Exception as exc:
        raise CheckpointError(f"cannot load the student in {student_dir} ({type(exc).__name__}); pass a folder written by wid distill or wid export") from None
    masked_norm = masked_entry_norm(model)
    compensation = _student_compensation(student_dir)
    notices = []
    try:
        as_trained = verify_fold(model, student)
        if compensation is not None:  # compare against the same compensation, computed again from the same data
            tokenizer = checkpoint_tokenizer(checkpoint_dir, model.config.vocab_size)
            calibration, now = checkpoint_calibration(checkpoint_dir, tokenizer, compensation.get("corpus"),
                                                      compensation.get("calibration_batches", CALIBRATION_BATCHES),
                                                      compensation.get("max_seq_length"))
            if compensation.get("corpus_fingerprint") not in (None, now["corpus_fingerprint"]):
                notices.append(f"the calibration corpus {' '.join(compensation.get('corpus') or ['(the shipped corpus)'])} "
                               "has changed since the student was written, so its compensation cannot be computed again "
                               "to compare: a difference here does not mean the fold is wrong")
            trained, compensated = finalize_calibrated(model, calibration()[0], compensation.get("damping", DAMPING))
            compensated.prepare(keep_tie=bool(student.config.tie_word_embeddings))
            with compensated.applied():
                after = verify_fold(trained, student)
        else:
            finalize(model)
            after = verify_fold(model, student)
    except (RuntimeError, IndexError):  # another vocabulary or embedding layout: logits cannot even be compared
        as_trained = after = float("inf")
    return {
        "max_logit_difference": as_trained,
        "max_logit_difference_after_pruning": after,
        "compared_against": "the compensated trained model" if compensation is not None else "the trained model, masked entries zeroed",
        "masked_entry_norm": masked_norm,
        "tolerance": tolerance,
        "matches": after <= tolerance,
        **({"notices": notices} if notices else {}),
    }
