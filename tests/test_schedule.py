"""Masks and the progressive schedule (WID_METHOD §3–§4): counts per update, ranking, strategies."""
import pytest
import torch

import wid
from wid import WIDConfig, kept_widths
from wid.architecture import TeacherDims

from conftest import make_teacher, perturb

BERT_BASE = TeacherDims(layers=12, hidden=768, heads=12, head_dim=64, intermediate=3072, vocab=30522)


def test_dim_schedule_on_bert_base_wid55_with_the_authors_rounding():
    config = WIDConfig.from_preset("wid55", BERT_BASE)
    assert config.schedule_rounding == "authors"
    # per head 64 → 43: 21 cut, int(21/8) = 2 more per update, so the target (21) comes at update 11, not 8;
    # FFN 3072 → 2064: int(1008·u/16) = 63·u; M 768 → 516: int(252·u/16) = int(15.75·u), rounded down
    expected = {
        0: (768, 768, 3072, 768),
        1: (12 * 62, 12 * 62, 3072 - 63, 768 - 15),
        2: (12 * 60, 12 * 60, 3072 - 126, 768 - 31),
        3: (12 * 58, 12 * 58, 3072 - 189, 768 - 47),
        8: (12 * 48, 12 * 48, 3072 - 504, 768 - 126),
        10: (12 * 44, 12 * 44, 3072 - 630, 768 - 157),
        11: (516, 516, 3072 - 693, 768 - 173),
        16: (516, 516, 2064, 516),
        40: (516, 516, 2064, 516),
    }
    for updates, row in expected.items():
        widths = kept_widths(config, BERT_BASE, updates)
        assert (widths.hidden, widths.attention, widths.intermediate, widths.mlm) == row, updates
    assert config.mask_updates_to_target(BERT_BASE) == 16


def test_dim_schedule_reaches_the_stream_target_late_when_the_per_update_cut_rounds_down():
    config = WIDConfig(target_hidden=12 * 43, target_intermediate=3072, intermediate_updates=1, mlm_updates=1).for_teacher(BERT_BASE)
    assert config.mask_updates_to_target(BERT_BASE) == 11  # ceil(21 / 2); with "ceil" rounding: 8
    assert WIDConfig(**{**config.to_dict(), "schedule_rounding": "ceil"}).mask_updates_to_target(BERT_BASE) == 8


def test_a_cut_smaller_than_the_schedule_length_still_cuts_one_per_update():
    config = WIDConfig(target_hidden=12 * 61, target_intermediate=3072).for_teacher(BERT_BASE)  # 3 per head over 8 updates
    assert [kept_widths(config, BERT_BASE, u).hidden // 12 for u in range(5)] == [64, 63, 62, 61, 61]


def test_dim_schedule_on_bert_base_wid55_with_ceil_rounding():
    config = WIDConfig.from_preset("wid55", BERT_BASE, schedule_rounding="ceil")
    # per head 64 → 43: 21 channels cut over 8 updates, ceil(21·u/8); FFN 3072 → 2064 (1008 over 16); M 768 → 516 (252 over 16)
    expected = {
        0: (768, 3072, 768),
        1: (12 * (64 - 3), 3072 - 63, 768 - 16),
        2: (12 * (64 - 6), 3072 - 126, 768 - 32),
        3: (12 * (64 - 8), 3072 - 189, 768 - 48),
        8: (516, 3072 - 504, 768 - 126),
        9: (516, 3072 - 567, 768 - 142),
        16: (516, 2064, 516),
        40: (516, 2064, 516),
    }
    for updates, (hidden, intermediate, mlm) in expected.items():
        widths = kept_widths(config, BERT_BASE, updates)
        assert (widths.hidden, widths.attention, widths.intermediate, widths.mlm) == (hidden, hidden, intermediate, mlm), updates


def test_head_schedule_cuts_one_more_head_every_two_updates():
    # the authors: int(step / (2·w_step)) heads, i.e. floor(u / 2)
    config = WIDConfig.from_preset("wid11", BERT_BASE, strategy="head")  # 12 → 3 heads
    heads = [kept_widths(config, BERT_BASE, u).hidden // 64 for u in range(0, 22)]
    assert heads == [12, 12, 11, 11, 10, 10, 9, 9, 8, 8, 7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 3, 3]
    assert config.mask_updates_to_target(BERT_BASE) == 18
    ceil = WIDConfig.from_preset("wid11", BERT_BASE, strategy="head", schedule_rounding="ceil")
    heads = [kept_widths(ceil, BERT_BASE, u).hidden // 64 for u in range(0, 22)]
    assert heads == [12, 11, 11, 10, 10, 9, 9, 8, 8, 7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 3, 3, 3]


def test_schedule_lengths_are_options():
    config = WIDConfig(target_hidden=384, target_intermediate=1536, hidden_updates=2, attention_updates=4, intermediate_updates=3, mlm_updates=1)
    widths = kept_widths(config, BERT_BASE, 2)
    assert widths.hidden == 384 and widths.mlm == 384
    assert widths.attention == 12 * (64 - 16)
    assert widths.intermediate == 3072 - 1024


@pytest.mark.parametrize("strategy", ["dim", "head"])
def test_masks_follow_the_schedule_counts(strategy):
    target = 8 if strategy == "dim" else 10  # 4 heads × 5: dim keeps 4 heads × 2, head keeps 2 heads × 5
    model = wid.attach(make_teacher(layers=2, heads=4, head_dim=5, intermediate=23), WIDConfig(target_hidden=target, target_intermediate=7, strategy=strategy, hidden_updates=2, attention_updates=2, intermediate_updates=4, mlm_updates=4, updates_per_head=1))
    perturb(model)
    state = model.wid_state
    for update in range(1, 6):
        widths = wid.update_masks(model)
        assert int(state.mask_updates) == update
        assert int(state.keep_hidden.sum()) == widths.hidden
        assert int(state.keep_mlm.sum()) == widths.mlm
        assert [int(k.sum()) for k in state.keep_attention] == [widths.attention] * 2
        assert [int(k.sum()) for k in state.keep_intermediate] == [widths.intermediate] * 2
    assert (widths.hidden, widths.intermediate, widths.mlm) == (target, 7, target)


def test_dim_strategy_cuts_the_same_number_in_every_head():
    model = wid.attach(make_teacher(heads=4, head_dim=5), WIDConfig(target_hidden=8, target_intermediate=7, hidden_updates=1, attention_updates=1))
    perturb(model, scale=0.3)
    wid.update_masks(model)
    for keep in [model.wid_state.keep_hidden, *model.wid_state.keep_attention]:
        assert keep.view(4, 5).sum(dim=1).tolist() == [2, 2, 2, 2]


def test_head_strategy_keeps_whole_heads_ranked_by_norm_sums():
    model = wid.attach(make_teacher(layers=1, heads=4, head_dim=3), WIDConfig(target_hidden=6, target_intermediate=7, strategy="head", updates_per_head=1))
    layer = model.bert.encoder.layer[0]
    with torch.no_grad():  # make heads 1 and 3 of layer 0's attention the strongest in the representative
        columns = layer.attention.output.dense.input_compactor
        columns[:, 3:6] *= 3.0
        columns[:, 9:12] *= 2.0
    wid.prune(model)
    assert model.wid_state.keep_attention[0].view(4, 3).all(dim=1).tolist() == [False, True, False, True]


def test_representative_criterion_reads_the_authors_compactors():
    model = wid.attach(make_teacher(layers=2, intermediate=9), WIDConfig(target_hidden=6, target_intermediate=4, intermediate_updates=1, mlm_updates=1, hidden_updates=1, attention_updates=1))
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.input_compactor[:, [0, 2, 5, 8]] *= 5  # F_1's representative
        model.bert.encoder.layer[0].attention.self.value.input_compactor[:, [0, 1, 4, 5, 9, 10]] *= 5  # H's
        model.cls.predictions.decoder.input_compactor[:, [1, 3, 5, 7, 9, 11]] *= 5  # M's
        model.bert.encoder.layer[0].attention.self.query.input_compactor[:, 2] *= 100  # not a representative
    wid.update_masks(model)
    state = model.wid_state
    assert state.keep_intermediate[1].nonzero().flatten().tolist() == [0, 2, 5, 8]
    assert state.keep_hidden.nonzero().flatten().tolist() == [0, 1, 4, 5, 9, 10]
    assert state.keep_mlm.nonzero().flatten().tolist() == [1, 3, 5, 7, 9, 11]


def test_group_criterion_sums_over_every_member():
    model = wid.attach(make_teacher(layers=1, intermediate=9), WIDConfig(target_hidden=6, target_intermediate=4, criterion="group", intermediate_updates=1))
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.output_compactor[[1, 3, 6, 7], :] *= 4  # FFN-up rows, not the representative
    wid.update_masks(model)
    assert model.wid_state.keep_intermediate[0].nonzero().flatten().tolist() == [1, 3, 6, 7]


def test_masks_are_recomputed_from_scratch_so_channels_can_come_back():
    model = wid.attach(make_teacher(layers=1, intermediate=9), WIDConfig(target_hidden=6, target_intermediate=4, intermediate_updates=1))
    compactor = model.bert.encoder.layer[0].output.dense.input_compactor
    with torch.no_grad():
        compactor[:, :4] *= 3
    wid.update_masks(model)
    assert model.wid_state.keep_intermediate[0].nonzero().flatten().tolist() == [0, 1, 2, 3]
    with torch.no_grad():
        compactor[:, :4] /= 9
    wid.update_masks(model)
    assert model.wid_state.keep_intermediate[0].nonzero().flatten().tolist() == [4, 5, 6, 7]


def test_prune_zeroes_every_masked_entry_and_only_those():
    model = wid.attach(make_teacher(), WIDConfig(target_hidden=6, target_intermediate=9))
    perturb(model)
    assert wid.masked_entry_norm(model) != wid.masked_entry_norm(model)  # NaN before any mask
    wid.prune(model)
    assert wid.masked_entry_norm(model) == 0.0
    state = model.wid_state
    dropped = ~state.keep_hidden
    assert model.bert.encoder.layer[0].attention.self.query.input_compactor[:, dropped].abs().sum() == 0
    assert model.bert.encoder.layer[0].attention.self.query.input_compactor[:, ~dropped].abs().sum() > 0
    assert model.bert.encoder.layer[1].output.dense.output_compactor[dropped].abs().sum() == 0
    assert model.bert.encoder.layer[1].output.LayerNorm.weight[dropped].abs().sum() == 0
    assert model.cls.predictions.bias.abs().sum() > 0  # the decoder bias is never masked


MINILM = TeacherDims(layers=6, hidden=384, heads=12, head_dim=32, intermediate=1536, vocab=30522)


def test_a_run_too_short_for_the_penalty_is_announced_in_cumulative_learning_rate():
    from wid.training import compactor_lr_after, penalty_budget_notice

    short = WIDConfig(preset="half", w_step=6, compactor_lr=5e-5).for_teacher(MINILM)  # the default run's schedule
    given = compactor_lr_after(short, 160, short.steps_to_target(MINILM))
    notice = penalty_budget_notice(short, MINILM, steps=160)
    assert f"{given:.3g}" in notice and "≈0.135" in notice and "step 96 of 160" in notice


def test_the_paper_budget_is_enough_for_the_penalty():
    from wid.training import penalty_budget_notice

    paper = WIDConfig(preset="wid55").for_teacher(BERT_BASE)
    assert penalty_budget_notice(paper, BERT_BASE, steps=400_000) is None


def test_cumulative_lr_after_the_target_follows_the_linear_schedule_by_hand():
    from wid.training import compactor_lr_after

    config = WIDConfig(target_hidden=6, compactor_lr=1.0, warmup_ratio=0.1)  # 100 steps: warm-up 10, decay 10 → 100
    # steps after global step 60 run at λ(60..99) = (100 − k)/90: sum of 40..1 over 90
    assert compactor_lr_after(config, 100, 60) == pytest.approx(sum(range(1, 41)) / 90)
    assert compactor_lr_after(config, 100, 100) == 0.0


def test_the_penalty_need_is_the_authors_rule_simulated():
    from wid.training import penalty_lr_needed

    authors = penalty_lr_needed(WIDConfig(target_hidden=6))
    additive = penalty_lr_needed(WIDConfig(target_hidden=6, update_rule="additive"))
    assert 0.12 < authors < 0.15 and 0.04 < additive < 0.06  # the extra decay halves the injection's push


@pytest.mark.parametrize("alignment", ["mask", "tied"])
def test_masked_compactor_fraction_is_one_at_identity_and_zero_after_prune(alignment):
    from wid.masks import masked_compactor_fraction

    model = wid.attach(make_teacher(heads=3, head_dim=4, intermediate=19), WIDConfig(target_hidden=6, target_intermediate=9, alignment=alignment))
    wid.apply_schedule(model, 100)
    # identity compactors: exactly 1, although the teacher's masked biases and LayerNorms are far from 0
    assert masked_compactor_fraction(model) == pytest.approx(1.0)
    compactor_norm = sum(float((~model.wid_state.keep(i.group)).sum()) for i in wid.masked_parameters(model) if i.is_compactor) ** 0.5
    assert wid.masked_entry_norm(model) > 1.01 * compactor_norm  # the old measure counted those too
    with torch.no_grad():
        for item in wid.masked_parameters(model):
            if item.is_compactor:
                item.param.mul_(0.5)
    assert masked_compactor_fraction(model) == pytest.approx(0.5)
    wid.prune(model)
    assert masked_compactor_fraction(model) == 0.0
