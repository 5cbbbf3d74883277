"""Does the student attend like its teacher? The paper's attention analysis (WID_METHOD §1), as a tool.

WID trains without any attention loss, yet its students are reported to keep the teacher's attention
patterns. `compare_attention` measures that on a fixed text sample: for every layer and student head,
the mean KL(teacher ‖ student) over query rows and the mean cosine between attention rows, both over
real (non-padding) tokens only. A "dim" student keeps every head, so head i is compared with teacher
head i; a "head" student keeps fewer heads, so each student head is paired with the teacher head it
came from by an optimal one-to-one assignment (lowest total KL). Uniform attention is reported beside
the numbers as a baseline, so that a score can be read as "far better than attending to everything".

    wid attention TEACHER_DIR STUDENT_DIR [--output FIGURE.png] [--json REPORT.json]
"""
from __future__ import annotations

import argparse
import gzip
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from .architecture import family_of, max_positions, model_inputs
from .export import check_writable_folder, plain_model_config, quiet_transformers, write_json_atomically

DEFAULT_NUM_TEXTS = 16
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
TINY = 1e-12  # floor for probabilities under a log, so that an underflowed 0 gives a large KL, not inf


class AttentionComparisonError(ValueError):
    """Two models whose attention cannot be compared; the message (one line) says what to do."""


class AttentionMaps(NamedTuple):
    """Attention rows of every real query token of every text, stacked.

    maps: [layers, heads, rows, keys]; row r is one query token, its keys zero-padded to the longest text.
    key_mask: [rows, keys], True where the key is a real token of that row's text.
    """

    maps: torch.Tensor
    key_mask: torch.Tensor


def load_encoder(model_dir, role: str = "model"):
    """The encoder in `model_dir` (a base or masked-LM folder of a supported family), set up to return attentions."""
    from transformers import AutoModel

    path = Path(model_dir)
    config = plain_model_config(path, AttentionComparisonError, role)
    try:
        family_of(config)
    except ValueError as exc:
        raise AttentionComparisonError(f"the {role} in {path}: {exc}") from None
    try:
        with quiet_transformers():
            model = AutoModel.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - missing weights, unsupported architecture
        raise AttentionComparisonError(f"cannot load the {role} in {path} ({type(exc).__name__}); pass a folder written by save_pretrained (base or masked-LM model)") from None
    return model.eval()


def load_shared_tokenizer(teacher_dir, student_dir):
    """The student's tokenizer (else the teacher's); an error when both have one and they differ."""
    from transformers import AutoTokenizer

    tokenizers = {}
    for role, path in (("student", student_dir), ("teacher", teacher_dir)):
        if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
            continue  # AutoTokenizer would build an empty tokenizer from config.json alone
        try:
            with quiet_transformers():
                tokenizers[role] = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001 - broken tokenizer files
            raise AttentionComparisonError(f"cannot load the {role} tokenizer in {path} ({type(exc).__name__}); save a working tokenizer there") from None
    if not tokenizers:
        raise AttentionComparisonError(f"neither {student_dir} nor {teacher_dir} holds a tokenizer; save the teacher's tokenizer into the student folder")
    if len(tokenizers) == 2 and tokenizers["student"].get_vocab() != tokenizers["teacher"].get_vocab():
        raise AttentionComparisonError(f"the tokenizers of {teacher_dir} and {student_dir} differ; compare a student only with the teacher it came from")
    return tokenizers.get("student", tokenizers.get("teacher"))


def default_texts(num_texts: int = DEFAULT_NUM_TEXTS) -> list[str]:
    """`num_texts` paragraphs spread evenly over the shipped held-out corpus (the same ones every run)."""
    from .data import default_corpus_files

    path = default_corpus_files(heldout=True)[0]
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        lines = [line.strip() for line in handle if line.strip()]
    if num_texts < 1:
        raise AttentionComparisonError(f"num_texts is {num_texts}; pass at least 1")
    count = min(num_texts, len(lines))
    return [lines[i * len(lines) // count] for i in range(count)]


def _encoder_attentions(model, inputs) -> tuple:
    """Per-layer attentions of one batch, switching the model to eager attention for the call if needed."""
    previous = getattr(model.config, "_attn_implementation", None)
    switch = previous not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        attentions = model(**inputs, output_attentions=True).attentions
    finally:
        if switch:
            model.set_attn_implementation(previous)
    if not attentions:
        raise AttentionComparisonError(f"{type(model).__name__} returned no attentions; load it with attn_implementation=\"eager\"")
    return attentions


@torch.no_grad()
def attention_maps(model_dir_or_model, tokenizer, texts, max_seq_length: int = 128, batch_size: int = 8) -> AttentionMaps:
    """Attention of every layer and head over the real tokens of `texts` (see `AttentionMaps`)."""
    model = load_encoder(model_dir_or_model) if isinstance(model_dir_or_model, (str, os.PathLike)) else model_dir_or_model
    texts = list(texts)
    if not texts:
        raise AttentionComparisonError("no texts to run the model on; pass at least one non-empty text")
    max_seq_length = min(max_seq_length, max_positions(model.config) or max_seq_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows, lengths = [], []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_seq_length, return_tensors="pt")
            inputs = {key: value.to(device) for key, value in model_inputs(model, batch).items()}
            layers = torch.stack(_encoder_attentions(model, inputs), dim=1).float().cpu()  # [batch, layers, heads, q, k]
            for one, length in zip(layers, batch["attention_mask"].sum(dim=1).tolist()):
                rows.append(one[:, :, :length, :length])
                lengths.append(length)
    finally:
        model.train(was_training)
    keys = max(lengths)
    maps = torch.cat([torch.nn.functional.pad(r, (0, keys - r.shape[-1])) for r in rows], dim=2)
    key_mask = torch.cat([(torch.arange(keys) < n).expand(n, keys) for n in lengths])
    return AttentionMaps(maps, key_mask)


def pairwise_similarity(teacher_rows: torch.Tensor, student_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL, cosine), each [teacher heads, student heads]: means over rows of KL(teacher ‖ student) and cosine.

    Inputs are one layer's maps, [heads, rows, keys], with padded keys zero in both.
    """
    p, q = teacher_rows.double(), student_rows.double()
    rows = p.shape[1]
    entropy_term = (p * p.clamp_min(TINY).log()).sum(dim=(1, 2))  # Σ p log p per teacher head
    cross_term = torch.einsum("jrk,irk->ji", p, q.clamp_min(TINY).log())  # Σ p log q per pair
    kl = ((entropy_term[:, None] - cross_term) / rows).clamp_min(0.0)  # ≥ 0 up to rounding
    p_unit, q_unit = (m / m.norm(dim=-1, keepdim=True).clamp_min(TINY) for m in (p, q))
    cosine = torch.einsum("jrk,irk->ji", p_unit, q_unit) / rows
    return kl.float(), cosine.float()


def match_heads(kl: torch.Tensor) -> list[int]:
    """Teacher head of each student head: identity when the counts agree, else the lowest-KL assignment."""
    teacher_heads, student_heads = kl.shape
    if teacher_heads == student_heads:
        return list(range(student_heads))
    from scipy.optimize import linear_sum_assignment

    student_order, teacher_order = linear_sum_assignment(kl.T.numpy())
    matched = dict(zip(student_order.tolist(), teacher_order.tolist()))
    return [matched[i] for i in range(student_heads)]


def _check_comparable(teacher, student, teacher_dir, student_dir):
    t, s = teacher.config, student.config
    if t.num_hidden_layers != s.num_hidden_layers:
        raise AttentionComparisonError(f"the teacher has {t.num_hidden_layers} layers but the student {s.num_hidden_layers}; "
                                       "WID students keep the teacher's layers: pass the student made from this teacher")
    if s.num_attention_heads > t.num_attention_heads:
        raise AttentionComparisonError(f"the student {student_dir} has more heads ({s.num_attention_heads}) than the teacher {teacher_dir} "
                                       f"({t.num_attention_heads}); did you swap TEACHER_DIR and STUDENT_DIR?")
    if t.vocab_size != s.vocab_size:
        raise AttentionComparisonError(f"the teacher's vocabulary ({t.vocab_size}) differs from the student's ({s.vocab_size}); "
                                       "compare a student only with the teacher it came from")


def compare_attention(teacher_dir, student_dir, texts=None, output=None, max_seq_length: int = 128, num_texts: int = DEFAULT_NUM_TEXTS) -> dict:
    """Per-layer, per-head attention similarity of a student to its teacher (see the module docstring).

    `texts`: the sample (default: `num_texts` paragraphs of the shipped held-out corpus).
    `output`: a PNG path for a figure (heat-map plus example maps), written atomically.
    """
    teacher = load_encoder(teacher_dir, "teacher")
    student = load_encoder(student_dir, "student")
    _check_comparable(teacher, student, teacher_dir, student_dir)
    tokenizer = load_shared_tokenizer(teacher_dir, student_dir)
    texts = default_texts(num_texts) if texts is None else list(texts)
    teacher_maps = attention_maps(teacher, tokenizer, texts, max_seq_length)
    student_maps = attention_maps(student, tokenizer, texts, max_seq_length)
    key_mask = teacher_maps.key_mask
    uniform = key_mask.double() / key_mask.sum(dim=1, keepdim=True)
    per_head, per_layer, uniform_kl, uniform_cosine, matches = [], [], [], [], []
    for layer in range(teacher.config.num_hidden_layers):
        kl, cosine = pairwise_similarity(teacher_maps.maps[layer], student_maps.maps[layer])
        matched = match_heads(kl)
        matches.append(matched)
        heads = [{"teacher_head": j, "kl": kl[j, i].item(), "cosine": cosine[j, i].item()} for i, j in enumerate(matched)]
        per_head.append(heads)
        per_layer.append({key: sum(h[key] for h in heads) / len(heads) for key in ("kl", "cosine")})
        base_kl, base_cosine = pairwise_similarity(teacher_maps.maps[layer], uniform[None])
        uniform_kl.append(base_kl.mean().item())
        uniform_cosine.append(base_cosine.mean().item())
    report = {
        "teacher": str(teacher_dir),
        "student": str(student_dir),
        "layers": teacher.config.num_hidden_layers,
        "teacher_heads": teacher.config.num_attention_heads,
        "student_heads": student.config.num_attention_heads,
        "matching": "index" if student.config.num_attention_heads == teacher.config.num_attention_heads else "assignment",
        "texts": len(texts),
        "query_rows": int(key_mask.shape[0]),
        "per_head": per_head,
        "per_layer": per_layer,
        "mean_kl": sum(layer["kl"] for layer in per_layer) / len(per_layer),
        "mean_cosine": sum(layer["cosine"] for layer in per_layer) / len(per_layer),
        "uniform_mean_kl": sum(uniform_kl) / len(uniform_kl),
        "uniform_mean_cosine": sum(uniform_cosine) / len(uniform_cosine),
    }
    if output is not None:
        first_text = int(key_mask[0].sum())  # rows (and keys) of the first text
        write_figure(report, teacher_maps.maps[:, :, :first_text, :first_text], student_maps.maps[:, :, :first_text, :first_text], output)
        report["figure"] = str(output)
    return report


def write_figure(report: dict, teacher_example: torch.Tensor, student_example: torch.Tensor, output) -> Path:
    """A PNG: layer × student-head cosine heat-map, and teacher/student maps of one text for a few layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    layers, student_heads = report["layers"], report["student_heads"]
    examples = sorted({0, layers // 2, layers - 1})
    cosine = [[head["cosine"] for head in layer] for layer in report["per_head"]]
    figure = plt.figure(figsize=(max(6.0, 2.2 * len(examples) + 1), 4.0 + 0.3 * layers + 4.0), layout="constrained")
    grid = figure.add_gridspec(3, len(examples), height_ratios=[1.0 + 0.12 * layers, 1.0, 1.0])
    heat = figure.add_subplot(grid[0, :])
    image = heat.imshow(cosine, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for layer in range(layers):
        for i, head in enumerate(report["per_head"][layer]):
            label = f"{head['cosine']:.2f}" + (f"\nt{head['teacher_head']}" if report["matching"] == "assignment" else "")
            heat.text(i, layer, label, ha="center", va="center", fontsize=7, color="white" if head["cosine"] < 0.6 else "black")
    heat.set(xlabel="student head", ylabel="layer", xticks=range(student_heads), yticks=range(layers),
             title=f"attention cosine, student vs teacher (mean {report['mean_cosine']:.3f}, uniform {report['uniform_mean_cosine']:.3f})")
    figure.colorbar(image, ax=heat, shrink=0.8)
    for column, layer in enumerate(examples):
        teacher_head = report["per_head"][layer][0]["teacher_head"]
        pair = (("teacher", teacher_example, teacher_head), ("student", student_example, 0))
        scale = PowerNorm(gamma=0.5, vmin=0.0, vmax=max(float(maps[layer, head].max()) for _, maps, head in pair))  # faint rows stay visible
        for row, (who, maps, head) in enumerate(pair, start=1):
            axis = figure.add_subplot(grid[row, column])
            axis.imshow(maps[layer, head].numpy(), norm=scale, cmap="magma")
            axis.set_title(f"{who} layer {layer} head {head}", fontsize=8)
            axis.set_xticks([])
            axis.set_yticks([])
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    kind = figure_format(output)
    handle, tmp = tempfile.mkstemp(prefix=f".tmp-{output.stem}-", suffix=f".{kind}", dir=output.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            figure.savefig(stream, format=kind, dpi=110)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a figure is meant to be shared
        os.replace(tmp, output)
    finally:
        plt.close(figure)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return output


FIGURE_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")


def figure_format(output) -> str:
    """The figure's file format, from the name's extension (none: png); AttentionComparisonError for one matplotlib
    would not write, so the file is what its name says."""
    kind = Path(output).suffix.lower().lstrip(".") or "png"
    if kind not in FIGURE_FORMATS:
        raise AttentionComparisonError(f"--output {output}: a figure is written as {', '.join('.' + k for k in FIGURE_FORMATS)}; "
                                       "name the file with one of these extensions")
    return kind


def _matrix(title: str, report: dict, cell, mean=None) -> list[str]:
    """One layer × student-head block of the table; `cell(head) -> str` of width 7."""
    header = f"{title:<8s}" + "".join(f"{'h' + str(i):>7s}" for i in range(report["student_heads"])) + ("   mean" if mean else "")
    rows = [f"layer {layer:<2d}" + "".join(cell(h) for h in heads) + (f"{mean(report['per_layer'][layer]):7.3f}" if mean else "")
            for layer, heads in enumerate(report["per_head"])]
    return [header, *rows]


def format_report(report: dict) -> str:
    """A readable table: cosine and KL per layer × student head (and the matched teacher head), then the means."""
    assignment = report["matching"] == "assignment"
    lines = [
        (f"attention: teacher {report['teacher']} ({report['layers']} layers x {report['teacher_heads']} heads) vs "
         f"student {report['student']} ({report['student_heads']} heads, matched by {'assignment' if assignment else 'index'}); "
         f"{report['texts']} texts, {report['query_rows']} query rows"),
        "",
        *_matrix("cosine", report, lambda h: f"{h['cosine']:7.3f}", lambda m: m["cosine"]),
        "",
        *_matrix("KL(t||s)", report, lambda h: f"{h['kl']:7.3f}", lambda m: m["kl"]),
    ]
    if assignment:
        lines += ["", *_matrix("teacher", report, lambda h: f"{h['teacher_head']:7d}")]
    means = (f"mean cosine {report['mean_cosine']:.4f}, mean KL {report['mean_kl']:.4f} "
             f"(uniform attention: cosine {report['uniform_mean_cosine']:.4f}, KL {report['uniform_mean_kl']:.4f})")
    lines += ["", means]
    if "figure" in report:
        lines.append(f"figure written to {report['figure']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """`wid attention TEACHER_DIR STUDENT_DIR [--output FIGURE.png] [--json REPORT.json] ...`"""
    parser = argparse.ArgumentParser(prog="wid attention", description="compare a student's attention maps with its teacher's")
    parser.add_argument("teacher_dir")
    parser.add_argument("student_dir")
    parser.add_argument("--output", help="write the figure here (.png, .pdf, .svg or .jpg; heat-map of per-head similarity, example maps)")
    parser.add_argument("--json", help="write the full report as JSON here")
    parser.add_argument("--max_seq_length", type=int, default=128, help="tokens per text (default 128)")
    parser.add_argument("--num_texts", type=int, default=DEFAULT_NUM_TEXTS,
                        help=f"paragraphs of the shipped held-out corpus to run (default {DEFAULT_NUM_TEXTS})")
    args = parser.parse_args(argv)
    if args.max_seq_length < 2:
        raise AttentionComparisonError(f"--max_seq_length is {args.max_seq_length}; pass at least 2")
    if args.output is not None:
        figure_format(args.output)
    for target, flag in ((args.output, "--output"), (args.json, "--json")):
        if target is not None:  # before the computation, not after it
            check_writable_folder(Path(target).parent, AttentionComparisonError, f"folder of {flag}")
    report = compare_attention(args.teacher_dir, args.student_dir, output=args.output, max_seq_length=args.max_seq_length, num_texts=args.num_texts)
    if args.json:
        write_json_atomically(args.json, report)
    print(format_report(report))
    return 0
