"""`wid attention`: attention-map similarity of a student to its teacher, per layer and head."""
import json

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

import wid
from wid import WIDConfig
from wid.attention import (
    AttentionComparisonError,
    attention_maps,
    compare_attention,
    default_texts,
    main,
    match_heads,
    pairwise_similarity,
)

TEXTS = ["The teacher network shares its knowledge with a small student.",
         "Weights are inherited, not distilled through extra losses, and the student keeps the attention of its teacher.",
         "Short one."]
HEAD_DIM = 4


@pytest.fixture(scope="module")
def tokenizer():
    from wid.teachers import default_teacher_path

    return AutoTokenizer.from_pretrained(default_teacher_path())


def tiny_config(tokenizer, heads=3, layers=2, head_dim=HEAD_DIM):
    # a large init spread gives peaked (not near-uniform) attention, so unlike models really differ
    return BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=heads * head_dim, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=20, max_position_embeddings=64, initializer_range=0.5)


def save(model, path, tokenizer=None):
    model.eval().save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def random_model(path, tokenizer, seed=0, with_tokenizer=True, **shape):
    torch.manual_seed(seed)
    return save(BertForMaskedLM(tiny_config(tokenizer, **shape)), path, tokenizer if with_tokenizer else None)


@torch.no_grad()
def widen_with_extra_heads(student: BertModel, slots: list[int]) -> BertModel:
    """A teacher with twice the heads whose head `slots[i]` computes exactly the student's head i.

    The teacher's residual stream is the student's, twice over ([x, x]: LayerNorm statistics unchanged);
    its other heads have their own random queries and keys but write nothing to the stream.
    """
    config = student.config
    heads, d = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    wide = BertConfig(**{**config.to_dict(), "hidden_size": 2 * config.hidden_size, "num_attention_heads": 2 * heads})
    torch.manual_seed(123)
    teacher = BertModel(wide).eval()

    def stream_in(w):  # a layer reading [x, x] like the student's layer reads x
        return torch.cat([w / 2, w / 2], dim=1)

    def stream_out(t):  # a layer writing [y, y]
        return torch.cat([t, t], dim=0)

    s, t = student.state_dict(), teacher.state_dict()
    for name, value in s.items():
        if "embeddings" in name and "LayerNorm" not in name and "position_ids" not in name and "token_type_ids" not in name:
            t[name].copy_(torch.cat([value, value], dim=1))
        elif "LayerNorm" in name:
            t[name].copy_(stream_out(value))
    for layer in range(config.num_hidden_layers):
        prefix = f"encoder.layer.{layer}."
        for kind in ("query", "key", "value"):
            weight, bias = s[f"{prefix}attention.self.{kind}.weight"], s[f"{prefix}attention.self.{kind}.bias"]
            for head, slot in enumerate(slots):
                t[f"{prefix}attention.self.{kind}.weight"][slot * d:(slot + 1) * d] = stream_in(weight[head * d:(head + 1) * d])
                t[f"{prefix}attention.self.{kind}.bias"][slot * d:(slot + 1) * d] = bias[head * d:(head + 1) * d]
        out_weight = torch.zeros_like(t[f"{prefix}attention.output.dense.weight"])
        for head, slot in enumerate(slots):
            out_weight[:, slot * d:(slot + 1) * d] = stream_out(s[f"{prefix}attention.output.dense.weight"][:, head * d:(head + 1) * d])
        t[f"{prefix}attention.output.dense.weight"].copy_(out_weight)
        t[f"{prefix}attention.output.dense.bias"].copy_(stream_out(s[f"{prefix}attention.output.dense.bias"]))
        t[f"{prefix}intermediate.dense.weight"].copy_(stream_in(s[f"{prefix}intermediate.dense.weight"]))
        t[f"{prefix}intermediate.dense.bias"].copy_(s[f"{prefix}intermediate.dense.bias"])
        t[f"{prefix}output.dense.weight"].copy_(stream_out(s[f"{prefix}output.dense.weight"]))
        t[f"{prefix}output.dense.bias"].copy_(stream_out(s[f"{prefix}output.dense.bias"]))
    return teacher


def test_a_model_compared_with_itself_scores_perfectly(tmp_path, tokenizer):
    model = random_model(tmp_path / "m", tokenizer)
    report = compare_attention(model, model, texts=TEXTS)
    assert report["matching"] == "index" and report["layers"] == 2 and report["teacher_heads"] == report["student_heads"] == 3
    for layer in report["per_head"]:
        for index, head in enumerate(layer):
            assert head["teacher_head"] == index
            assert abs(head["kl"]) < 1e-5
            assert head["cosine"] > 1 - 1e-5
    assert report["uniform_mean_kl"] > 0.1 and report["uniform_mean_cosine"] < 0.95  # the baseline is a real contrast


def test_unrelated_models_score_clearly_worse(tmp_path, tokenizer):
    teacher = random_model(tmp_path / "t", tokenizer, seed=0)
    student = random_model(tmp_path / "s", tokenizer, seed=1)
    report = compare_attention(teacher, student, texts=TEXTS)
    assert report["mean_kl"] > 0.1
    assert report["mean_cosine"] < 0.9
    assert all(head["kl"] > 1e-3 for layer in report["per_head"] for head in layer)


def test_head_mode_student_is_matched_to_the_teacher_heads_it_kept(tmp_path, tokenizer):
    torch.manual_seed(5)
    student = BertModel(tiny_config(tokenizer, heads=3)).eval()
    slots = [4, 0, 3]  # student head i is teacher head slots[i]; teacher heads 1, 2, 5 are extra
    teacher = widen_with_extra_heads(student, slots)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():  # the construction itself: the teacher's stream is the student's, doubled
        narrow, wide = student(**batch).last_hidden_state, teacher(**batch).last_hidden_state
    torch.testing.assert_close(wide, torch.cat([narrow, narrow], dim=-1), atol=1e-4, rtol=1e-4)
    report = compare_attention(save(teacher, tmp_path / "t", tokenizer), save(student, tmp_path / "s", tokenizer), texts=TEXTS)
    assert report["matching"] == "assignment" and report["teacher_heads"] == 6 and report["student_heads"] == 3
    for layer in report["per_head"]:
        assert [head["teacher_head"] for head in layer] == slots
        assert all(head["kl"] < 1e-4 and head["cosine"] > 1 - 1e-4 for head in layer)


def test_assignment_undoes_a_permutation_of_heads():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.softmax(torch.randn(5, 7, 7, generator=generator) * 3, dim=-1)
    kept = [3, 0, 4]
    kl, cosine = pairwise_similarity(teacher, teacher[kept])
    assert match_heads(kl) == kept
    assert torch.allclose(kl[kept, range(3)], torch.zeros(3), atol=1e-6)
    assert torch.allclose(cosine[kept, range(3)], torch.ones(3), atol=1e-6)


def test_folded_head_strategy_student_gets_distinct_teacher_heads(tmp_path, tokenizer):
    torch.manual_seed(0)
    teacher = BertForMaskedLM(tiny_config(tokenizer, heads=3)).eval()
    save(teacher, tmp_path / "t", tokenizer)
    model = wid.attach(teacher, WIDConfig(target_hidden=2 * HEAD_DIM, target_intermediate=9, strategy="head"))
    wid.prune(model)
    student = save(wid.fold(model), tmp_path / "s", tokenizer)
    report = compare_attention(tmp_path / "t", student, texts=TEXTS)
    assert report["student_heads"] == 2 and report["matching"] == "assignment"
    for layer in report["per_head"]:
        matched = [head["teacher_head"] for head in layer]
        assert len(set(matched)) == 2 and all(0 <= j < 3 for j in matched)


def test_maps_cover_only_real_tokens(tmp_path, tokenizer):
    model = random_model(tmp_path / "m", tokenizer)
    maps = attention_maps(model, tokenizer, TEXTS, batch_size=2)
    lengths = [len(tokenizer(text)["input_ids"]) for text in TEXTS]
    assert maps.maps.shape == (2, 3, sum(lengths), max(lengths))
    assert maps.key_mask.sum(dim=1).tolist() == [n for n in lengths for _ in range(n)]
    assert torch.allclose(maps.maps.sum(dim=-1), torch.ones(2, 3, sum(lengths)), atol=1e-5)
    assert (maps.maps[..., ~maps.key_mask] == 0).all()


def test_student_without_tokenizer_uses_the_teachers(tmp_path, tokenizer):
    teacher = random_model(tmp_path / "t", tokenizer, seed=0)
    student = random_model(tmp_path / "s", tokenizer, seed=0, with_tokenizer=False)
    assert compare_attention(teacher, student, texts=TEXTS)["mean_kl"] < 1e-5


def test_layer_count_mismatch_is_a_one_line_error(tmp_path, tokenizer):
    teacher = random_model(tmp_path / "t", tokenizer, layers=2)
    student = random_model(tmp_path / "s", tokenizer, layers=1)
    with pytest.raises(AttentionComparisonError, match="2 layers but the student 1") as error:
        compare_attention(teacher, student, texts=TEXTS)
    assert "\n" not in str(error.value)


def test_unloadable_folder_is_named_in_the_error(tmp_path, tokenizer):
    teacher = random_model(tmp_path / "t", tokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AttentionComparisonError, match="student folder .*empty"):
        compare_attention(teacher, tmp_path / "empty", texts=TEXTS)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text((teacher / "config.json").read_text())
    with pytest.raises(AttentionComparisonError, match="teacher in .*broken"):
        compare_attention(tmp_path / "broken", teacher, texts=TEXTS)


def test_default_texts_are_a_fixed_spread_of_the_heldout_corpus():
    texts = default_texts(16)
    assert texts == default_texts(16)
    assert len(texts) == len(set(texts)) == 16 and all(texts)


def test_output_writes_a_png_and_leaves_no_temporary_file(tmp_path, tokenizer):
    teacher = random_model(tmp_path / "t", tokenizer, seed=0)
    student = random_model(tmp_path / "s", tokenizer, seed=1)
    figure = tmp_path / "figures" / "attention.png"
    report = compare_attention(teacher, student, texts=TEXTS, output=figure)
    assert report["figure"] == str(figure)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in figure.parent.iterdir()] == ["attention.png"]


@pytest.mark.parametrize("name, magic", [("attention.jpg", b"\xff\xd8\xff"), ("attention.pdf", b"%PDF"),
                                         ("attention.svg", b"<?xml")])
def test_the_figure_is_written_in_the_format_its_name_says(tmp_path, tokenizer, name, magic):
    teacher = random_model(tmp_path / "t", tokenizer, seed=0)
    figure = tmp_path / name
    compare_attention(teacher, teacher, texts=TEXTS[:2], output=figure)
    assert figure.read_bytes()[:len(magic)] == magic


def test_a_figure_name_of_another_format_is_refused_before_any_work(tmp_path, capsys):
    from wid.cli import main as wid

    assert wid(["attention", str(tmp_path / "t"), str(tmp_path / "s"), "--output", str(tmp_path / "figure.bmp")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "a figure is written as .png, .pdf, .svg, .jpg" in error[0]


def test_main_prints_the_table_and_writes_json(tmp_path, tokenizer, capsys):
    teacher = random_model(tmp_path / "t", tokenizer, seed=0)
    student = random_model(tmp_path / "s", tokenizer, seed=1)
    assert main([str(teacher), str(student), "--num_texts", "2", "--max_seq_length", "32", "--json", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["texts"] == 2 and "uniform attention" in printed and f"{report['mean_cosine']:.4f}" in printed
    cosine_row = next(line for line in printed.splitlines() if line.startswith("layer 1 "))  # first block: cosine
    expected = [f"{head['cosine']:.3f}" for head in report["per_head"][1]] + [f"{report['per_layer'][1]['cosine']:.3f}"]
    assert cosine_row.split()[2:] == expected
