"""A model folder without a usable tokenizer is refused with one line, by `wid distill` and `wid evaluate`."""
import pytest
from transformers import BertConfig, BertForMaskedLM

from wid.cli import main

from distill_fixtures import distill_argv, write_corpus


def _model_without_tokenizer(path):
    config = BertConfig(vocab_size=30522, hidden_size=12, num_hidden_layers=1, num_attention_heads=3,
                        intermediate_size=20, max_position_embeddings=64)
    BertForMaskedLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    base = tmp_path_factory.mktemp("tok")
    return dict(model=_model_without_tokenizer(base / "bare"), corpus=write_corpus(base / "corpus.txt"))


def test_distill_refuses_a_teacher_without_tokenizer_files(bare, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["distill", *distill_argv(bare["model"], bare["corpus"], out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "tokenizer" in error and "save_pretrained" in error and len(error.splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


def test_evaluate_refuses_a_model_without_tokenizer_files(bare, tmp_path, capsys):
    train = tmp_path / "t.csv"
    train.write_text("sentence,label\n" + "".join(f"good words {i},1\nbad words {i},0\n" for i in range(6)))
    code = main(["evaluate", str(bare["model"]), "--train_file", str(train), "--validation_file", str(train),
                 "--output_dir", str(tmp_path / "eval")])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert "tokenizer" in error and len(error.splitlines()) == 1
