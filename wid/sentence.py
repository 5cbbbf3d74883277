"""sentence-transformers in and out: a student of a sentence encoder is a sentence encoder too.

A teacher folder with `modules.json` (e.g. the built-in all-MiniLM-L6-v2) is a sentence-transformers model:
Transformer → Pooling (→ Normalize). Its student folder gets the same modules, with the pooling config at the
student's width, so `SentenceTransformer(student_dir).encode(...)` works as `AutoModel.from_pretrained` does.
Modules that read the hidden channels with weights of their own (Dense, LayerNorm, …) cannot follow the cut:
the student is then written as a plain model and the run says so.

`compare_sentence_encoders` (`wid similarity`) shows what the compression cost a sentence encoder: the
Spearman correlation, over all pairs of held-out texts, of the teacher's and the student's cosine
similarities (1: the student ranks every pair as the teacher does).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

MODULES_FILE = "modules.json"
SETTINGS_FILES = ("sentence_bert_config.json", "config_sentence_transformers.json")
FOLLOWS_THE_CUT = ("Transformer", "Pooling", "Normalize")  # modules without weights over the hidden channels
DEFAULT_NUM_TEXTS = 256


class SentenceEncoderError(ValueError):
    """Bad input for the sentence-encoder comparison."""


def sentence_modules(model_dir) -> list[dict] | None:
    """The modules.json entries of a local sentence-transformers folder; None for a plain model or a hub name."""
    path = Path(str(model_dir)) / MODULES_FILE
    if not path.is_file():
        return None
    try:
        modules = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return modules if isinstance(modules, list) else None


def _kind(module: dict) -> str:
    return str(module.get("type", "")).rsplit(".", 1)[-1]


def encoder_folder(model_dir) -> str:
    """Where a folder's Hugging Face model lives: the folder itself, or the Transformer module's subfolder of an
    older sentence-transformers layout (`0_Transformer/`)."""
    for module in sentence_modules(model_dir) or ():
        folder = module.get("path") or ""
        if _kind(module) == "Transformer" and folder and (Path(str(model_dir)) / folder / "config.json").is_file():
            return str(Path(str(model_dir)) / folder)
    return str(model_dir) if isinstance(model_dir, Path) else model_dir


def sentence_gap(teacher_dir) -> str | None:
    """Why a student of this sentence-encoder teacher cannot be a sentence-transformers model; None when it can
    (or when the teacher is not one)."""
    modules = sentence_modules(teacher_dir)
    if modules is None:
        return None
    other = [_kind(m) for m in modules if _kind(m) not in FOLLOWS_THE_CUT]
    if other:
        return (f"the teacher's sentence-transformers modules {', '.join(other)} hold weights over the hidden channels the cut "
                "removes, so the student is written as a plain model (load it with AutoModel; add your own pooling)")
    return None


def write_sentence_files(teacher_dir, student_dir, hidden_size: int) -> bool:
    """Give `student_dir` the teacher's sentence-transformers modules at the student's width; True if written."""
    modules = sentence_modules(teacher_dir)
    if modules is None or sentence_gap(teacher_dir) is not None:
        return False
    teacher_dir, student_dir = Path(teacher_dir), Path(student_dir)
    encoder_dir = Path(encoder_folder(teacher_dir))
    for module in modules:
        if _kind(module) == "Transformer":
            module["path"] = ""  # the student's weights and tokenizer live at the root of its folder
    (student_dir / MODULES_FILE).write_text(json.dumps(modules, indent=2) + "\n")
    for name in SETTINGS_FILES:
        for source in (teacher_dir / name, encoder_dir / name):
            if source.is_file():
                shutil.copyfile(source, student_dir / name)
                break
    for module in modules:
        folder = module.get("path") or ""
        if not folder:
            continue
        target = student_dir / folder
        target.mkdir(parents=True, exist_ok=True)
        source = teacher_dir / folder
        if _kind(module) == "Pooling":
            config = json.loads((source / "config.json").read_text()) if (source / "config.json").is_file() else {}
            # sentence-transformers < 5 names the width word_embedding_dimension, later ones embedding_dimension:
            # set the one the teacher wrote (the older when neither), so the student reports its own width
            width_keys = [k for k in ("word_embedding_dimension", "embedding_dimension") if k in config]
            for key in width_keys or ["word_embedding_dimension"]:
                config[key] = hidden_size
            config.setdefault("pooling_mode_mean_tokens", True)
            (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        elif source.is_dir():
            for item in source.iterdir():
                if item.is_file():
                    shutil.copyfile(item, target / item.name)
    return True


def st_modules():
    """sentence-transformers' module classes (Transformer, Pooling, Dense, Normalize): `sentence_transformer.modules`
    from 6.3 on, where the older `sentence_transformers.models` still works but warns."""
    try:
        from sentence_transformers.sentence_transformer import modules
    except ImportError:
        from sentence_transformers import models as modules
    return modules


def embedding_dimension(module) -> int:
    """A module's output width under either name sentence-transformers has given the method (renamed in 6.3)."""
    method = getattr(module, "get_embedding_dimension", None)
    if method is None:
        method = getattr(module, "get_sentence_embedding_dimension", None) or module.get_word_embedding_dimension
    return method()


def load_sentence_encoder(model_dir, device: str = "cpu"):
    """A SentenceTransformer of the folder: its own modules, or mean pooling over a plain model's last hidden state."""
    from sentence_transformers import SentenceTransformer

    models = st_modules()

    from .export import plain_model_config, quiet_transformers

    plain_model_config(model_dir, SentenceEncoderError)
    try:
        with quiet_transformers():
            if sentence_modules(model_dir) is not None:  # compared in fp32, whatever dtype the folder was saved in
                return SentenceTransformer(str(model_dir), device=device).float()
            transformer = models.Transformer(str(model_dir))
            pooling = models.Pooling(embedding_dimension(transformer), pooling_mode="mean")
            return SentenceTransformer(modules=[transformer, pooling], device=device).float()
    except Exception as exc:  # noqa: BLE001 - missing weights or tokenizer, unsupported architecture
        reason = (str(exc).strip().splitlines() or [""])[0][:160]
        raise SentenceEncoderError(f"cannot load {model_dir} as a sentence encoder ({type(exc).__name__}: {reason}); pass a "
                                   "model folder with weights and a tokenizer") from None


def read_texts(files) -> list[str]:
    """Non-empty lines of text files, one text each."""
    from .data import read_utf8_text

    texts = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise SentenceEncoderError(f"--texts {name} is not a file; pass text files with one text per line")
        texts += [line.strip() for line in read_utf8_text(path, SentenceEncoderError, "--texts").splitlines() if line.strip()]
    return texts


def compare_sentence_encoders(teacher_dir, student_dir, texts=None, num_texts: int = DEFAULT_NUM_TEXTS,
                              batch_size: int = 32, device: str = "cpu") -> dict:
    """How closely the student's sentence similarities follow the teacher's on `texts` (default: `num_texts`
    paragraphs of the shipped held-out corpus). Both encode the same texts; every pair's cosine similarity is
    compared (Spearman and Pearson correlation, mean absolute difference)."""
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    from .attention import default_texts

    if num_texts < 3:
        raise SentenceEncoderError(f"--num_texts is {num_texts}; pass at least 3 (pairs of texts are compared)")
    texts = list(texts) if texts is not None else default_texts(num_texts)
    texts = list(dict.fromkeys(texts))[:num_texts]  # a repeated text would add pairs of similarity 1 to both sides
    if len(texts) < 3:
        raise SentenceEncoderError(f"only {len(texts)} texts to compare; give at least 3 non-empty lines")
    similarities, dimensions = {}, {}
    for role, path in (("teacher", teacher_dir), ("student", student_dir)):
        encoder = load_sentence_encoder(path, device)
        embeddings = encoder.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                                    show_progress_bar=False).astype(np.float64)
        dimensions[role] = int(embeddings.shape[1])
        upper = np.triu_indices(len(texts), k=1)
        similarities[role] = (embeddings @ embeddings.T)[upper]
    teacher, student = similarities["teacher"], similarities["student"]
    return {
        "teacher": str(teacher_dir),
        "student": str(student_dir),
        "num_texts": len(texts),
        "num_pairs": int(len(teacher)),
        "teacher_dimension": dimensions["teacher"],
        "student_dimension": dimensions["student"],
        "spearman": float(spearmanr(teacher, student)[0]),
        "pearson": float(pearsonr(teacher, student)[0]),
        "mean_abs_cosine_difference": float(np.abs(teacher - student).mean()),
    }


def format_report(report: dict) -> str:
    return (f"sentence similarities of {report['num_pairs']} pairs of {report['num_texts']} texts: student vs teacher Spearman "
            f"{report['spearman']:.4f}, Pearson {report['pearson']:.4f}, mean |cosine difference| "
            f"{report['mean_abs_cosine_difference']:.4f} (dimension {report['teacher_dimension']} → {report['student_dimension']})")


def main(argv=None) -> int:
    """`wid similarity TEACHER_DIR STUDENT_DIR [--texts FILE ...] [--num_texts N] [--json REPORT.json]`"""
    from .export import check_writable_folder, write_json_atomically

    parser = argparse.ArgumentParser(prog="wid similarity",
                                     description="compare a student with its teacher as sentence encoders (pairwise cosine similarities)")
    parser.add_argument("teacher_dir")
    parser.add_argument("student_dir")
    parser.add_argument("--texts", nargs="+", help="text files, one text per line (default: the shipped held-out corpus)")
    parser.add_argument("--num_texts", type=int, default=DEFAULT_NUM_TEXTS, help=f"texts to encode (default {DEFAULT_NUM_TEXTS})")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--json", help="write the report as JSON here")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise SentenceEncoderError(f"--batch_size is {args.batch_size}; pass at least 1")
    if args.json:
        check_writable_folder(Path(args.json).parent, SentenceEncoderError, "folder of --json")
    texts = read_texts(args.texts) if args.texts else None
    report = compare_sentence_encoders(args.teacher_dir, args.student_dir, texts, args.num_texts, args.batch_size, args.device)
    if args.json:
        write_json_atomically(args.json, report)
    print(format_report(report))
    return 0
