"""Every encoder family WID supports: exact fold, students of the teacher's class that reload without wid,
the whole CLI per family, sentence-transformers in and out, and one-line refusals of the rest."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

import wid
from distill_fixtures import distill_argv, write_corpus
from family_fixtures import FAMILY_CASES, family_config, family_teacher, family_tokenizer, write_family_teacher
from wid.architecture import UnsupportedModelError, family_of
from wid.cli import main
from wid.sentence import embedding_dimension, st_modules

MODEL_TYPES = {"electra-projected": "electra"}


def _perturbed(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "compactor" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def _fixed_inputs(student, vocab, seed=3):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab, (3, 17), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 11:] = 0
    return wid.architecture.model_inputs(student, dict(input_ids=input_ids, attention_mask=attention_mask))


@pytest.mark.parametrize("case", FAMILY_CASES)
@pytest.mark.parametrize("strategy", ["dim", "head"])
@pytest.mark.parametrize("alignment", ["mask", "tied"])
@pytest.mark.parametrize("with_head", [True, False])
def test_fold_is_exact_and_of_the_teachers_class(case, strategy, alignment, with_head):
    teacher = family_teacher(case, vocab_size=97, with_head=with_head, seed=1)
    width = 6 if strategy == "dim" else 4 if case == "electra-projected" else 8  # whole heads of 4; ELECTRA's embeddings are 8 wide
    model = wid.attach(teacher, wid.WIDConfig(target_hidden=width, target_intermediate=9, strategy=strategy, alignment=alignment))
    wid.prune(_perturbed(model))
    student = wid.fold(model)
    assert type(student) is type(model) and type(student).__name__.endswith("ForMaskedLM")
    assert student.config.model_type == MODEL_TYPES.get(case, case)
    assert student.config.hidden_size == width
    assert wid.architecture.intermediate_size(student.config) == 9
    assert wid.verify_fold(model, student) < 1e-4
    encoder = wid.fold(model, with_head=False)
    assert type(encoder) is type(wid.architecture.base_model(model))


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_student_reloads_without_wid_in_a_fresh_process(case, tmp_path):
    model = wid.attach(family_teacher(case, vocab_size=97, with_head=False, seed=2), wid.WIDConfig(target_hidden=6, target_intermediate=9))
    wid.prune(_perturbed(model, seed=1))
    student = wid.fold(model)
    student.save_pretrained(tmp_path / "student")
    inputs = _fixed_inputs(student, 97)
    with torch.no_grad():
        expected = student(**inputs).logits
        hidden = wid.architecture.base_model(student)(**inputs).last_hidden_state
    torch.save(dict(inputs=inputs, logits=expected, hidden=hidden), tmp_path / "expected.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModel, AutoModelForMaskedLM\n"
        f"path = {str(tmp_path)!r}\n"
        "e = torch.load(path + '/expected.pt')\n"
        "m = AutoModelForMaskedLM.from_pretrained(path + '/student').eval()\n"
        "b = AutoModel.from_pretrained(path + '/student').eval()\n"
        "with torch.no_grad():\n"
        "    d1 = (m(**e['inputs']).logits - e['logits']).abs().max().item()\n"
        "    d2 = (b(**e['inputs']).last_hidden_state - e['hidden']).abs().max().item()\n"
        "assert 'wid' not in sys.modules\n"
        "print(type(m).__name__, d1, d2)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    name, logits_diff, hidden_diff = result.stdout.split()[-3:]
    assert name == type(student).__name__
    assert float(logits_diff) < 1e-5 and float(hidden_diff) < 1e-5


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_the_cli_runs_every_command_on_every_family(case, tmp_path, capsys):
    teacher = write_family_teacher(tmp_path / "teacher", case, with_head=case != "electra-projected")
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    assert main(["distill", *distill_argv(teacher, corpus, out), "--save_widths", "0.75"]) == 0
    summary = json.loads((out / "wid_summary.json").read_text())
    assert summary["max_logit_difference_fold"] < 1e-4
    assert summary["student_widths"] == {"hidden": 6, "heads": 3, "intermediate": 9, "layers": 2}
    assert summary["student_encoder_parameters"] < summary["teacher_encoder_parameters"]
    student_config = T.AutoConfig.from_pretrained(out)
    assert student_config.model_type == MODEL_TYPES.get(case, case)
    assert (out / "student-75pct" / "config.json").is_file()
    assert T.AutoConfig.from_pretrained(out / "student-75pct").hidden_size == 9
    checkpoint = out / "checkpoints" / "checkpoint-12"
    assert main(["export", str(checkpoint), str(tmp_path / "exported")]) == 0
    assert main(["verify", str(checkpoint), str(tmp_path / "exported")]) == 0
    assert main(["speed", str(teacher), str(out), "--batch_size", "2", "--seq_len", "16", "--rounds", "1", "--warmup", "0"]) == 0
    assert main(["attention", str(teacher), str(out), "--num_texts", "2", "--max_seq_length", "16"]) == 0
    capsys.readouterr()
    # resume from a middle checkpoint: the same run finishes again, and folds exactly
    assert main(["distill", *distill_argv(teacher, corpus, tmp_path / "resumed"),
                 "--resume_from_checkpoint", str(out / "checkpoints" / "checkpoint-6")]) == 0
    resumed = json.loads((tmp_path / "resumed" / "wid_summary.json").read_text())
    assert resumed["steps"] == 12 and resumed["max_logit_difference_fold"] < 1e-4


@pytest.mark.parametrize("case", ["roberta", "distilbert", "electra-projected"])
@pytest.mark.parametrize("method", ["kd", "mlm", "prune"])
def test_baselines_run_on_other_families(case, method, tmp_path):
    teacher = write_family_teacher(tmp_path / "teacher", case)
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / method
    assert main(["distill", *distill_argv(teacher, corpus, out), "--method", method, "--max_steps", "4"]) == 0
    student = T.AutoModelForMaskedLM.from_pretrained(out)
    assert student.config.hidden_size == 6 and family_of(student).name == family_of(T.AutoConfig.from_pretrained(teacher)).name


def test_evaluate_fine_tunes_a_distilbert_student(tmp_path):
    teacher = write_family_teacher(tmp_path / "teacher", "distilbert")
    corpus = write_corpus(tmp_path / "corpus.txt")
    assert main(["distill", *distill_argv(teacher, corpus, tmp_path / "run"), "--max_steps", "3"]) == 0
    rows = [f"the model learns {'well' if i % 2 else 'badly'} every step,{i % 2}" for i in range(24)]
    for name in ("train.csv", "dev.csv"):
        (tmp_path / name).write_text("sentence,label\n" + "\n".join(rows) + "\n")
    assert main(["evaluate", str(tmp_path / "run"), "--train_file", str(tmp_path / "train.csv"), "--validation_file",
                 str(tmp_path / "dev.csv"), "--num_train_epochs", "1", "--output_dir", str(tmp_path / "eval")]) == 0
    scores = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert 0.0 <= scores["accuracy"] <= 1.0


def test_electra_discriminator_gets_a_head_like_a_bare_encoder(tmp_path):
    tokenizer = family_tokenizer("electra-projected")
    config = family_config("electra-projected", len(tokenizer))
    torch.manual_seed(0)
    T.ElectraForPreTraining(config).save_pretrained(tmp_path / "discriminator")
    tokenizer.save_pretrained(tmp_path / "discriminator")
    from wid.distill import load_teacher

    model, _, has_head = load_teacher(str(tmp_path / "discriminator"))
    assert not has_head and isinstance(model, T.ElectraForMaskedLM)
    dense = model.generator_predictions.dense.weight  # the projection's pseudo-inverse: back to the embedding space
    projection = model.electra.embeddings_project.weight
    assert torch.allclose(dense @ projection, torch.eye(config.embedding_size), atol=1e-4)
    assert model.generator_lm_head.weight is model.electra.embeddings.word_embeddings.weight


def test_electra_student_as_wide_as_its_embeddings_is_refused():
    teacher = family_teacher("electra-projected", vocab_size=97)  # embedding_size 8, hidden 12
    with pytest.raises(ValueError, match="equals the teacher's embedding_size"):
        wid.attach(teacher, wid.WIDConfig(target_hidden=8, target_intermediate=9, strategy="head", target_heads=2))


@pytest.mark.parametrize("model_type", ["deberta-v2", "modernbert", "gpt2"])
def test_unsupported_families_get_one_line_naming_the_supported(model_type, tmp_path, capsys):
    config = T.AutoConfig.for_model(model_type)
    with pytest.raises(UnsupportedModelError, match="bert, roberta, xlm-roberta, camembert, electra, distilbert"):
        family_of(config)
    (tmp_path / "teacher").mkdir()
    config.save_pretrained(tmp_path / "teacher")
    (tmp_path / "teacher" / "model.safetensors").write_bytes(b"")
    corpus = write_corpus(tmp_path / "corpus.txt")
    assert main(["distill", *distill_argv(tmp_path / "teacher", corpus, tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and model_type in err[0] and "distilbert" in err[0]
    assert not (tmp_path / "out").exists()


# -- sentence-transformers in and out ------------------------------------------------------------------------


def _sentence_teacher(path, case="bert", extra_module=None):
    from sentence_transformers import SentenceTransformer


    models = st_modules()
    model_dir = write_family_teacher(path / "plain", case, with_head=False)
    transformer = models.Transformer(str(model_dir), max_seq_length=32)
    width = embedding_dimension(transformer)
    modules = [transformer, models.Pooling(width, pooling_mode="mean"), models.Normalize()]
    if extra_module == "Dense":
        modules.insert(2, models.Dense(width, 5))
    SentenceTransformer(modules=modules, device="cpu").save(str(path / "teacher"))
    return path / "teacher"


@pytest.mark.parametrize("case", ["bert", "roberta"])
def test_a_sentence_encoder_teacher_gives_a_sentence_encoder_student(case, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    teacher = _sentence_teacher(tmp_path, case)
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    assert main(["distill", *distill_argv(teacher, corpus, out)]) == 0
    encoder = SentenceTransformer(str(out), device="cpu")
    embeddings = encoder.encode(["the model learns", "a compact student keeps what matters"])
    assert embeddings.shape == (2, 6)
    assert abs(float((embeddings ** 2).sum(axis=1)[0]) - 1.0) < 1e-4  # the teacher's Normalize module came along
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    widths = [pooling[k] for k in ("word_embedding_dimension", "embedding_dimension") if k in pooling]
    assert widths and set(widths) == {6}  # whichever key this sentence-transformers version writes
    assert embedding_dimension(encoder) == 6
    assert T.AutoModel.from_pretrained(out).config.hidden_size == 6
    capsys.readouterr()
    texts = tmp_path / "texts.txt"
    write_corpus(texts, lines=12, seed=5)
    report_file = tmp_path / "similarity.json"
    assert main(["similarity", str(teacher), str(out), "--texts", str(texts), "--json", str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    assert report["num_texts"] == 12 and report["num_pairs"] == 66
    assert (report["teacher_dimension"], report["student_dimension"]) == (12, 6)
    assert -1.0 <= report["spearman"] <= 1.0 and report["mean_abs_cosine_difference"] >= 0
    assert "Spearman" in capsys.readouterr().out


def test_a_run_given_relative_paths_exports_the_same_student_from_another_directory(tmp_path, monkeypatch, capsys):
    """wid_run.json records the teacher and the corpus as absolute paths: `wid export` run elsewhere still finds the
    teacher's sentence-transformers modules and the corpus for --compensate on."""
    _sentence_teacher(tmp_path)
    write_corpus(tmp_path / "corpus.txt")
    monkeypatch.chdir(tmp_path)
    assert main(["distill", *distill_argv("teacher", "corpus.txt", "run")]) == 0
    record = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-12" / "wid_run.json").read_text())
    assert record["teacher"] == str(tmp_path / "teacher") and record["corpus"] == [str(tmp_path / "corpus.txt")]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    checkpoint = str(tmp_path / "run" / "checkpoints" / "checkpoint-12")
    for compensate in ("off", "on"):
        out = elsewhere / f"student-{compensate}"
        assert main(["export", checkpoint, str(out), "--compensate", compensate]) == 0
        assert json.loads((out / "modules.json").read_text())[0]["path"] == ""
        assert "notices" not in json.loads((out / "wid_summary.json").read_text())


def test_export_says_when_the_recorded_teacher_is_not_found(tmp_path, capsys):
    """A record that names no folder here (an older wid's relative path, a hub name): the student is written without
    sentence-transformers modules, and the report and stderr say so."""
    teacher = _sentence_teacher(tmp_path)
    corpus = write_corpus(tmp_path / "corpus.txt")
    assert main(["distill", *distill_argv(teacher, corpus, tmp_path / "run")]) == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-12"
    record = json.loads((checkpoint / "wid_run.json").read_text())
    record.update(teacher="teacher", corpus=["corpus.txt"])  # relative, as an older wid recorded them
    (checkpoint / "wid_run.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["export", str(checkpoint), str(tmp_path / "student")]) == 0
    assert "the run's teacher teacher is no folder here" in capsys.readouterr().err
    assert not (tmp_path / "student" / "modules.json").exists()
    assert json.loads((tmp_path / "student" / "wid_summary.json").read_text())["notices"]
    assert main(["export", str(checkpoint), str(tmp_path / "compensated"), "--compensate", "on"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "the run's corpus (wid_run.json) cannot be read from here" in error[0] and "--corpus" in error[0]
    assert not (tmp_path / "compensated").exists()


def test_similarity_of_a_model_with_itself_is_one(tmp_path):
    from wid.sentence import compare_sentence_encoders

    teacher = _sentence_teacher(tmp_path)
    report = compare_sentence_encoders(teacher, teacher, ["a b", "the model learns", "small dense weights", "english text"])
    assert report["spearman"] == pytest.approx(1.0) and report["mean_abs_cosine_difference"] < 1e-6
    repeated = compare_sentence_encoders(teacher, teacher, ["a b", "the model learns", "a b", "english text", "a b"])
    assert (repeated["num_texts"], repeated["num_pairs"]) == (3, 3)  # a repeated text is one text, not pairs of similarity 1


def test_sentence_modules_that_cannot_follow_the_cut_are_named(tmp_path):
    teacher = _sentence_teacher(tmp_path, extra_module="Dense")
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    assert main(["distill", *distill_argv(teacher, corpus, out)]) == 0
    summary = json.loads((out / "wid_summary.json").read_text())
    assert any("Dense" in notice for notice in summary["notices"])
    assert not (out / "modules.json").exists()
    assert T.AutoModel.from_pretrained(out).config.hidden_size == 6


def test_similarity_bad_input_is_one_line(tmp_path, capsys):
    assert main(["similarity", str(tmp_path / "missing"), str(tmp_path / "missing2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0]
    teacher = _sentence_teacher(tmp_path)
    capsys.readouterr()
    latin = tmp_path / "latin.txt"
    latin.write_bytes("une phrase\nle modèle apprend\n".encode("latin-1"))
    assert main(["similarity", str(teacher), str(teacher), "--texts", str(latin)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not UTF-8 (byte 0xe8 on line 2)" in err[0]


def test_the_built_in_teacher_gives_a_sentence_transformers_student(tmp_path):
    from sentence_transformers import SentenceTransformer

    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    assert main(["distill", "--corpus", str(corpus), "--output_dir", str(out), "--preset", "half", "--max_steps", "2",
                 "--w_step", "1", "--per_device_train_batch_size", "2", "--max_seq_length", "32", "--head_warmup_steps", "0",
                 "--save_steps", "100", "--disable_tqdm", "true"]) == 0
    width = T.AutoModel.from_pretrained(out).config.hidden_size
    assert width == 192
    assert SentenceTransformer(str(out), device="cpu").encode(["a sentence"]).shape == (1, width)


def test_an_older_sentence_transformers_layout_is_read_from_its_transformer_folder(tmp_path):
    import shutil

    from sentence_transformers import SentenceTransformer

    teacher = _sentence_teacher(tmp_path)
    old = tmp_path / "old-layout"
    (old / "0_Transformer").mkdir(parents=True)
    for item in teacher.iterdir():
        if item.is_file() and item.name not in ("modules.json", "config_sentence_transformers.json"):
            shutil.copy(item, old / "0_Transformer" / item.name)
    shutil.copytree(teacher / "1_Pooling", old / "1_Pooling")
    modules = json.loads((teacher / "modules.json").read_text())
    modules[0]["path"] = "0_Transformer"
    (old / "modules.json").write_text(json.dumps(modules))
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    assert main(["distill", *distill_argv(old, corpus, out)]) == 0
    assert json.loads((out / "modules.json").read_text())[0]["path"] == ""
    assert SentenceTransformer(str(out), device="cpu").encode(["the model"]).shape == (1, 6)


@pytest.mark.parametrize("case", ["roberta", "electra-projected", "distilbert"])
def test_the_compensated_cut_works_on_other_families(case, tmp_path):
    teacher = write_family_teacher(tmp_path / "teacher", case)
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    assert main(["distill", *distill_argv(teacher, corpus, out), "--recipe", "paper", "--compensate", "on"]) == 0
    summary = json.loads((out / "wid_summary.json").read_text())
    assert summary["compensation"]["applied"] and summary["compensation"]["linears_compensated"] > 0
    assert summary["max_logit_difference_fold"] < 1e-4
    assert main(["verify", str(out / "checkpoints" / "checkpoint-12"), str(out)]) == 0


def test_a_teacher_missing_encoder_weights_is_refused_not_trained_from_random(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    teacher = write_family_teacher(tmp_path / "teacher", "roberta")
    weights = load_file(str(teacher / "model.safetensors"))
    dropped = {k: v for k, v in weights.items() if "layer.1.attention.self.query" not in k}
    save_file(dropped, str(teacher / "model.safetensors"), metadata={"format": "pt"})
    corpus = write_corpus(tmp_path / "corpus.txt")
    capsys.readouterr()
    assert main(["distill", *distill_argv(teacher, corpus, tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lack part of the encoder" in err[0] and "layer.1.attention.self.query" in err[0]
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_residual_adds_are_fused_into_the_masked_layer_norm_where_the_family_has_output_blocks(case, monkeypatch):
    """BERT-style output blocks hand the residual to the LayerNorm kernel (one pass over the activations fewer);
    with masks active and compactors perturbed the result is the unfused LayerNorm(dense(h) + residual)."""
    from wid.compactors import ResidualNormBlock

    teacher = family_teacher(case, vocab_size=97, seed=2)
    model = _perturbed(wid.attach(teacher, wid.WIDConfig(target_hidden=6, target_intermediate=9)))
    wid.prune(model)
    model.eval()
    layers = wid.architecture.encoder_layers(model)
    fused = [module for layer in layers for module in layer.modules() if isinstance(module, ResidualNormBlock)]
    assert len(fused) == (0 if case == "distilbert" else 2 * len(layers))
    calls = []
    real = wid.compactors.wid_kernels.masked_layer_norm
    monkeypatch.setattr(wid.compactors.wid_kernels, "masked_layer_norm", lambda x, r, *a: calls.append(r is not None) or real(x, r, *a))
    inputs = _fixed_inputs(model, 97)
    with torch.no_grad():
        model(**inputs)
    assert sum(calls) == len(fused)
    for block in fused:
        residual = torch.randn(2, 5, block.dense.out_features)
        h = torch.randn(2, 5, block.dense.in_features)
        with torch.no_grad():
            unfused = block.LayerNorm(block.dense(h) + residual)
            torch.testing.assert_close(block(h, residual), unfused, rtol=0, atol=1e-5)
