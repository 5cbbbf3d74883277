"""The output folder of a `wid distill` run: one run at a time, nothing stale, nothing half-written.

* `RunFolder` (a context manager around the run) checks the folder before anything is loaded (a file, not
  writable, not empty), takes a lock file so that a second run into the same folder is refused (a stale lock
  of a dead process is taken over), clears the run's own state on `--overwrite_output_dir`, and on failure
  removes what it created, so a retry is never blocked by an empty `checkpoints/`.
* Checkpoints are written to a staging folder and renamed into place (`training.MaskedLMTrainer`), and carry
  `wid_run.json`: what produced them (method, teacher fingerprint, WID settings). `resume_checkpoint` refuses
  an incomplete checkpoint and `check_resume_settings` a resume with other targets or another teacher.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

LOCK_NAME = ".wid-distill.lock"
RUN_FILE = "wid_run.json"
STAGING_PREFIX = ".saving-"
CHECKPOINTS = "checkpoints"
# What a checkpoint needs besides its weights to resume bit-identically (the Trainer writes them in this order).
RESUME_FILES = ("config.json", "trainer_state.json", "optimizer.pt", "scheduler.pt")
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# WID settings that shape the mask schedule: a resume with other values would cut differently, so it is refused.
SCHEDULE_SETTINGS = ("target_hidden", "target_intermediate", "target_heads", "strategy", "alignment", "criterion",
                     "schedule_rounding", "w_step", "hidden_updates", "attention_updates", "intermediate_updates",
                     "mlm_updates", "updates_per_head")


class RunError(ValueError):
    """Bad input to a run: one line that names the fix."""


class RunInterrupted(Exception):
    """The user stopped the run (SIGINT); the message says how to resume."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _read_lock(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def missing_for_resume(checkpoint: Path) -> list[str]:
    """The files a checkpoint lacks for an exact resume (empty: complete)."""
    missing = [name for name in RESUME_FILES if not (checkpoint / name).is_file()]
    if not any((checkpoint / name).is_file() for name in WEIGHTS):
        missing.append("model.safetensors")
    if not any(checkpoint.glob("rng_state*.pth")):
        missing.append("rng_state.pth")
    return missing


def checkpoint_step(path: Path) -> int | None:
    """N of a checkpoint-N folder name (None for any other name)."""
    prefix, _, number = path.name.partition("-")
    return int(number) if prefix == "checkpoint" and number.isdigit() else None


def checkpoints_in(folder: Path) -> list[Path]:
    """checkpoint-N folders directly in `folder`, oldest (lowest N) first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None), key=checkpoint_step)


def last_complete_checkpoint(folder: Path) -> Path | None:
    complete = [p for p in checkpoints_in(folder) if not missing_for_resume(p)]
    return complete[-1] if complete else None


def resume_checkpoint(path: str) -> str:
    """The checkpoint to resume from: `path` itself when it is a complete checkpoint-N folder, or the newest complete
    one in a run folder (or its checkpoints/) given instead. RunError, one line, for anything else."""
    given = Path(path)
    if not given.is_dir():
        raise RunError(f"--resume_from_checkpoint {path} does not exist; pass a checkpoint-N folder of an earlier run "
                       f"(OUTPUT_DIR/{CHECKPOINTS}/checkpoint-N)")
    if not given.name.startswith("checkpoint-"):
        for folder in (given / CHECKPOINTS, given):
            newest = last_complete_checkpoint(folder)
            if newest is not None:
                print(f"[wid] resuming from {newest}, the newest complete checkpoint in {path}")
                return str(newest)
        raise RunError(f"{path} holds no complete checkpoint-N folder; pass one with --resume_from_checkpoint")
    missing = missing_for_resume(given)
    if missing:
        step = checkpoint_step(given) or 0
        earlier = [p for p in checkpoints_in(given.parent) if checkpoint_step(p) < step and not missing_for_resume(p)]
        hint = f"resume from {earlier[-1]} instead" if earlier else "start again without --resume_from_checkpoint"
        raise RunError(f"checkpoint {path} is incomplete (no {', '.join(missing)}): it was cut off while being written; {hint}")
    return str(given)


def read_run_record(checkpoint: str | Path) -> dict | None:
    """What produced a checkpoint (`wid_run.json`), or for checkpoints without one the WID settings in its config."""
    checkpoint = Path(checkpoint)
    try:
        return json.loads((checkpoint / RUN_FILE).read_text())
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        raise RunError(f"{checkpoint / RUN_FILE} is unreadable: the checkpoint is damaged; resume from an earlier one") from None
    try:
        settings = json.loads((checkpoint / "config.json").read_text()).get("wid")
    except (OSError, ValueError):
        raise RunError(f"{checkpoint / 'config.json'} is unreadable: the checkpoint is damaged; resume from an earlier one") from None
    return {"method": "wid", "wid_config": settings} if isinstance(settings, dict) else None


def recorded_path(value):
    """A local path made absolute, so that a run's record means the same from any directory (`wid export` run
    elsewhere, a resume from another shell); a hub name, or anything that is no existing path, as given."""
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    return os.path.abspath(path) if path.exists() else str(value)


def recorded_corpus(corpus) -> list[str] | None:
    """The corpus entries as a run records them (None: the shipped corpus)."""
    if corpus is None:
        return None
    return [recorded_path(entry) for entry in ([corpus] if isinstance(corpus, (str, Path)) else corpus)]


def _shown(corpus) -> str:
    corpus = recorded_corpus(corpus)
    return " ".join(corpus) if corpus else "(the shipped corpus)"


def check_resume_settings(checkpoint: str, record: dict) -> None:
    """Refuse, in one line naming the checkpoint's values, a resume whose method, teacher, data (corpus, sequence
    length, sequences per step: the Trainer skips the batches already seen by count) or mask schedule differs from
    the checkpoint's (learning rates may change: the trainer takes the new ones). Checkpoints written before a
    setting was recorded are not checked for it."""
    saved = read_run_record(checkpoint)
    if saved is None:
        return
    changed = []
    if saved.get("method", "wid") != record["method"]:
        changed.append(f"--method {saved.get('method', 'wid')}")
    elif saved.get("recipe") not in (None, record.get("recipe")):
        changed.append(f"--recipe {saved['recipe']} (now {record.get('recipe')})")
    fingerprints = saved.get("teacher_fingerprint"), record.get("teacher_fingerprint")
    if None not in fingerprints and fingerprints[0] != fingerprints[1]:
        changed.append(f"the teacher {saved.get('teacher')} (its weights differ from {record.get('teacher')}'s)")
    if "corpus" in saved and recorded_corpus(saved["corpus"]) != recorded_corpus(record.get("corpus")):
        changed.append(f"--corpus {_shown(saved['corpus'])} (now {_shown(record.get('corpus'))})")
    elif None not in (saved.get("corpus_fingerprint"), record.get("corpus_fingerprint")) and \
            saved["corpus_fingerprint"] != record["corpus_fingerprint"]:
        changed.append(f"the corpus {_shown(saved.get('corpus'))} as it was then (its text has changed since)")
    if "max_seq_length" in saved and saved["max_seq_length"] != record.get("max_seq_length"):
        changed.append(f"--max_seq_length {saved['max_seq_length']} (now {record.get('max_seq_length')})")
    if "train_batch_size" in saved and saved["train_batch_size"] != record.get("train_batch_size"):
        changed.append(f"{saved['train_batch_size']} sequences per step (now {record.get('train_batch_size')}; "
                       "--per_device_train_batch_size × --gradient_accumulation_steps × processes)")
    old, new = saved.get("wid_config") or {}, record.get("wid_config") or {}
    for name in SCHEDULE_SETTINGS if record["method"] == "wid" else SCHEDULE_SETTINGS[:3]:
        if name in old and old[name] != new.get(name):
            changed.append(f"--{name} {old[name]} (now {new.get(name)})")
    if changed:
        raise RunError(f"checkpoint {checkpoint} was made with {', '.join(changed)}; resume with the checkpoint's settings, "
                       "or start a new run in another --output_dir")


def check_resume_step(checkpoint: str, max_steps: int, output_dir) -> None:
    """Refuse a resume from a checkpoint already at --max_steps (the Trainer would take one step past it)."""
    step = checkpoint_step(Path(checkpoint))
    if step is not None and step >= max_steps:
        written = (Path(output_dir) / "wid_summary.json").is_file()
        student = f"its student is in {output_dir}" if written else "its student was not written: the run stopped after training"
        raise RunError(f"checkpoint {checkpoint} is at step {step}, at or past --max_steps {max_steps}: that training is "
                       f"finished ({student}); pass a larger --max_steps to train on, or fold the checkpoint with "
                       f"`wid export {checkpoint} STUDENT_DIR`")


class RunFolder:
    """The run's output folder, checked, locked and cleaned up (see the module docstring).

    `main_process`: only the main process of a multi-process run checks, locks and cleans; the others only wait."""

    def __init__(self, output_dir: str | Path, overwrite: bool = False, resuming: bool = False, main_process: bool = True):
        self.path = Path(output_dir)
        self.overwrite, self.resuming, self.main = overwrite, resuming, main_process
        self.lock = self.path / LOCK_NAME
        self.created: list[Path] = []  # folders this run made, deepest last
        self.notices: list[str] = []

    # -- entering -------------------------------------------------------------------------------------------
    def __enter__(self) -> "RunFolder":
        if not self.main:
            return self
        self._check_writable()
        self._take_lock()
        try:
            busy = [p.name for p in self.path.iterdir() if p.name != LOCK_NAME]
            if busy and not (self.overwrite or self.resuming):
                raise RunError(f"output_dir {self.path} is not empty; pass --overwrite_output_dir, --resume_from_checkpoint, "
                               "or another --output_dir")
            self._remove_staging()
            if self.overwrite and not self.resuming:
                self._clear_run_state()
        except BaseException:
            self._release()
            raise
        return self

    def _check_writable(self) -> None:
        from .export import check_writable_folder

        self.created = check_writable_folder(self.path, RunError, "output_dir")

    def _take_lock(self) -> None:
        mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        for _ in range(2):
            try:
                handle = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(self.lock)
                pid, host = holder.get("pid"), holder.get("host")
                if not isinstance(pid, int):
                    raise RunError(f"output_dir {self.path} has an unreadable lock file {self.lock} (a run was killed while "
                                   "taking it, or it was edited); delete it if no wid distill run is using this folder") from None
                if isinstance(pid, int) and host == socket.gethostname() and not _pid_alive(pid):
                    notice = f"took over the lock of a run that is gone (pid {pid}, started {holder.get('started', '?')})"
                    self.notices.append(notice)
                    print(f"[wid] {notice}")
                    self.lock.unlink(missing_ok=True)
                    continue
                raise RunError(f"output_dir {self.path} is in use by another wid distill run (pid {pid} on {host}, started "
                               f"{holder.get('started', '?')}); wait for it to end or choose another --output_dir (delete "
                               f"{self.lock} only if that run is gone)") from None
            with os.fdopen(handle, "w") as lock:
                lock.write(mine)
            return
        raise RunError(f"could not take the lock {self.lock}: another run keeps taking it; choose another --output_dir")

    def _remove_staging(self) -> None:
        """Checkpoints of a killed run that were never renamed into place (we hold the lock: no one is writing them)."""
        for staging in (self.path / CHECKPOINTS).glob(STAGING_PREFIX + "*"):
            shutil.rmtree(staging, ignore_errors=True)

    def _clear_run_state(self) -> None:
        """What an earlier run wrote and a new one would otherwise pick up: its checkpoints, intermediate students, and
        its student with its summary (so that a new run stopped early never leaves the old student unrecorded)."""
        from .export import model_files, remove_paths

        earlier = [path for path in [self.path / CHECKPOINTS, *self.path.glob("student-*pct")] if path.exists()]
        student = model_files(self.path)
        remove_paths(earlier + student)
        removed = [path.name for path in earlier] + (["the student"] if student else [])
        if removed:
            print(f"[wid] --overwrite_output_dir: removed the earlier run's {', '.join(removed)} from {self.path}")

    # -- leaving --------------------------------------------------------------------------------------------
    def __exit__(self, kind, error, traceback) -> None:
        if not self.main:
            return
        if error is not None:
            self._remove_created()
        self._release()

    def _remove_created(self) -> None:
        """After a failure: empty folders this run made (its checkpoints/ included), so a retry starts clean."""
        checkpoints = self.path / CHECKPOINTS
        for folder in (checkpoints / "head-warmup.run", checkpoints):
            if folder.is_dir() and not any(p for p in folder.rglob("*") if p.is_file()):
                shutil.rmtree(folder, ignore_errors=True)
        for folder in reversed(self.created):
            try:
                if folder.is_dir() and all(p.name == LOCK_NAME for p in folder.iterdir()):
                    self._release()
                    folder.rmdir()
            except OSError:
                pass

    def _release(self) -> None:
        if _read_lock(self.lock).get("pid") == os.getpid():
            self.lock.unlink(missing_ok=True)
