"""`--recipe`: the short recipe makes the cut exact at any budget (masked entries shrink linearly to exactly 0 by
the last step, beside the penalty); `auto` takes the paper recipe only when the penalty can finish by itself."""
import json

import pytest
import torch

import wid
from wid import WIDConfig
from wid.architecture import TeacherDims
from wid.cli import main
from wid.masks import masked_compactor_fraction, scale_masked_entries
from wid.training import choose_recipe, shrink_factor

from conftest import make_teacher, perturb
from distill_fixtures import distill_argv, write_corpus, write_teacher

MINILM = TeacherDims(layers=6, hidden=384, heads=12, head_dim=32, intermediate=1536, vocab=30522)
BERT_BASE = TeacherDims(layers=12, hidden=768, heads=12, head_dim=64, intermediate=3072, vocab=30522)


@pytest.mark.parametrize("start, end", [(0, 1), (3, 17), (96, 160), (159, 160)])
def test_the_shrink_falls_linearly_to_exactly_zero_at_the_end(start, end):
    value = 1.0
    for step in range(start, end + 1):
        value *= shrink_factor(step, end)
        assert value == pytest.approx((end - step) / (end - start + 1), abs=1e-12)
    assert value == 0.0
    assert shrink_factor(end + 5, end) == 0.0


def test_scale_masked_entries_touches_only_masked_entries():
    model = wid.attach(make_teacher(), WIDConfig(target_hidden=6, target_intermediate=9))
    perturb(model)
    wid.apply_schedule(model, 100)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    fraction = masked_compactor_fraction(model)
    scale_masked_entries(model, 0.25)
    assert masked_compactor_fraction(model) == pytest.approx(0.25 * fraction, rel=1e-5)
    masked = {item.name for item in wid.masked_parameters(model)}
    for name, param in model.named_parameters():
        if name not in masked:
            assert torch.equal(param, before[name]), name
    item = next(i for i in wid.masked_parameters(model) if i.is_compactor)
    keep = wid.masks.broadcast_keep(model.wid_state.keep(item.group), item.param, item.dim).expand_as(item.param)
    assert torch.equal(item.param[keep], before[item.name][keep])
    assert torch.allclose(item.param[~keep], 0.25 * before[item.name][~keep])


def test_auto_takes_the_paper_recipe_at_the_paper_budget_and_short_at_the_default_budget():
    paper = WIDConfig(preset="wid55").for_teacher(BERT_BASE)
    assert choose_recipe("auto", paper, BERT_BASE, 400_000)[0] == "paper"
    default = WIDConfig(preset="half", w_step=6, compactor_lr=5e-5).for_teacher(MINILM)
    recipe, why = choose_recipe("auto", default, MINILM, 160)
    assert recipe == "short" and "≈0.135" in why
    assert choose_recipe("paper", default, MINILM, 160)[0] == "paper"
    with pytest.raises(ValueError, match="choose one of auto, paper, short"):
        choose_recipe("fast", default, MINILM, 160)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("recipe")
    teacher, corpus = write_teacher(base / "teacher"), write_corpus(base / "corpus.txt")
    argv = lambda out, *extra: ["distill", *distill_argv(teacher, corpus, base / out), "--compactor_lr", "5e-5", *extra]
    for name in ("short", "paper"):
        assert main(argv(name, "--recipe", name)) == 0
    assert main(argv("auto")) == 0
    return {name: json.loads((base / name / "wid_summary.json").read_text()) for name in ("short", "paper", "auto")} | {
        "base": base, "argv": argv}


def test_the_short_recipe_cuts_exactly_where_the_paper_recipe_cannot(runs):
    short, paper = runs["short"], runs["paper"]
    assert short["recipe"] == "short" and paper["recipe"] == "paper"
    assert short["masked_compactor_fraction_at_cut"] == 0.0 and short["masked_entry_norm_before_fold"] == 0.0
    assert paper["masked_compactor_fraction_at_cut"] > 0.5  # 5e-5 over 12 steps: the penalty barely starts
    assert short["max_logit_difference_fold"] < 1e-4
    assert not any("still held" in notice or "cumulative compactor" in notice for notice in short["notices"])
    assert any("still held" in notice for notice in paper["notices"])


def test_auto_is_short_here_and_stated(runs):
    assert runs["auto"]["recipe"] == "short"
    assert runs["auto"]["masked_compactor_fraction_at_cut"] == 0.0


def test_a_resume_with_another_recipe_is_refused(runs, capsys):
    checkpoint = runs["base"] / "short" / "checkpoints" / "checkpoint-6"
    assert main(runs["argv"]("short", "--recipe", "paper", "--resume_from_checkpoint", str(checkpoint))) == 2
    assert "--recipe short (now paper)" in capsys.readouterr().err


def test_bias_correction_multiplies_the_schedule_by_adams_factor(tmp_path):
    from transformers import get_linear_schedule_with_warmup

    from wid.training import bias_correction_factor, warmup_steps_for

    teacher, corpus = write_teacher(tmp_path / "teacher"), write_corpus(tmp_path / "corpus.txt")
    argv = distill_argv(teacher, corpus, tmp_path / "out", "--bias_correction", "true", "--compactor_lr", "5e-5")
    argv[argv.index("--logging_steps") + 1] = "1"
    assert main(["distill", *argv]) == 0
    state = json.loads((tmp_path / "out" / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text())
    logged = {entry["step"]: entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry}
    config = WIDConfig(target_hidden=6, compactor_lr=5e-5)
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = get_linear_schedule_with_warmup(dummy, warmup_steps_for(config, 12), 12).lr_lambdas[0]
    for step, lr in logged.items():  # the lr logged at global step k is the one step k ran with
        assert lr == pytest.approx(5e-5 * schedule(step - 1) * bias_correction_factor(step, 0.9, 0.999), rel=1e-6), step
    # a hand-written loop gets the same schedule from wid.build_scheduler
    from transformers import AutoModelForMaskedLM

    import wid

    model = wid.attach(AutoModelForMaskedLM.from_pretrained(teacher), WIDConfig(
        target_hidden=6, target_intermediate=9, compactor_lr=5e-5, bias_correction=True))
    optimizer = wid.build_optimizer(model)
    scheduler = wid.build_scheduler(optimizer, 12)
    compactors = next(group for group in optimizer.param_groups if group["name"] == "compactors")
    ran_with = {}
    for step in range(1, 13):
        ran_with[step] = compactors["lr"]
        optimizer.step()
        scheduler.step()
    for step, lr in logged.items():
        assert ran_with[step] == pytest.approx(lr, rel=1e-6), step
    optimizer = wid.build_optimizer(wid.attach(AutoModelForMaskedLM.from_pretrained(teacher), WIDConfig(
        target_hidden=6, target_intermediate=9, compactor_lr=5e-5)))
    plain = wid.build_scheduler(optimizer, 12)
    optimizer.step()
    plain.step()
    assert plain.get_last_lr()[0] == pytest.approx(5e-5 * schedule(1))  # no bias-correction factor when not asked
    assert ran_with[2] == pytest.approx(5e-5 * schedule(1) * bias_correction_factor(2, 0.9, 0.999)) != plain.get_last_lr()[0]
    assert bias_correction_factor(1, 0.9, 0.999) == pytest.approx(0.1 ** -1 * 0.001 ** 0.5)
    assert bias_correction_factor(10 ** 6, 0.9, 0.999) == pytest.approx(1.0)


def test_the_short_recipe_clips_gradients_unless_told_otherwise(runs, tmp_path):
    """The CLI leaves clipping to the recipe: 1.0 for short, none for paper (the authors); --max_grad_norm wins."""
    assert runs["short"]["max_grad_norm"] == 1.0 and runs["paper"]["max_grad_norm"] == 0.0
    assert runs["short"]["bias_correction"] is False  # measured worse at the default budget (QUALITY.md)
    assert main(runs["argv"](tmp_path / "given", "--recipe", "short", "--max_grad_norm", "0")) == 0
    assert json.loads((tmp_path / "given" / "wid_summary.json").read_text())["max_grad_norm"] == 0.0
    assert main(runs["argv"](tmp_path / "mlm", "--method", "mlm")) == 0
    summary = json.loads((tmp_path / "mlm" / "wid_summary.json").read_text())
    assert summary["max_grad_norm"] == 1.0 and summary["recipe"] is None  # baselines clip as the Trainer does
