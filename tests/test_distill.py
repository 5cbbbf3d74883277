"""The distillation run end to end on a tiny teacher: CLI, student, errors, resume, NaN, widths."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments

from wid.cli import main
from wid.distill import DistillArguments, run_distillation
from wid.training import TrainingDivergedError

from distill_fixtures import distill_argv, write_corpus, write_teacher

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("run")
    return dict(
        teacher=write_teacher(base / "teacher"),
        encoder=write_teacher(base / "encoder", with_head=False),
        corpus=write_corpus(base / "corpus.txt"),
    )


def _parse(argv):
    return HfArgumentParser((DistillArguments, TrainingArguments)).parse_args_into_dataclasses(args=argv)


LOAD_STUDENT = """
import sys, torch
from transformers import AutoModelForMaskedLM, AutoModel
mlm = AutoModelForMaskedLM.from_pretrained(sys.argv[1])
enc = AutoModel.from_pretrained(sys.argv[1])
assert "wid" not in sys.modules
print(mlm.config.hidden_size, mlm.config.intermediate_size, type(enc).__name__)
"""


def test_distill_cli_writes_a_student_that_loads_without_wid(files, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["distill", *distill_argv(files["teacher"], files["corpus"], out)]) == 0
    printed = capsys.readouterr().out
    assert "WID distillation finished" in printed and "hidden 12 → 6" in printed
    summary = json.loads((out / "wid_summary.json").read_text())
    assert summary["student_widths"]["hidden"] == 6 and summary["student_widths"]["intermediate"] == 9
    assert summary["max_logit_difference_fold"] <= 1e-4
    assert summary["steps"] == 12 and summary["final_mlm_loss"] is not None
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", LOAD_STUDENT, str(out)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-3:] == ["6", "9", "BertModel"]


def test_a_teacher_without_mlm_head_is_warmed_up_first(files, tmp_path):
    args, targs = _parse(distill_argv(files["encoder"], files["corpus"], tmp_path / "s", "--head_warmup_steps", "4"))
    summary = run_distillation(args, targs)
    assert summary["head_warmup_steps"] == 4 and summary["head_warmup_final_loss"] is not None
    assert summary["teacher_mlm_head"].startswith("new") and "warmed up 4 steps" in summary["teacher_mlm_head"]
    # its checkpoints hold the encoder teacher's pooler: export and verify must still read them
    from wid.export import export_checkpoint, verify_student

    checkpoint = tmp_path / "s" / "checkpoints" / "checkpoint-12"
    report = export_checkpoint(checkpoint, tmp_path / "exported")
    assert report["hidden_size"] == 6 and report["max_logit_difference_after_pruning"] <= 1e-4
    assert verify_student(checkpoint, tmp_path / "exported")["max_logit_difference_after_pruning"] <= 1e-4


def test_non_empty_output_dir_is_refused(files, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["distill", *distill_argv(files["teacher"], files["corpus"], out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "--overwrite_output_dir" in error and "\n" not in error
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("change, fragment", [
    ({"--corpus": "missing.txt"}, "missing.txt"),
    ({"--teacher": "no/such/teacher"}, "cannot load the teacher"),
    ({"--target_hidden": "7"}, "use a multiple of 3"),
])
def test_bad_input_gives_one_line_errors(files, tmp_path, capsys, change, fragment):
    argv = distill_argv(files["teacher"], files["corpus"], tmp_path / "o")
    for flag, value in change.items():
        argv[argv.index(flag) + 1] = str(tmp_path / value) if value == "missing.txt" else value
    assert main(["distill", *argv]) == 2
    error = capsys.readouterr().err.strip()
    assert fragment in error and len(error.splitlines()) == 1


def test_a_teacher_of_an_unsupported_family_is_refused(files, tmp_path, capsys):
    teacher = tmp_path / "deberta"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps({"model_type": "deberta-v2", "hidden_size": 12, "num_attention_heads": 3,
                                                     "num_hidden_layers": 1, "intermediate_size": 20, "vocab_size": 50}))
    assert main(["distill", *distill_argv(teacher, files["corpus"], tmp_path / "o")]) == 2
    assert "model_type 'deberta-v2'" in capsys.readouterr().err


def test_export_and_verify_a_checkpoint(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", *distill_argv(files["teacher"], files["corpus"], out)]) == 0
    checkpoint = out / "checkpoints" / "checkpoint-12"
    assert main(["export", str(checkpoint), str(tmp_path / "exported")]) == 0
    capsys.readouterr()
    assert main(["verify", str(checkpoint), str(tmp_path / "exported")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_logit_difference_after_pruning"] <= 1e-4
    assert report["masked_entry_norm"] >= 0
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    written = load_file(str(out / "model.safetensors"))
    for name, tensor in written.items():
        torch.testing.assert_close(exported[name], tensor)


def test_unreadable_checkpoint_is_refused(tmp_path, capsys):
    broken = tmp_path / "checkpoint-3"
    broken.mkdir()
    assert main(["export", str(broken), str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
    (broken / "config.json").write_text(json.dumps({"model_type": "bert", "wid": {"target_hidden": 6}}))
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["export", str(broken), str(tmp_path / "x")]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert not (tmp_path / "x" / "config.json").exists()


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def _state(checkpoint):
    return load_file(str(checkpoint / "model.safetensors"))


def test_a_resumed_run_continues_as_if_it_had_not_stopped(files, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    run_distillation(*_parse(distill_argv(files["teacher"], files["corpus"], full)))
    run_distillation(*_parse(distill_argv(files["teacher"], files["corpus"], split)), callbacks=[StopAt(6)])
    assert not (split / "checkpoints" / "checkpoint-9").exists()
    resumed = distill_argv(files["teacher"], files["corpus"], split, "--resume_from_checkpoint", str(split / "checkpoints" / "checkpoint-6"))
    run_distillation(*_parse(resumed))
    a, b = _state(full / "checkpoints" / "checkpoint-12"), _state(split / "checkpoints" / "checkpoint-12")
    assert a.keys() == b.keys()
    for name in a:
        if name.startswith("wid_state."):
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


class PoisonAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.bert.encoder.layer[0].intermediate.dense.weight.fill_(float("nan"))
        return control


def test_a_nan_loss_stops_the_run_naming_the_last_checkpoint(files, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(TrainingDivergedError, match="checkpoint-3") as error:
        run_distillation(*_parse(distill_argv(files["teacher"], files["corpus"], out)), callbacks=[PoisonAt(4)])
    assert "\n" not in str(error.value)
    assert not (out / "config.json").exists()  # no student written


def test_save_widths_writes_students_along_the_way(files, tmp_path):
    out = tmp_path / "widths"
    summary = run_distillation(*_parse(distill_argv(files["teacher"], files["corpus"], out, "--save_widths", "0.75", "0.5")))
    assert set(summary["intermediate_students"]) == {0.75, 0.5}
    from transformers import AutoModelForMaskedLM

    student = AutoModelForMaskedLM.from_pretrained(summary["intermediate_students"][0.75])
    assert student.config.hidden_size <= 9


def test_a_resume_keeps_the_students_written_before_it(files, tmp_path):
    """Widths passed before the checkpoint were written then: a resume lists them, and never rewrites them at the
    narrower width the masks have now."""
    import shutil

    out = tmp_path / "widths"
    argv = distill_argv(files["teacher"], files["corpus"], out, "--save_widths", "0.75", "0.5")
    run_distillation(*_parse(argv))
    resumed = Path(shutil.copytree(out, tmp_path / "resumed"))
    before = {name: (resumed / name / "model.safetensors").read_bytes() for name in ("student-75pct", "student-50pct")}
    argv = distill_argv(files["teacher"], files["corpus"], resumed, "--save_widths", "0.75", "0.5", "--resume_from_checkpoint",
                        str(resumed / "checkpoints" / "checkpoint-6"))
    summary = run_distillation(*_parse(argv))
    assert summary["intermediate_students"] == {0.75: str(resumed / "student-75pct"), 0.5: str(resumed / "student-50pct")}
    assert {name: (resumed / name / "model.safetensors").read_bytes() for name in before} == before
    record = json.loads((resumed / "student-75pct" / "wid_summary.json").read_text())
    assert record["student_widths"]["hidden"] == json.loads((resumed / "student-75pct" / "config.json").read_text())["hidden_size"]


def test_checks_after_mixed_precision_training_run_in_fp32(files, tmp_path):
    """--bf16 wraps the model's forward in autocast; the fold check and the cut's cost after training must not run
    through it (they reported bf16 rounding, 7e-3, as the fold's error). The baselines share the unwrapping
    (training.trained_model)."""
    summary = run_distillation(*_parse(distill_argv(files["teacher"], files["corpus"], tmp_path / "bf16", "--bf16", "true",
                                                    "--use_cpu", "true")))
    assert summary["max_logit_difference_fold"] < 1e-5 and summary["max_logit_difference_to_trained"] < 1e-4


DDP_WORKER = ROOT / "tests" / "ddp_worker.py"


def test_two_ranks_hold_identical_masks_and_weights(files, tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", OMP_NUM_THREADS="1")
    # the encoder teacher (no MLM head, a pooler) also covers the head warm-up and unused-parameter handling under DDP
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", str(DDP_WORKER),
               str(files["encoder"]), str(files["corpus"]), str(tmp_path / "ddp")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["mask_updates"] > 0
    for name in ranks[0]["state"]:
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name


def test_info_reports_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "transformers" in out
    assert "reference  available" in out and "torch      available" in out
    assert "triton" in out and "cuda" in out


def test_info_takes_no_options(capsys):
    with pytest.raises(SystemExit) as stop:  # argparse: usage and the error on stderr, exit status 2
        main(["info", "--backend", "torch"])
    assert stop.value.code == 2 and "unrecognized arguments: --backend torch" in capsys.readouterr().err


def test_unknown_command_prints_usage(capsys):
    assert main(["distil"]) == 2
    assert "usage: wid" in capsys.readouterr().err


def test_representation_spread_is_zero_for_a_collapsed_model_and_reported():
    from datasets import Dataset

    from wid.distill import representation_spread

    from conftest import make_teacher

    model = make_teacher(vocab=40)
    generator = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(0, 40, (20, 9), generator=generator).tolist(),
                              "attention_mask": [[1] * 9] * 20})
    assert representation_spread(model, data) > 0.05
    with torch.no_grad():
        model.bert.encoder.layer[-1].output.LayerNorm.weight.zero_()  # every input now maps to LayerNorm's β
    assert representation_spread(model, data) < 1e-6
    assert representation_spread(model, data.select([0])) is None


def test_summary_reports_the_students_spread(files, tmp_path):
    args, targs = _parse(distill_argv(files["teacher"], files["corpus"], tmp_path / "s"))
    summary = run_distillation(args, targs)
    assert summary["representation_spread_vs_teacher"] > 0


def test_heldout_loss_is_the_cross_entropy_at_the_masked_positions():
    from datasets import Dataset
    from transformers import AutoTokenizer

    from wid.data import mlm_collator
    from wid.distill import heldout_loss
    from wid.teachers import default_teacher_path

    from conftest import make_teacher

    tokenizer = AutoTokenizer.from_pretrained(default_teacher_path())
    model = make_teacher(vocab=len(tokenizer))
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(1000, 2000, (21, 11), generator=generator)
    data = Dataset.from_dict({"input_ids": rows.tolist(), "special_tokens_mask": [[0] * 11] * 21})
    collator = mlm_collator(tokenizer)
    loss = heldout_loss(model, data, collator, batch_size=4, max_batches=3)
    torch.manual_seed(1234)  # heldout_loss's masking seed: the same batches, scored on the full logits
    total, count = 0.0, 0
    for start in range(0, 12, 4):
        batch = collator([data[i] for i in range(start, start + 4)])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"]).logits
        masked = batch["labels"] != -100
        total += float(torch.nn.functional.cross_entropy(logits[masked], batch["labels"][masked], reduction="sum"))
        count += int(masked.sum())
    assert count > 0 and loss == pytest.approx(total / count, rel=1e-5)


def test_a_run_under_torch_compile_trains_what_the_eager_run_trains(files, tmp_path):
    """`wid distill --torch_compile true` (Hugging Face's option; on a GPU with `--torch_compile_mode
    reduce-overhead` for CUDA graphs) really compiles the WID model and ends at the eager run's weights."""
    from torch._dynamo.utils import counters

    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run_distillation(*_parse(distill_argv(files["teacher"], files["corpus"], eager)))
    counters.clear()
    run_distillation(*_parse(distill_argv(files["teacher"], files["corpus"], compiled, "--torch_compile", "true",
                                          "--torch_compile_backend", "aot_eager")))
    assert counters["stats"]["unique_graphs"] >= 1
    a, b = _state(eager / "checkpoints" / "checkpoint-12"), _state(compiled / "checkpoints" / "checkpoint-12")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
