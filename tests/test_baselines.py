"""Baselines of WID's student shape and budget: the truncated teacher, MLM-only and KD training (`--method`)."""
import json

import pytest
import torch
from transformers import AutoModelForMaskedLM, TrainingArguments

from wid import WIDConfig
from wid.baselines import DistillationTrainer, truncated_student
from wid.cli import main

from conftest import make_teacher, random_batch
from distill_fixtures import distill_argv, write_corpus, write_teacher


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("baselines")
    return dict(teacher=write_teacher(base / "teacher"), corpus=write_corpus(base / "corpus.txt"))


def _config(teacher, **widths):
    return WIDConfig(**widths).for_teacher(teacher.config)


def test_truncated_student_is_the_teacher_cut_to_its_first_channels():
    teacher = make_teacher(layers=2, heads=3, head_dim=5, intermediate=17)
    student = truncated_student(teacher, _config(teacher, target_hidden=9, target_intermediate=7))
    t, s = teacher.bert, student.bert
    assert (s.config.hidden_size, s.config.intermediate_size, s.config.num_attention_heads) == (9, 7, 3)
    # dim mode: the hidden and attention groups keep the first 3 of every head-sized chunk of 5, the FFN its first 7
    kept = torch.cat([torch.arange(h * 5, h * 5 + 3) for h in range(3)])
    torch.testing.assert_close(s.embeddings.word_embeddings.weight, t.embeddings.word_embeddings.weight[:, kept])
    for layer in range(2):
        t_layer, s_layer = t.encoder.layer[layer], s.encoder.layer[layer]
        torch.testing.assert_close(s_layer.intermediate.dense.weight, t_layer.intermediate.dense.weight[:7][:, kept])
        torch.testing.assert_close(s_layer.output.dense.bias, t_layer.output.dense.bias[kept])
        torch.testing.assert_close(s_layer.attention.self.value.weight, t_layer.attention.self.value.weight[kept][:, kept])
    assert teacher.config.hidden_size == 15 and not hasattr(teacher, "wid_state"), "the teacher must be left as it was"


def test_truncated_student_in_head_mode_keeps_the_first_heads():
    teacher = make_teacher(layers=1, heads=4, head_dim=3, intermediate=11)
    config = _config(teacher, strategy="head", target_hidden=6, target_heads=2, target_intermediate=6)
    student = truncated_student(teacher, config)
    assert student.config.num_attention_heads == 2 and student.config.hidden_size == 6
    torch.testing.assert_close(student.bert.encoder.layer[0].attention.self.key.weight,
                               teacher.bert.encoder.layer[0].attention.self.key.weight[:6, :6])


def _kd_trainer(tmp_path, student, teacher, alpha, temperature=2.0):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    return DistillationTrainer(model=student, args=args, teacher=teacher, alpha=alpha, temperature=temperature)


def _masked_inputs(vocab):
    input_ids, attention_mask = random_batch(vocab, batch=2, seq_len=9)
    labels = torch.full_like(input_ids, -100)
    labels[:, 2] = input_ids[:, 2]
    labels[0, 5] = input_ids[0, 5]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def test_kd_loss_is_mlm_plus_temperature_scaled_kl(tmp_path):
    teacher = make_teacher(seed=0)
    student = make_teacher(seed=1)
    inputs = _masked_inputs(teacher.config.vocab_size)
    positions = inputs["labels"] != -100
    with torch.no_grad():
        s_logits = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[positions]
        t_logits = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[positions]
    mlm = torch.nn.functional.cross_entropy(s_logits, inputs["labels"][positions])
    p_t = torch.softmax(t_logits / 3.0, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s_logits / 3.0, -1))).sum(-1).mean()
    trainer = _kd_trainer(tmp_path, student, teacher, alpha=0.25, temperature=3.0)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(inputs))
    torch.testing.assert_close(loss, 0.25 * 9.0 * kl + 0.75 * mlm, rtol=1e-5, atol=1e-6)
    assert kl > 1e-3, "teacher and student must differ for this test to mean anything"


def test_kd_against_itself_is_the_mlm_loss_scaled(tmp_path):
    teacher = make_teacher(seed=0)
    student = make_teacher(seed=0)
    inputs = _masked_inputs(teacher.config.vocab_size)
    trainer = _kd_trainer(tmp_path, student, teacher, alpha=0.5)
    with torch.no_grad():
        kd = trainer.compute_loss(trainer.model, dict(inputs))
        trainer.alpha = 0.0
        mlm = trainer.compute_loss(trainer.model, dict(inputs))
    torch.testing.assert_close(kd, 0.5 * mlm)


def test_kd_logs_its_mlm_part_beside_the_objective(tmp_path):
    """`mlm_loss` in the logs (and the summary's final_mlm_loss) is the cross-entropy alone, averaged over the
    micro-batches since the last log, comparable with the other methods' loss; `kd_loss` is the T²-scaled KL."""
    teacher, student = make_teacher(seed=0), make_teacher(seed=1)
    for module in student.modules():  # training mode (the parts are counted only there) without dropout's noise
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    trainer = _kd_trainer(tmp_path, student, teacher, alpha=0.5, temperature=2.0)
    trainer.model.train()
    first, second = _masked_inputs(teacher.config.vocab_size), _masked_inputs(teacher.config.vocab_size)
    second["labels"][1, 7] = second["input_ids"][1, 7]
    objectives, mlms = [], []
    with torch.no_grad():
        for inputs in (first, second):
            objectives.append(float(trainer.compute_loss(trainer.model, dict(inputs))))
            trainer.alpha = 0.0
            trainer.model.eval()
            mlms.append(float(trainer.compute_loss(trainer.model, dict(inputs))))
            trainer.model.train()
            trainer.alpha = 0.5
    trainer.log({"loss": sum(objectives) / 2})
    logged = trainer.state.log_history[-1]
    assert logged["mlm_loss"] == pytest.approx(sum(mlms) / 2, rel=1e-5)
    assert logged["kd_loss"] == pytest.approx(sum(2 * o - m for o, m in zip(objectives, mlms)) / 2, rel=1e-4)
    assert trainer._parts is None


def test_kd_rejects_bad_weights(tmp_path):
    with pytest.raises(ValueError, match="kd_alpha"):
        _kd_trainer(tmp_path, make_teacher(), make_teacher(), alpha=1.5)


@pytest.mark.parametrize("method", ["prune", "mlm", "kd"])
def test_method_writes_a_student_of_the_wid_shape(files, tmp_path, capsys, method):
    out = tmp_path / method
    assert main(["distill", *distill_argv(files["teacher"], files["corpus"], out), "--method", method,
                 "--learning_rate", "1e-3", "--max_steps", "4"]) == 0
    assert f"baseline '{method}' finished" in capsys.readouterr().out
    summary = json.loads((out / "wid_summary.json").read_text())
    assert summary["method"] == method
    assert summary["student_widths"]["hidden"] == 6 and summary["student_widths"]["intermediate"] == 9
    assert summary["steps"] == (0 if method == "prune" else 4)
    student = AutoModelForMaskedLM.from_pretrained(out)
    teacher = AutoModelForMaskedLM.from_pretrained(files["teacher"])
    truncated = truncated_student(teacher, _config(teacher, target_hidden=6, target_intermediate=9))
    moved = (student.bert.encoder.layer[0].intermediate.dense.weight - truncated.bert.encoder.layer[0].intermediate.dense.weight).abs().max()
    if method == "prune":
        assert moved == 0
    else:
        assert moved > 0, "training must change the truncated teacher's weights"
        assert summary["final_mlm_loss"] is not None
        if method == "kd":  # the objective, with its KD term, is reported as such, not as the MLM loss
            assert summary["final_training_objective"] != summary["final_mlm_loss"]
        assert summary["max_grad_norm"] == 1.0  # clipped as the Trainer does, as in README's comparison
        # its checkpoints hold the plain student already: wid export says so instead of "not a wid distill checkpoint"
        capsys.readouterr()
        assert main(["export", str(out / "checkpoints" / "checkpoint-4"), str(tmp_path / "exported")]) == 2
        error = capsys.readouterr().err.strip()
        assert f"is a checkpoint of a --method {method} run: its model already is a plain student" in error
        assert len(error.splitlines()) == 1 and not (tmp_path / "exported").exists()


@pytest.mark.parametrize("extra, fragment", [
    (["--method", "bert-of-theseus"], "--method"),
    (["--method", "kd", "--save_widths", "0.5"], "--save_widths needs --method wid"),
])
def test_bad_method_options_fail_in_one_line(files, tmp_path, capsys, extra, fragment):
    out = tmp_path / "bad"
    assert main(["distill", *distill_argv(files["teacher"], files["corpus"], out), *extra]) == 2
    error = capsys.readouterr().err.strip()
    assert fragment in error and "\n" not in error
    assert not out.exists() or not any(out.iterdir())
