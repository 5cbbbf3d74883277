"""The run's training settings follow the authors: no clipping unless asked, a 1% warm-up that is a ratio
on every transformers version, the summary's penalty diagnostics, and MLM heads that belong to their teacher."""
import json
from pathlib import Path

import pytest
import torch
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments

from wid.cli import main
from wid.distill import DistillArguments, format_summary, run_distillation
from wid.mlm_head import read_head, save_head, teacher_fingerprint

from distill_fixtures import distill_argv, write_corpus, write_teacher


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("faithful")
    return dict(teacher=write_teacher(base / "teacher"), corpus=write_corpus(base / "corpus.txt"),
                encoder_a=write_teacher(base / "encoder_a", with_head=False, seed=1),
                encoder_b=write_teacher(base / "encoder_b", with_head=False, seed=2))


class Recorder(TrainerCallback):
    """The compactor learning rate of every optimizer step and whether the Trainer clipped."""

    def __init__(self):
        self.lrs, self.clip = [], None

    def on_train_begin(self, args, state, control, **kwargs):
        self.clip = args.max_grad_norm

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(next(g["lr"] for g in optimizer.param_groups if g.get("name") == "compactors"))


def _run(argv, callbacks=()):
    parser = HfArgumentParser((DistillArguments, TrainingArguments))
    args, targs = parser.parse_args_into_dataclasses(args=argv)
    return run_distillation(args, targs, callbacks=callbacks)


def test_the_cli_leaves_clipping_to_the_recipe_unless_asked(files, tmp_path, monkeypatch):
    """No clipping with the paper recipe (the authors'), 1.0 with the short one, the given value otherwise."""
    from wid.distill import CLIP_BY_RECIPE

    seen = {}
    import wid.distill

    real = wid.distill.run_distillation

    def spy(args, training_args, callbacks=()):
        seen["max_grad_norm"] = training_args.max_grad_norm
        return real(args, training_args, callbacks)

    monkeypatch.setattr(wid.distill, "run_distillation", spy)
    assert main(["distill", *distill_argv(files["teacher"], files["corpus"], tmp_path / "a"), "--recipe", "paper"]) == 0
    assert seen["max_grad_norm"] == CLIP_BY_RECIPE
    summary = json.loads((tmp_path / "a" / "wid_summary.json").read_text())
    assert summary["max_grad_norm"] == 0.0 and summary["update_rule"] == "authors" and summary["recipe"] == "paper"
    assert main(["distill", *distill_argv(files["teacher"], files["corpus"], tmp_path / "s")]) == 0
    summary = json.loads((tmp_path / "s" / "wid_summary.json").read_text())
    assert summary["recipe"] == "short" and summary["max_grad_norm"] == 1.0
    assert main(["distill", *distill_argv(files["teacher"], files["corpus"], tmp_path / "b"), "--max_grad_norm", "0.5"]) == 0
    assert seen["max_grad_norm"] == 0.5
    assert json.loads((tmp_path / "b" / "wid_summary.json").read_text())["max_grad_norm"] == 0.5


def test_the_warm_up_is_one_percent_of_the_run_as_a_ratio(files, tmp_path):
    recorder = Recorder()
    argv = distill_argv(files["teacher"], files["corpus"], tmp_path / "s", "--max_steps", "200", "--w_step", "20",
                        "--save_steps", "1000", "--logging_steps", "100")
    _run(argv, callbacks=[recorder])
    # 200 steps: ceil(0.01·200) = 2 warm-up steps: lr·0, lr·1/2, then linear decay from lr over the other 198
    assert recorder.lrs[:3] == pytest.approx([0.0, 0.005, 0.01])
    assert recorder.lrs[100] == pytest.approx(0.01 * (200 - 100) / 198)


def test_the_summary_reports_the_penalty_diagnostics(files, tmp_path):
    from wid.training import compactor_lr_after

    summary = _run(distill_argv(files["teacher"], files["corpus"], tmp_path / "s", "--recipe", "paper"))
    assert 0 < summary["masked_compactor_fraction_at_cut"] < 1.5
    from wid import WIDConfig

    config = WIDConfig.from_dict(summary["wid_config"])
    # target at update 4 of w_step 1 (mlm/intermediate updates 4), 12 steps: steps 5..12 at lr·λ(4..11)
    assert summary["compactor_lr_after_target"] == pytest.approx(compactor_lr_after(config, 12, 4))
    assert summary["compactor_lr_after_target"] == pytest.approx(0.01 * sum((12 - k) / 11 for k in range(4, 12)))
    assert any("cumulative compactor learning rate" in n for n in summary["notices"])


def test_a_cached_head_warm_up_is_never_applied_to_another_teacher(files, tmp_path):
    a = _run(distill_argv(files["encoder_a"], files["corpus"], tmp_path / "a", "--head_warmup_steps", "3", "--method", "prune"))
    again = _run(distill_argv(files["encoder_a"], files["corpus"], tmp_path / "a2", "--head_warmup_steps", "3", "--method", "prune"))
    b = _run(distill_argv(files["encoder_b"], files["corpus"], tmp_path / "b", "--head_warmup_steps", "3", "--method", "prune"))
    assert "cached" not in a["teacher_mlm_head"] and "cached" in again["teacher_mlm_head"]
    assert "cached" not in b["teacher_mlm_head"]  # the same settings, another teacher: its own warm-up
    assert b["checkpoints_dir"] is None and not (tmp_path / "b" / "checkpoints").exists()  # prune saves none; no empty folder
    assert again["teacher_heldout_mlm_loss"] == a["teacher_heldout_mlm_loss"]
    from safetensors.torch import load_file

    student_b = load_file(str(tmp_path / "b" / "model.safetensors"))
    teacher_b = load_file(str(Path(files["encoder_b"]) / "model.safetensors"))
    word = next(k for k in teacher_b if k.endswith("word_embeddings.weight"))
    student_word = next(k for k in student_b if k.endswith("word_embeddings.weight"))
    # the prune baseline keeps teacher B's embeddings (at the kept channels), never teacher A's
    teacher_a = load_file(str(Path(files["encoder_a"]) / "model.safetensors"))
    kept = student_b[student_word].shape[1]
    rows = student_b[student_word][:5]
    assert any(torch.allclose(rows[:, j], teacher_b[word][:5, i]) for j in range(kept) for i in range(teacher_b[word].shape[1]))
    assert not any(torch.allclose(rows[:, j], teacher_a[word][:5, i]) for j in range(kept) for i in range(teacher_a[word].shape[1]))


def test_a_cached_head_warm_up_is_never_applied_with_another_tokenizer(files, tmp_path):
    """The same weights beside another tokenizer (here: cased) read the corpus as other token ids: their own warm-up."""
    import shutil

    _run(distill_argv(files["encoder_a"], files["corpus"], tmp_path / "a", "--head_warmup_steps", "3", "--method", "prune"))
    cased = Path(shutil.copytree(files["encoder_a"], tmp_path / "cased"))
    settings = json.loads((cased / "tokenizer_config.json").read_text())
    (cased / "tokenizer_config.json").write_text(json.dumps({**settings, "do_lower_case": False}))
    other = _run(distill_argv(cased, files["corpus"], tmp_path / "b", "--head_warmup_steps", "3", "--method", "prune"))
    assert "cached" not in other["teacher_mlm_head"]
    again = _run(distill_argv(cased, files["corpus"], tmp_path / "c", "--head_warmup_steps", "3", "--method", "prune"))
    assert "cached" in again["teacher_mlm_head"]


def test_a_saved_head_is_read_only_for_the_teacher_it_was_trained_on(files, tmp_path):
    from transformers import BertModel

    from wid.architecture import ensure_mlm_head

    model = ensure_mlm_head(BertModel.from_pretrained(files["encoder_a"]))
    fingerprint = teacher_fingerprint(files["encoder_a"])
    assert fingerprint and fingerprint != teacher_fingerprint(files["encoder_b"])
    save_head(model, tmp_path / "head.safetensors", fingerprint, {"note": "test"})
    assert read_head(tmp_path / "head.safetensors", fingerprint)[1] == {"note": "test"}
    assert read_head(tmp_path / "head.safetensors", teacher_fingerprint(files["encoder_b"])) is None
    assert read_head(tmp_path / "missing.safetensors", fingerprint) is None


def test_the_built_in_teacher_gets_its_shipped_head_and_an_informative_mlm_loss():
    """The shipped head belongs to the installed all-MiniLM-L6-v2 and its held-out MLM loss, measured as
    `wid distill` measures it, is the one recorded with it and clearly below the unigram model's."""
    from wid.data import build_mlm_dataset, mlm_collator
    from wid.distill import heldout_loss, load_teacher
    from wid.mlm_head import load_shipped_head
    from wid.teachers import DEFAULT_TEACHER_NAME, default_teacher_path

    model, tokenizer, has_head = load_teacher(default_teacher_path())
    assert not has_head  # a sentence encoder: the head comes from wid
    info = load_shipped_head(model, default_teacher_path(), DEFAULT_TEACHER_NAME)
    assert info is not None, "wid/heads/ has no head for the installed teacher: run scripts/train_default_head.py"
    heldout = build_mlm_dataset(tokenizer, None, heldout=True)
    loss = heldout_loss(model, heldout, mlm_collator(tokenizer))
    assert loss == pytest.approx(info["heldout_mlm_loss"], abs=2e-3)
    assert loss < info["unigram_heldout_mlm_loss"] - 0.5


def test_a_run_that_saves_no_checkpoints_names_no_checkpoints_folder(files, tmp_path):
    summary = _run(distill_argv(files["teacher"], files["corpus"], tmp_path / "run", "--save_strategy", "no"))
    assert summary["checkpoints_dir"] is None and not (tmp_path / "run" / "checkpoints").exists()
    assert "checkpoints" not in format_summary(summary)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_teacher_saved_in_half_precision_trains_with_fp32_master_weights(files, tmp_path, dtype):
    """transformers 5 loads a checkpoint in its saved dtype: the run's weights would be bf16/fp16, where the teacher's
    1e-6 steps round away. The run loads fp32 (its --bf16 is autocast) and writes an fp32 student."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from wid.distill import load_teacher

    half = tmp_path / "half"
    AutoModelForMaskedLM.from_pretrained(files["teacher"]).to(dtype).save_pretrained(half)
    AutoTokenizer.from_pretrained(files["teacher"]).save_pretrained(half)
    assert AutoModelForMaskedLM.from_pretrained(half).dtype == dtype  # what a plain load gives
    model, _, _ = load_teacher(str(half))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    _run(distill_argv(half, files["corpus"], tmp_path / "run"))
    assert AutoModelForMaskedLM.from_pretrained(tmp_path / "run").dtype == torch.float32
