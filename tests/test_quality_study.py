"""The quality study end to end on a tiny teacher: every method distilled, scored, compared, tabulated."""
import csv
import json
import random

from benchmarks import quality_study

from distill_fixtures import WORDS, write_corpus, write_teacher


def _write_task(path, rows, seed):
    rng = random.Random(seed)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "label"])
        for _ in range(rows):
            label = rng.choice(["good", "bad"])
            writer.writerow([f"{label} " + " ".join(rng.choice(WORDS) for _ in range(6)), label])
    return path


def test_study_writes_a_row_per_model_and_resumes(tmp_path):
    teacher = write_teacher(tmp_path / "teacher")
    corpus = write_corpus(tmp_path / "corpus.txt")
    train, validation = _write_task(tmp_path / "train.csv", 40, 0), _write_task(tmp_path / "dev.csv", 16, 1)
    report = tmp_path / "QUALITY.md"
    argv = ["--output_dir", str(tmp_path / "study"), "--report", str(report), "--teacher", str(teacher), "--corpus", str(corpus),
            "--max_steps", "4", "--head_warmup_steps", "2", "--train_file", str(train), "--validation_file", str(validation),
            "--eval_train_samples", "40", "--eval_epochs", "1", "--eval_max_seq_length", "16", "--attention_texts", "2",
            "--attention_max_seq_length", "32", "--speed_batch_size", "2", "--speed_seq_len", "16", "--speed_rounds", "2",
            "--", "--max_seq_length", "32", "--per_device_train_batch_size", "4"]
    quality_study.main(argv)
    text = report.read_text()
    for label in ("teacher", "`--method wid`", "`--method kd`", "`--method mlm`", "`--method prune`"):
        assert sum(label in line for line in text.splitlines() if line.startswith("| ")) == 1, label
    rows = [line for line in text.splitlines() if line.startswith("| ") and "method" in line]
    params = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in rows}
    assert len(set(params.values())) == 1, "every method must produce the same student shape"
    header = next(line for line in text.splitlines() if line.startswith("| model |")).split("|")
    assert header[-3].strip() == "CPU sequences / s (batch 2)" and header[-2].strip() == "CPU speed-up"
    teacher_row = next(line for line in text.splitlines() if line.startswith("| teacher")).split("|")
    assert teacher_row[-2].strip() == "1.00×" and float(teacher_row[-3]) > 0
    for method in ("wid", "kd", "mlm", "prune"):
        summary = json.loads((tmp_path / "study" / method / "wid_summary.json").read_text())
        assert summary["method"] == method and summary["student_widths"]["hidden"] == 6
        scores = json.loads((tmp_path / "study" / "eval" / method / "eval_results.json").read_text())
        assert 0.0 <= scores["accuracy"] <= 1.0 and scores["eval_samples"] == 16
        assert (tmp_path / "study" / "attention" / f"{method}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second run reuses every finished step and rewrites only the results section
    report.write_text(text + "\n## Observations\n\nkept by hand\n")
    stamp = (tmp_path / "study" / "wid" / "wid_summary.json").stat().st_mtime_ns
    quality_study.main(argv)
    assert (tmp_path / "study" / "wid" / "wid_summary.json").stat().st_mtime_ns == stamp
    again = report.read_text()
    assert "kept by hand" in again and again.count("<!-- BEGIN results -->") == 1 and "## results" in again
