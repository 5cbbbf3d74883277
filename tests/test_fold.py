"""The fold (WID_METHOD §8): the plain student computes exactly what the pruned compactor model does."""
import itertools
import json
import os
import random
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

import wid
from wid import WIDConfig

from conftest import make_teacher, perturb, random_batch, random_shapes

CASES = [
    (shape, strategy, alignment, criterion)
    for (shape, (strategy, alignment, criterion)) in zip(
        random_shapes(16, seed=2024), itertools.cycle(itertools.product(["dim", "head"], ["mask", "tied"], ["representative", "group"]))
    )
]


def _target(shape, strategy, rng):
    if strategy == "dim":
        hidden = shape["heads"] * rng.randint(1, shape["head_dim"])
    else:
        hidden = shape["head_dim"] * rng.randint(1, shape["heads"])
    return dict(target_hidden=hidden, target_intermediate=rng.randint(1, shape["intermediate"]), strategy=strategy)


def _pruned_model(shape, strategy, alignment, criterion, seed=0):
    rng = random.Random(seed + shape["vocab"])
    teacher = make_teacher(**shape, seed=seed)
    model = wid.attach(teacher, WIDConfig(**_target(shape, strategy, rng), alignment=alignment, criterion=criterion))
    perturb(model, scale=0.15, seed=seed + 1)  # non-identity compactors, moved teacher weights
    wid.prune(model)
    return model


@pytest.mark.parametrize("shape, strategy, alignment, criterion", CASES)
def test_folded_logits_match_the_compactor_model(shape, strategy, alignment, criterion):
    model = _pruned_model(shape, strategy, alignment, criterion)
    student = wid.fold(model)
    assert type(student) is BertForMaskedLM
    config = student.config
    assert config.hidden_size == model.wid_state.config.target_hidden
    assert config.intermediate_size == model.wid_state.config.target_intermediate
    assert config.hidden_size % config.num_attention_heads == 0
    assert not hasattr(config, "wid")
    assert wid.verify_fold(model, student) <= 1e-4
    input_ids, attention_mask = random_batch(shape["vocab"], seed=7)
    model.eval()
    expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
    got = student(input_ids=input_ids, attention_mask=attention_mask).logits
    keep = attention_mask.bool()
    assert (expected - got)[keep].abs().max() <= 1e-4


def test_fold_leaves_the_compactor_model_unchanged():
    model = _pruned_model(dict(layers=2, heads=3, head_dim=5, intermediate=13, vocab=37), "dim", "mask", "representative")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wid.fold(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_head_strategy_student_keeps_the_teachers_head_width():
    model = _pruned_model(dict(layers=2, heads=5, head_dim=4, intermediate=13, vocab=37), "head", "mask", "representative")
    student = wid.fold(model)
    assert student.config.hidden_size // student.config.num_attention_heads == 4
    assert student.config.num_attention_heads == model.wid_state.config.target_heads


def test_dim_strategy_folds_the_attention_scale_into_the_query():
    model = wid.attach(make_teacher(layers=1, heads=2, head_dim=9), WIDConfig(target_hidden=8, target_intermediate=5))
    wid.prune(model)
    student = wid.fold(model)
    query = model.bert.encoder.layer[0].attention.self.query
    keep = model.wid_state.keep_attention[0]
    keep_in = model.wid_state.keep_hidden
    unscaled = query.weight.detach()[keep][:, keep_in]  # compactors are still the identity on kept channels
    torch.testing.assert_close(student.bert.encoder.layer[0].attention.self.query.weight, unscaled * (4 / 9) ** 0.5)
    torch.testing.assert_close(student.bert.encoder.layer[0].attention.self.key.weight, model.bert.encoder.layer[0].attention.self.key.weight.detach()[keep][:, keep_in])


def test_a_half_way_schedule_is_refused_with_the_fix():
    model = wid.attach(make_teacher(intermediate=19), WIDConfig(target_hidden=6, target_intermediate=9))
    perturb(model)
    for _ in range(9):  # H done after 8 updates, M only after 16
        wid.update_masks(model)
    with pytest.raises(wid.FoldError, match="call wid.prune"):
        wid.fold(model)


def test_non_finite_weights_are_refused():
    model = _pruned_model(dict(layers=1, heads=2, head_dim=3, intermediate=7, vocab=31), "dim", "mask", "representative")
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.weight[0, 0] = float("nan")
    with pytest.raises(wid.FoldError, match="non-finite"):
        wid.fold(model)


def test_unpruned_fold_gives_the_teacher_back():
    teacher = make_teacher(layers=2, heads=3, head_dim=4)
    input_ids, attention_mask = random_batch(teacher.config.vocab_size)
    expected = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    model = wid.attach(teacher, WIDConfig(target_hidden=6, target_intermediate=9))
    with pytest.warns(UserWarning, match=r"no channel is masked yet.*wid\.prune") as caught:
        student = wid.fold(model)
    assert caught[0].filename == __file__  # the warning points at the caller's line
    assert student.config.hidden_size == 12
    torch.testing.assert_close(student(input_ids=input_ids, attention_mask=attention_mask).logits, expected, rtol=0, atol=1e-5)


def test_encoder_export_keeps_the_pooler_on_kept_channels():
    config = BertConfig(vocab_size=41, hidden_size=12, num_attention_heads=3, intermediate_size=17, num_hidden_layers=2)
    torch.manual_seed(0)
    encoder = BertModel(config).eval()
    pooler_weight = encoder.pooler.dense.weight.detach().clone()
    model = wid.attach(encoder, WIDConfig(target_hidden=6, target_intermediate=9))
    perturb(model)
    wid.prune(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pruned: no "nothing masked" warning
        student_encoder = wid.fold(model, with_head=False)
    assert type(student_encoder) is BertModel and student_encoder.pooler is not None
    keep = model.wid_state.keep_hidden
    torch.testing.assert_close(student_encoder.pooler.dense.weight, model.bert.pooler.dense.weight.detach()[keep][:, keep])
    assert not torch.equal(pooler_weight, torch.zeros_like(pooler_weight))
    assert wid.verify_fold(model, student_encoder) < 1e-5  # a base encoder is compared on its kept hidden channels
    with torch.no_grad():
        student_encoder.encoder.layer[0].output.dense.bias[0] += 0.1
    assert wid.verify_fold(model, student_encoder) > 1e-3
    student = wid.fold(model)
    assert wid.verify_fold(model, student) <= 1e-4


def test_tied_decoder_is_untied_unless_identical():
    config = BertConfig(vocab_size=41, hidden_size=12, num_attention_heads=3, intermediate_size=17, num_hidden_layers=1)
    model = wid.attach(BertModel(config), WIDConfig(target_hidden=6, target_intermediate=9))
    with pytest.warns(UserWarning, match="no channel is masked yet"):
        assert wid.fold(model).config.tie_word_embeddings is True  # identity compactors: still identical
    perturb(model)
    wid.prune(model)
    assert wid.fold(model).config.tie_word_embeddings is False


RELOAD_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForMaskedLM, AutoModel
path, inputs = sys.argv[1], json.load(open(sys.argv[2]))
mlm = AutoModelForMaskedLM.from_pretrained(path).eval()
encoder = AutoModel.from_pretrained(path).eval()
ids, mask = torch.tensor(inputs["input_ids"]), torch.tensor(inputs["attention_mask"])
with torch.no_grad():
    logits = mlm(input_ids=ids, attention_mask=mask).logits
    pooled = encoder(input_ids=ids, attention_mask=mask).pooler_output
assert "wid" not in sys.modules, "the student must load without wid"
print(json.dumps({"logits": logits.tolist(), "pooled": pooled.tolist()}))
"""


def test_saved_student_reloads_in_a_fresh_process_without_wid(tmp_path):
    config = BertConfig(vocab_size=43, hidden_size=15, num_attention_heads=5, intermediate_size=23, num_hidden_layers=2)
    torch.manual_seed(1)
    model = wid.attach(BertModel(config).eval(), WIDConfig(target_hidden=10, target_intermediate=11))
    perturb(model, scale=0.1)
    wid.prune(model)
    student = wid.fold(model)
    student.save_pretrained(tmp_path / "student")
    input_ids, attention_mask = random_batch(43, seed=4)
    (tmp_path / "inputs.json").write_text(json.dumps({"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist()}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(tmp_path / "student"), str(tmp_path / "inputs.json")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
        pooled = student.bert.pooler(student.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)
    keep = attention_mask.bool()
    assert (torch.tensor(out["logits"]) - expected)[keep].abs().max() <= 1e-4
    torch.testing.assert_close(torch.tensor(out["pooled"]), pooled, rtol=0, atol=1e-5)


def test_finalize_keeps_the_trained_masks_and_makes_the_fold_exact():
    """A hand-written loop that reaches the target still has small masked entries: the fold of that model differs from
    it, `wid.finalize` zeroes them without re-ranking the masks, and the fold is then exact."""
    model = wid.attach(make_teacher(layers=2, heads=3, head_dim=4), WIDConfig(target_hidden=6, target_intermediate=9))
    with torch.no_grad():
        perturb(model)
    for _ in range(model.wid_state.config.mask_updates_to_target(model.wid_state.dims)):
        wid.update_masks(model)
    masks = [mask.clone() for mask in model.wid_state.buffers()]
    assert wid.masked_compactor_fraction(model) > 0.01
    assert wid.verify_fold(model, wid.fold(model)) > 1e-3
    wid.finalize(model)
    assert all(torch.equal(a, b) for a, b in zip(masks, model.wid_state.buffers()))
    assert wid.masked_entry_norm(model) == 0.0 and wid.masked_compactor_fraction(model) == 0.0
    assert wid.verify_fold(model, wid.fold(model)) < 1e-5


def test_a_half_precision_model_gives_a_student_of_its_dtype_and_a_warning_from_the_optimizer(tmp_path):
    model = wid.attach(make_teacher(layers=2, heads=3, head_dim=4).to(torch.bfloat16),
                       WIDConfig(target_hidden=6, target_intermediate=9))
    with pytest.warns(UserWarning, match="weights are bfloat16, so steps as small as teacher_lr 1e-06 round away"):
        wid.build_optimizer(model)
    with torch.no_grad():
        perturb(model)
    wid.prune(model)
    student = wid.fold(model)
    assert student.dtype == torch.bfloat16 and wid.verify_fold(model, student) < 0.05
    model.save_pretrained(tmp_path)
    assert next(wid.load_checkpoint(tmp_path).parameters()).dtype == torch.bfloat16  # as it was saved
    in_fp32 = wid.load_checkpoint(tmp_path, torch.float32)  # as wid export and wid verify load it: the fold is exact
    student_fp32 = wid.fold(in_fp32)
    assert student_fp32.dtype == torch.float32 and wid.verify_fold(in_fp32, student_fp32) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wid.build_optimizer(wid.attach(make_teacher(layers=1, heads=3, head_dim=4), WIDConfig(target_hidden=6)))


def test_verify_fold_names_its_arguments_when_they_are_swapped():
    model = wid.attach(make_teacher(layers=2, heads=3, head_dim=4), WIDConfig(target_hidden=6, target_intermediate=9))
    wid.prune(model)
    student = wid.fold(model, with_head=False)
    with pytest.raises(TypeError, match="`model` is the attached"):
        wid.verify_fold(student, model)
    wrapped = torch.nn.Module()
    wrapped.module = model  # as DistributedDataParallel holds it
    assert wid.verify_fold(wrapped, student) < 1e-5
