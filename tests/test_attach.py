"""attach: identity compactors everywhere WID_METHOD §2 puts them; the teacher's function unchanged."""
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel, BertForSequenceClassification

import wid
from wid import CompactedLinear, MaskedLayerNorm, WIDConfig

from conftest import make_teacher, random_batch, random_shapes


@pytest.mark.parametrize("alignment", ["mask", "tied"])
@pytest.mark.parametrize("shape", random_shapes(4, seed=11))
def test_logits_equal_the_teachers_right_after_attach(shape, alignment):
    teacher = make_teacher(**shape)
    input_ids, attention_mask = random_batch(shape["vocab"])
    expected = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    model = wid.attach(teacher, WIDConfig(target_hidden=shape["heads"], target_intermediate=3, alignment=alignment))
    got = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_attach_replaces_modules_in_place_and_loss_still_works(teacher):
    model = wid.attach(teacher, WIDConfig(target_hidden=6, target_intermediate=9))
    assert model is teacher and isinstance(model, BertForMaskedLM)
    input_ids, attention_mask = random_batch(teacher.config.vocab_size)
    labels = input_ids.clone()
    labels[:, ::2] = -100
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.bert.embeddings.LayerNorm.output_compactor.grad is not None


def test_compactors_sit_where_the_method_says(teacher):
    model = wid.attach(teacher, WIDConfig(target_hidden=6, target_intermediate=9))
    layer = model.bert.encoder.layer[1]
    h, f = teacher.config.hidden_size, teacher.config.intermediate_size
    expected = {
        layer.attention.self.query: ("hidden", "attention.1", h, h),
        layer.attention.self.key: ("hidden", "attention.1", h, h),
        layer.attention.self.value: ("hidden", "attention.1", h, h),
        layer.attention.output.dense: ("attention.1", "hidden", h, h),
        layer.intermediate.dense: ("hidden", "intermediate.1", h, f),
        layer.output.dense: ("intermediate.1", "hidden", f, h),
        model.cls.predictions.transform.dense: ("hidden", "mlm", h, h),
        model.cls.predictions.decoder: ("mlm", None, h, None),
    }
    for module, (group_in, group_out, size_in, size_out) in expected.items():
        assert isinstance(module, CompactedLinear)
        assert (module.input_group, module.output_group) == (group_in, group_out)
        assert module.input_compactor.shape == (size_in, size_in)
        assert (module.output_compactor is None) == (size_out is None)
        if size_out is not None:
            assert torch.equal(module.output_compactor, torch.eye(size_out))
    assert model.bert.embeddings.LayerNorm.output_compactor.shape == (h, h)
    for norm in (layer.attention.output.LayerNorm, layer.output.LayerNorm, model.cls.predictions.transform.LayerNorm):
        assert isinstance(norm, MaskedLayerNorm)


def test_compactor_parameter_names_contain_compactor(teacher):
    before = {name for name, _ in teacher.named_parameters()}
    model = wid.attach(teacher, WIDConfig(target_hidden=6, target_intermediate=9))
    added = {name for name, _ in model.named_parameters()} - before
    assert added and all("compactor" in name for name in added)
    layers, per_layer = teacher.config.num_hidden_layers, 3 * 2 + 2 + 2 + 2
    assert len(added) == 1 + layers * per_layer + 2 + 1


def test_tied_alignment_has_one_compactor_per_group(teacher):
    model = wid.attach(teacher, WIDConfig(target_hidden=6, target_intermediate=9, alignment="tied"))
    compactors = [name for name, _ in model.named_parameters() if "compactor" in name]
    assert len(compactors) == 1 + 2 * teacher.config.num_hidden_layers + 1
    query = model.bert.encoder.layer[0].attention.self.query
    value = model.bert.encoder.layer[0].attention.self.value
    attention_out = model.bert.encoder.layer[0].attention.output.dense
    with torch.no_grad():
        model.wid_state.compactors["compactor_attention_0"].add_(torch.randn(12, 12))
    assert torch.equal(query.output_matrix(), value.output_matrix())
    assert torch.equal(attention_out.input_matrix(), query.output_matrix().t())


def test_masks_live_in_the_state_dict(teacher):
    model = wid.attach(teacher, WIDConfig(target_hidden=6, target_intermediate=9))
    wid.prune(model)
    state = model.state_dict()
    for key in ("wid_state.keep_hidden", "wid_state.keep_attention", "wid_state.keep_intermediate", "wid_state.keep_mlm", "wid_state.mask_updates"):
        assert key in state
    fresh = wid.attach(make_teacher(), WIDConfig(target_hidden=6, target_intermediate=9))
    assert not fresh.wid_state.masks_active
    fresh.load_state_dict(state)
    assert fresh.wid_state.masks_active
    assert torch.equal(fresh.wid_state.keep_attention, model.wid_state.keep_attention)
    assert int(fresh.wid_state.keep_hidden.sum()) == 6


def test_a_bare_encoder_gets_an_mlm_head_tied_to_its_embeddings():
    config = BertConfig(vocab_size=41, hidden_size=12, num_attention_heads=3, intermediate_size=17, num_hidden_layers=2)
    torch.manual_seed(0)
    encoder = BertModel(config).eval()
    input_ids, attention_mask = random_batch(41)
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    model = wid.attach(encoder, WIDConfig(target_hidden=6, target_intermediate=9))
    assert isinstance(model, BertForMaskedLM) and model.bert is encoder
    assert model.cls.predictions.decoder.weight is encoder.embeddings.word_embeddings.weight
    model.eval()
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-1], hidden, rtol=0, atol=1e-5)
    assert out.logits.shape == (*input_ids.shape, 41)


def test_attaching_twice_is_refused(teacher):
    model = wid.attach(teacher, WIDConfig(target_hidden=6, target_intermediate=9))
    with pytest.raises(ValueError, match="already has WID compactors"):
        wid.attach(model, WIDConfig(target_hidden=6, target_intermediate=9))


def test_other_architectures_are_refused_with_the_fix():
    config = BertConfig(vocab_size=41, hidden_size=12, num_attention_heads=3, intermediate_size=17, num_hidden_layers=1)
    with pytest.raises(wid.UnsupportedModelError, match="AutoModelForMaskedLM or AutoModel"):
        wid.attach(BertForSequenceClassification(config), WIDConfig(target_hidden=6))


def test_impossible_target_is_refused_at_attach(teacher):
    with pytest.raises(ValueError, match="larger than the teacher's hidden size 12"):
        wid.attach(teacher, WIDConfig(target_hidden=24))
    assert not hasattr(teacher, "wid_state")


def test_a_saved_compactor_model_reloads_with_load_checkpoint(tmp_path):
    teacher = make_teacher(layers=2, heads=3, head_dim=4)
    model = wid.attach(teacher, WIDConfig(target_hidden=6, target_intermediate=9))
    torch.manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    wid.update_masks(model)
    model.save_pretrained(tmp_path)
    reloaded = wid.load_checkpoint(tmp_path)
    input_ids, attention_mask = random_batch(teacher.config.vocab_size)
    model.eval()
    torch.testing.assert_close(reloaded(input_ids=input_ids, attention_mask=attention_mask).logits,
                               model(input_ids=input_ids, attention_mask=attention_mask).logits, rtol=0, atol=1e-6)
    assert wid.current_widths(reloaded) == wid.current_widths(model) != wid.current_widths(wid.attach(
        make_teacher(layers=2, heads=3, head_dim=4), WIDConfig(target_hidden=6, target_intermediate=9)))
    BertForMaskedLM(BertConfig(vocab_size=41, hidden_size=12, num_attention_heads=3, intermediate_size=17,
                               num_hidden_layers=1)).save_pretrained(tmp_path / "plain")
    with pytest.raises(wid.CheckpointError, match="plain model"):
        wid.load_checkpoint(tmp_path / "plain")


def test_a_sharded_save_of_a_compactor_model_reloads(tmp_path):
    model = wid.attach(make_teacher(layers=2, heads=3, head_dim=4), WIDConfig(target_hidden=6, target_intermediate=9))
    wid.update_masks(model)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    reloaded = wid.load_checkpoint(tmp_path)
    input_ids, attention_mask = random_batch(model.config.vocab_size)
    model.eval()
    torch.testing.assert_close(reloaded(input_ids=input_ids, attention_mask=attention_mask).logits,
                               model(input_ids=input_ids, attention_mask=attention_mask).logits, rtol=0, atol=1e-6)


def test_a_compiled_model_is_folded_as_the_model_it_wraps_and_refused_by_attach():
    model = wid.attach(make_teacher(layers=2, heads=3, head_dim=4), WIDConfig(target_hidden=6, target_intermediate=9))
    wid.prune(model)
    compiled = torch.compile(model, backend="eager")
    student = wid.fold(compiled)
    assert student.config.hidden_size == 6 and wid.verify_fold(model, student) < 1e-5
    with pytest.raises(wid.UnsupportedModelError, match="call wid.attach first, then torch.compile"):
        wid.attach(torch.compile(make_teacher(layers=1, heads=3, head_dim=4), backend="eager"),
                   WIDConfig(target_hidden=6, target_intermediate=9))


def test_kept_widths_takes_the_teachers_config_or_model_and_refuses_negative_counts():
    teacher = make_teacher(layers=2, heads=3, head_dim=4)
    config = WIDConfig(target_hidden=6, target_intermediate=9)
    dims = wid.TeacherDims.from_config(teacher.config)
    assert wid.kept_widths(config, teacher.config, 3) == wid.kept_widths(config, teacher, 3) == wid.kept_widths(config, dims, 3)
    with pytest.raises(ValueError, match="updates must be a number of mask updates"):
        wid.kept_widths(config, dims, -1)
    model = wid.attach(teacher, config)
    with pytest.raises(ValueError, match="updates must be a number of mask updates"):
        wid.apply_schedule(model, -2)
    assert int(model.wid_state.mask_updates) == 0
