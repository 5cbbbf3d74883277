"""`wid speed`: side-by-side inference timing of model folders, its table, JSON and errors."""
import json

import pytest
import torch
from conftest import make_teacher

from wid.cli import main as wid_main
from wid.model_cost import encoder_flops
from wid.speed import SpeedError, format_table, measure_speed


@pytest.fixture(scope="module")
def small_and_large(tmp_path_factory):
    """Two models whose FLOPs differ about 2000-fold, so that any machine times the large one as slower."""
    root = tmp_path_factory.mktemp("speed")
    small = make_teacher(layers=1, heads=2, head_dim=4, intermediate=8, seed=1)
    large = make_teacher(layers=4, heads=8, head_dim=32, intermediate=1024, seed=2)
    small.save_pretrained(root / "small")
    large.save_pretrained(root / "large")
    return root / "small", root / "large"


def test_rows_follow_the_measured_times_and_the_flop_count(small_and_large):
    small, large = small_and_large
    # 8 × 64 tokens: enough work for the large model that per-call overheads do not decide the ratio on a loaded
    # machine (at 3 × 17 it measured 2.7× under a parallel test run)
    result = measure_speed([large, small], batch_size=8, seq_len=64, rounds=3, warmup=1, device="cpu")
    assert (result["batch_size"], result["seq_len"], result["rounds"], result["dtype"]) == (8, 64, 3, "float32")
    first, second = result["models"]
    assert (first["model"], second["model"]) == (str(large), str(small))
    assert first["speedup_vs_first"] == 1.0
    assert second["speedup_vs_first"] == pytest.approx(first["median_ms_per_batch"] / second["median_ms_per_batch"])
    assert second["speedup_vs_first"] > 3  # ~2000× fewer FLOPs
    for row in result["models"]:
        assert 0 < row["min_ms_per_batch"] <= row["median_ms_per_batch"]
        assert row["sequences_per_second"] == pytest.approx(8 / (row["median_ms_per_batch"] / 1e3))
        assert row["achieved_gflops_per_second"] == pytest.approx(row["gflops_per_sequence"] * row["sequences_per_second"])
    from transformers import AutoConfig, BertModel

    config = AutoConfig.from_pretrained(large)
    assert first["gflops_per_sequence"] == pytest.approx(encoder_flops(config, 64) / 1e9)
    assert first["parameters"] == sum(p.numel() for p in BertModel(config).parameters())  # AutoModel: encoder + pooler


def test_the_cli_prints_a_table_and_writes_the_json(small_and_large, tmp_path, capsys):
    small, large = small_and_large
    output = tmp_path / "out" / "speed.json"
    assert wid_main(["speed", str(large), str(small), "--batch_size", "2", "--seq_len", "9", "--rounds", "2",
                     "--warmup", "0", "--device", "cpu", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    written = json.loads(output.read_text())
    assert printed.strip() == format_table(written)
    assert [row["model"] for row in written["models"]] == [str(large), str(small)]
    assert "| speed-up vs first |" in printed and f"| {large} |" in printed
    assert [p.name for p in output.parent.iterdir()] == ["speed.json"]  # no temporary file left


def test_bfloat16_models_are_timed_in_bfloat16(small_and_large):
    result = measure_speed([small_and_large[0]], batch_size=2, seq_len=5, rounds=1, warmup=0, dtype="bfloat16", device="cpu")
    assert result["dtype"] == "bfloat16" and result["models"][0]["median_ms_per_batch"] > 0


@pytest.mark.parametrize("options, message", [
    (dict(seq_len=65), r"--seq_len 65 is longer than a model's max_position_embeddings \(64\); use --seq_len 64"),
    (dict(dtype="int8"), "--dtype int8 is not one of float32, bfloat16, float16"),
    (dict(rounds=0), "--rounds must be at least 1"),
])
def test_impossible_settings_are_refused(small_and_large, options, message):
    with pytest.raises(SpeedError, match=message):
        measure_speed(list(small_and_large), device="cpu", **options)


@pytest.mark.parametrize("device, message", [
    ("xyz", "--device xyz is not a device name; use cpu, cuda or cuda:N"),
    ("meta", "wid speed times on cpu or cuda devices"),
    ("mps", "wid speed times on cpu or cuda devices"),
])
def test_a_device_it_cannot_time_on_is_one_line(small_and_large, capsys, device, message):
    assert wid_main(["speed", str(small_and_large[0]), "--device", device]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]


def test_a_folder_that_is_not_a_model_is_refused(tmp_path, small_and_large, capsys):
    assert wid_main(["speed", str(small_and_large[0]), str(tmp_path), "--device", "cpu"]) == 2
    assert "has no config.json" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gives")
def test_cuda_without_a_gpu_says_to_use_the_cpu(small_and_large):
    with pytest.raises(SpeedError, match="torch sees no CUDA device; use --device cpu"):
        measure_speed([small_and_large[0]], device="cuda")
