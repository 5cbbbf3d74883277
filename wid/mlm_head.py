"""MLM heads for teachers that ship without one: fingerprints, saving and loading (WID_METHOD §7).

A sentence encoder such as the built-in all-MiniLM-L6-v2 has no MLM head, so WID first needs one:
without a trained head the masked-LM loss of teacher and students is barely better than token
frequencies and cannot rank them. A head is only valid for the exact encoder it was trained on, so
every saved head carries the fingerprint of its teacher (a hash of the teacher's config and weight
files) and is loaded only on an exact match: a stale head of another teacher is never applied.

Only the head's own tensors are saved (the transform and the decoder bias; the decoder weight is
tied to the teacher's word embeddings), never the encoder.

The package ships a head for the built-in teacher (`wid/heads/`), trained on the training split
of the shipped corpus by `scripts/train_default_head.py`.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .architecture import family_of, submodule

HEADS_DIR = Path(__file__).resolve().parent / "heads"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_fingerprints: dict = {}


def _head_parts(model) -> dict:
    """The head's own modules under the names saved heads use, whatever the family calls them."""
    family = family_of(model)
    return {"transform.dense": submodule(model, family.head_dense), "transform.LayerNorm": submodule(model, family.head_norm)}


def head_bias(model) -> torch.nn.Parameter:
    return submodule(model, family_of(model).decoder).bias


def head_state(model) -> dict:
    """The tensors of an MLM head that a warm-up trains: transform (dense, LayerNorm) and decoder bias."""
    state = {f"{name}.{k}": v for name, module in _head_parts(model).items() for k, v in module.state_dict().items()}
    state["bias"] = head_bias(model).detach()
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def head_parameters(model) -> list[torch.nn.Parameter]:
    """What a head warm-up trains (the decoder weight stays tied to the frozen word embeddings)."""
    return [p for module in _head_parts(model).values() for p in module.parameters()] + [head_bias(model)]


@torch.no_grad()
def load_head_state(model, state: dict) -> None:
    """Copy a saved head into `model`'s MLM head (shapes must match)."""
    for name, module in _head_parts(model).items():
        module.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}, strict=True)
    head_bias(model).copy_(state["bias"])


def teacher_fingerprint(teacher_dir: str | Path) -> str | None:
    """sha256 over the teacher folder's config.json and weight file(s); None when it is not a local folder."""
    folder = Path(teacher_dir)
    files = [folder / "config.json"] + [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    files += sorted(folder.glob("model-*.safetensors"))
    if not folder.is_dir() or not all(f.is_file() for f in files) or len(files) < 2:
        return None
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _fingerprints:
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode())
            with open(path, "rb") as handle:
                while block := handle.read(1 << 22):
                    digest.update(block)
        _fingerprints[key] = digest.hexdigest()
    return _fingerprints[key]


def save_head(model, path: str | Path, fingerprint: str, info: dict) -> None:
    """Write the head's tensors with its teacher's fingerprint and `info` (how it was trained) as metadata."""
    from safetensors.torch import save_file

    metadata = {"teacher_fingerprint": fingerprint, "info": json.dumps(info)}
    save_file(head_state(model), str(path), metadata=metadata)


def read_head(path: str | Path, fingerprint: str | None) -> tuple[dict, dict] | None:
    """(tensors, info) of a saved head if it was trained on the teacher with `fingerprint`, else None."""
    from safetensors import safe_open

    path = Path(path)
    if fingerprint is None or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("teacher_fingerprint") != fingerprint:
                return None
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception:  # an unreadable cache entry is a miss, never a crash
        return None
    return tensors, json.loads(metadata.get("info", "{}"))


def cache_dir() -> Path:
    """Where warmed-up heads are kept between runs: $WID_CACHE, else $XDG_CACHE_HOME/wid, else ~/.cache/wid."""
    if os.environ.get("WID_CACHE"):
        return Path(os.environ["WID_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wid"


def tokenizer_digest(folder: str | Path) -> str:
    """sha256 over a folder's tokenizer files (small): another tokenizer beside the same weights reads the corpus as
    other token ids, so it trains another head."""
    from .data import TOKENIZER_FILES

    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(folder) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def warmup_key(teacher_dir: str | Path, corpus_files, settings: dict) -> str | None:
    """The cache key of a head warm-up: the teacher's fingerprint, the corpus files (path, size, mtime) and
    every setting that changes the result. None when the teacher is not a local folder (never cached)."""
    fingerprint = teacher_fingerprint(teacher_dir)
    if fingerprint is None:
        return None
    files = [corpus_files] if isinstance(corpus_files, str) else list(corpus_files)
    described = []
    for name in files:
        path = Path(name)
        described.append([str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns] if path.exists() else [name])
    blob = json.dumps(dict(teacher=fingerprint, tokenizer=tokenizer_digest(teacher_dir), corpus=described, settings=settings),
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def shipped_head_path(teacher_name: str) -> Path:
    return HEADS_DIR / f"{teacher_name}.safetensors"


def load_shipped_head(model, teacher_dir: str | Path, teacher_name: str) -> dict | None:
    """Load the head shipped for `teacher_name` into `model` if it matches this teacher; its info, else None."""
    found = read_head(shipped_head_path(teacher_name), teacher_fingerprint(teacher_dir))
    if found is None:
        return None
    tensors, info = found
    load_head_state(model, tensors)
    return info
