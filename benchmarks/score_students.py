"""Score student folders the way benchmarks/quality_study.py scores its students, for students it did not train
(`wid export` of a checkpoint, with or without --compensate):

    python benchmarks/score_students.py STUDENT_DIR [MORE_DIRS ...] [--seed 42]

Prints one JSON line per student: held-out MLM loss on the shipped corpus' held-out split
(wid.distill.heldout_loss), output spread (wid.distill.representation_spread; divide by the teacher's) and
tweet_sentiment accuracy after fine-tuning with the study's settings (`wid evaluate`); also written to
STUDENT_DIR/../score-NAME.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))


def score(student: Path, seed: int, max_seq_length: int = 128) -> dict:
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from wid.data import build_mlm_dataset, mlm_collator
    from wid.distill import heldout_loss, representation_spread
    from wid.evaluate import evaluate_model

    model = AutoModelForMaskedLM.from_pretrained(student).eval()
    tokenizer = AutoTokenizer.from_pretrained(student)
    heldout = build_mlm_dataset(tokenizer, None, seq_len=max_seq_length, heldout=True)
    with torch.no_grad():
        loss, spread = heldout_loss(model, heldout, mlm_collator(tokenizer)), representation_spread(model, heldout)
    out = student.parent / f"eval-{student.name}"
    if not (out / "eval_results.json").exists():  # the study's evaluation settings (quality_study.py defaults)
        evaluate_model(str(student), task="tweet_sentiment", num_train_epochs=1.0, output_dir=out, max_train_samples=4000,
                       max_eval_samples=2000, max_seq_length=64, learning_rate=1e-4, seed=seed)
    accuracy = json.loads((out / "eval_results.json").read_text())["accuracy"]
    return dict(student=str(student), heldout_mlm_loss=loss, spread=spread, tweet_accuracy=accuracy, seed=seed)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("students", nargs="+", type=Path)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    for student in args.students:
        row = score(student, args.seed)
        print(json.dumps(row), flush=True)
        (student.parent / f"score-{student.name}.json").write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
