"""Compensation of the cut (wid.compensate): the student equals the compensated trained model, is closer to the
trained model than the plain cut, and every command that folds or re-checks a student knows about it."""
import copy
import json
import random

import pytest
import torch

import wid
from wid import WIDConfig
from wid.cli import main
from wid.compensate import DEFAULT_COMPENSATE, InputStatistics, fold_compensated, needs_compensation
from wid.export import fold_trained
from wid.masks import apply_schedule

from conftest import make_teacher, perturb, random_shapes
from distill_fixtures import distill_argv, write_corpus, write_teacher


def _batches(vocab, count, seed, batch=8, seq_len=13):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        input_ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
        attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
        attention_mask[0, seq_len // 2:] = 0
        out.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return out


def _trained_at_target(shape, strategy, alignment, seed=0, **teacher_extra):
    """A compactor model with its masks at the target and masked entries that still hold weight (no zeroing)."""
    rng = random.Random(seed + shape["vocab"])
    if strategy == "dim":
        hidden = shape["heads"] * rng.randint(1, shape["head_dim"] - 1)
    else:
        hidden = shape["head_dim"] * rng.randint(1, shape["heads"] - 1)
    config = WIDConfig(target_hidden=hidden, target_intermediate=rng.randint(1, shape["intermediate"] - 1), strategy=strategy,
                       alignment=alignment)
    model = wid.attach(make_teacher(**shape, seed=seed, **teacher_extra), config)
    perturb(model, scale=0.15, seed=seed + 1)
    state = model.wid_state
    apply_schedule(model, state.config.mask_updates_to_target(state.dims))
    return model


CASES = [(shape, strategy, alignment) for shape, (strategy, alignment) in
         zip(random_shapes(8, seed=77), [("dim", "mask"), ("head", "mask"), ("dim", "tied"), ("head", "tied")] * 2)]


@pytest.mark.parametrize("shape, strategy, alignment", CASES)
def test_compensated_student_equals_the_compensated_model_and_is_closer_to_the_trained_one(shape, strategy, alignment):
    model = _trained_at_target(dict(shape, heads=max(shape["heads"], 2), head_dim=max(shape["head_dim"], 2)), strategy, alignment)
    assert needs_compensation(model)
    calibration, evaluation = _batches(model.config.vocab_size, 8, seed=1), _batches(model.config.vocab_size, 2, seed=2)
    student, difference, report = fold_compensated(model, calibration, evaluation)
    assert difference <= 1e-4  # the fold of the compensated model is exact
    assert report["linears_compensated"] > 0 and report["calibration_tokens"] == 8 * (8 * 13 - (13 - 13 // 2))
    assert report["kl_to_trained_compensated"] < report["kl_to_trained_plain_cut"]
    assert student.config.hidden_size == model.wid_state.config.target_hidden


def test_the_compensation_is_not_a_plain_fold():
    """A check that could not fail otherwise: the compensated student differs from the plain cut, and the plain
    fold check (against the zeroed model) would reject it."""
    model = _trained_at_target(dict(layers=2, heads=3, head_dim=4, intermediate=19, vocab=53), "dim", "mask")
    plain_model = copy.deepcopy(model)
    compensated, _, _ = fold_compensated(model, _batches(53, 4, seed=1))
    wid.masks.finalize(plain_model)
    plain = wid.fold(plain_model)
    weight = "bert.encoder.layer.0.output.dense.weight"
    assert not torch.allclose(compensated.state_dict()[weight], plain.state_dict()[weight])
    assert wid.verify_fold(plain_model, plain) <= 1e-4 < wid.verify_fold(plain_model, compensated)


def test_the_least_squares_fit_recovers_a_linear_dependence():
    generator = torch.Generator().manual_seed(0)
    kept_part = torch.randn(4000, 5, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 2, 0.5, 3, 1], dtype=torch.float64)
    fit = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    offset = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    removed_part = kept_part @ fit.t() + offset + 1e-3 * torch.randn(4000, 3, generator=generator, dtype=torch.float64)
    x = torch.empty(4000, 8, dtype=torch.float64)
    keep, cut = torch.tensor([0, 2, 3, 5, 7]), torch.tensor([1, 4, 6])
    x[:, keep], x[:, cut] = kept_part, removed_part
    statistics = InputStatistics(keep, 8)
    for rows in x.split(700):  # in pieces, as batches arrive
        statistics.add(rows.float())
    got_fit, got_offset = statistics.predictor(cut, damping=1e-6)
    assert torch.allclose(got_fit, fit, atol=2e-3) and torch.allclose(got_offset, offset, atol=5e-3)
    mean_fit, mean_offset = statistics.predictor(cut, damping=float("inf"))
    assert mean_fit.abs().max() == 0 and torch.allclose(mean_offset, x[:, cut].mean(0), atol=1e-5)


def test_a_decoder_tied_to_the_embeddings_stays_tied():
    """When the plain student's decoder is its word embeddings, the compensation keeps the tie (bias part only)."""
    config = WIDConfig(target_hidden=8, target_intermediate=9, strategy="head")  # H and M keep the same channels
    model = wid.attach(make_teacher(tie_word_embeddings=True), config)
    with torch.no_grad():  # the FFN and attention move, the hidden and MLM compactors stay the identity: a tie-keeping fold
        for name, param in model.named_parameters():
            if ".layer." in name and "compactor" not in name:
                param.add_(torch.randn_like(param) * 0.2)
        for name, param in model.named_parameters():
            if "LayerNorm" in name and "compactor" not in name:
                param.add_(torch.randn_like(param) * 0.1)
    state = model.wid_state
    apply_schedule(model, state.config.mask_updates_to_target(state.dims))
    plain_model = copy.deepcopy(model)
    wid.masks.finalize(plain_model)
    assert wid.fold(plain_model).config.tie_word_embeddings
    student, difference, report = fold_compensated(model, _batches(53, 4, seed=1))
    assert student.config.tie_word_embeddings
    assert student.cls.predictions.decoder.weight.data_ptr() == student.bert.embeddings.word_embeddings.weight.data_ptr()
    assert difference <= 1e-4 and report["linears_compensated"] > 0


@pytest.mark.parametrize("sequences, evaluated", [(40, 8), (100, 32), (32, 0)])
def test_the_kl_is_measured_on_sequences_the_calibration_did_not_see(sequences, evaluated):
    from wid.compensate import calibration_source

    dataset = [{"input_ids": torch.full((5,), i)} for i in range(sequences)]
    calibration, evaluation = calibration_source(dataset, batches=2)()
    seen = {int(row[0]) for batch in calibration for row in batch["input_ids"]}
    measured = [int(row[0]) for batch in evaluation for row in batch["input_ids"]]
    assert len(seen) == 32 and len(measured) == evaluated and not seen & set(measured)


def test_a_corpus_used_up_by_the_calibration_says_the_kl_was_not_measured():
    from wid.distill import compensation_line

    model = _trained_at_target(dict(layers=1, heads=2, head_dim=3, intermediate=11, vocab=41), "dim", "mask")
    _, _, report = fold_compensated(model, _batches(41, 2, seed=1), [])
    assert report["kl_to_trained_compensated"] is None and report["kl_evaluation_sequences"] == 0
    assert "not measured" in compensation_line(report)


def test_an_exact_cut_reads_no_calibration_data():
    model = _trained_at_target(dict(layers=1, heads=2, head_dim=3, intermediate=11, vocab=41), "dim", "mask")
    wid.prune(model)  # masked entries exactly zero
    assert not needs_compensation(model)

    def calibration():
        raise AssertionError("no calibration is needed for an exact cut")

    student, _, difference, report, _ = fold_trained(model, calibration)
    assert difference <= 1e-4 and report["applied"] is False and "exact" in report["reason"]


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    """A tiny run of the paper recipe: its masked entries are not zero at the cut, so the compensation has work."""
    base = tmp_path_factory.mktemp("compensate")
    teacher, corpus = write_teacher(base / "teacher"), write_corpus(base / "corpus.txt")
    assert main(["distill", *distill_argv(teacher, corpus, base / "run", "--recipe", "paper", "--compensate", "on",
                                          "--calibration_batches", "2")]) == 0
    return dict(base=base, run=base / "run", checkpoint=base / "run" / "checkpoints" / "checkpoint-12", corpus=corpus)


def test_distill_compensates_the_cut_and_says_so(paper_run, capsys):
    summary = json.loads((paper_run["run"] / "wid_summary.json").read_text())
    compensation = summary["compensation"]
    assert summary["compensate"] == "on" and compensation["applied"] is True
    assert compensation["fold_check_against"] == "the compensated trained model"
    assert summary["max_logit_difference_fold"] <= 1e-4
    assert compensation["kl_to_trained_compensated"] < compensation["kl_to_trained_plain_cut"]
    assert compensation["calibration_batches"] == 2 and compensation["corpus"] == [str(paper_run["corpus"])]
    assert main(["verify", str(paper_run["checkpoint"]), str(paper_run["run"])]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["matches"] and report["compared_against"] == "the compensated trained model"


def test_export_compensates_when_asked(paper_run, capsys):
    on, off, default = (paper_run["base"] / name for name in ("on", "off", "default"))
    assert main(["export", str(paper_run["checkpoint"]), str(on), "--compensate", "on", "--calibration_batches", "2"]) == 0
    on_report = json.loads(capsys.readouterr().out)
    assert main(["export", str(paper_run["checkpoint"]), str(off), "--compensate", "off"]) == 0
    off_report = json.loads(capsys.readouterr().out)
    assert on_report["compensation"]["applied"] and off_report["compensation"] is None
    assert main(["export", str(paper_run["checkpoint"]), str(default)]) == 0
    assert json.loads(capsys.readouterr().out)["compensate"] == DEFAULT_COMPENSATE
    assert on_report["max_logit_difference_after_pruning"] <= 1e-4 and off_report["max_logit_difference_after_pruning"] <= 1e-4
    for student in (on, off):  # each matches its own target
        assert main(["verify", str(paper_run["checkpoint"]), str(student)]) == 0
        capsys.readouterr()
    from safetensors.torch import load_file

    name = "bert.encoder.layer.0.output.dense.weight"
    assert not torch.equal(load_file(on / "model.safetensors")[name], load_file(off / "model.safetensors")[name])


def test_a_compensation_on_a_relative_corpus_verifies_from_anywhere(paper_run, capsys, monkeypatch):
    """The student records its calibration corpus as an absolute path: `wid verify` elsewhere redoes the same one."""
    monkeypatch.chdir(paper_run["corpus"].parent)
    student = paper_run["base"] / "relative"
    assert main(["export", str(paper_run["checkpoint"]), str(student), "--compensate", "on", "--calibration_batches", "2",
                 "--corpus", paper_run["corpus"].name]) == 0
    assert json.loads(capsys.readouterr().out)["compensation"]["corpus"] == [str(paper_run["corpus"])]
    elsewhere = paper_run["base"] / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / paper_run["corpus"].name).write_text("another text entirely, which must not be read\n" * 50)
    monkeypatch.chdir(elsewhere)
    assert main(["verify", str(paper_run["checkpoint"]), str(student)]) == 0
    assert json.loads(capsys.readouterr().out)["matches"]


@pytest.mark.parametrize("argv, message", [
    (["--compensate", "maybe"], "--compensate on or --compensate off"),
    (["--calibration_batches", "0"], "--calibration_batches must be at least 1"),
])
def test_bad_compensation_options_get_one_line(tmp_path, capsys, argv, message):
    teacher, corpus = write_teacher(tmp_path / "teacher"), write_corpus(tmp_path / "corpus.txt")
    capsys.readouterr()
    assert main(["distill", *distill_argv(teacher, corpus, tmp_path / "out", *argv)]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_verify_says_when_the_calibration_corpus_has_changed_since_the_export(paper_run, tmp_path, capsys):
    """A compensated student is checked by computing its compensation again from the recorded corpus: when that text has
    changed, the report says so instead of a bare 'does not match'."""
    import shutil

    corpus = shutil.copy(paper_run["corpus"], tmp_path / "calibration.txt")
    student = tmp_path / "student"
    assert main(["export", str(paper_run["checkpoint"]), str(student), "--compensate", "on", "--calibration_batches", "2",
                 "--corpus", str(corpus)]) == 0
    assert len(json.loads(capsys.readouterr().out)["compensation"]["corpus_fingerprint"]) == 64
    assert main(["verify", str(paper_run["checkpoint"]), str(student)]) == 0
    assert "notices" not in json.loads(capsys.readouterr().out)
    write_corpus(tmp_path / "calibration.txt", seed=5)  # same name, other text
    assert main(["verify", str(paper_run["checkpoint"]), str(student)]) == 1  # another calibration, another compensation
    captured = capsys.readouterr()
    assert any("has changed since the student was written" in notice for notice in json.loads(captured.out)["notices"])
    assert "does not match" in captured.err and "has changed since the student was written" in captured.err
