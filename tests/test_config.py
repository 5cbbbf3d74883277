"""WIDConfig: presets resolve to the paper's shapes; impossible targets fail with what would work."""
import pytest
from transformers import BertConfig

from wid import WIDConfig
from wid.architecture import TeacherDims, UnsupportedModelError

BERT_BASE = TeacherDims(layers=12, hidden=768, heads=12, head_dim=64, intermediate=3072, vocab=30522)
MINILM = TeacherDims(layers=6, hidden=384, heads=12, head_dim=32, intermediate=1536, vocab=30522)


def test_defaults_are_the_papers():
    config = WIDConfig(preset="wid55")
    assert (config.strategy, config.alignment, config.criterion) == ("dim", "mask", "representative")
    assert (config.w_step, config.penalty, config.teacher_lr, config.compactor_lr) == (500, 20.0, 1e-6, 5e-5)
    assert (config.weight_decay, config.warmup_ratio, config.adam_eps) == (0.01, 0.01, 1e-6)
    assert (config.intermediate_updates, config.mlm_updates, config.hidden_updates, config.attention_updates) == (16, 16, 8, 8)
    assert config.updates_per_head == 2


def test_wid55_on_bert_base_is_516_12x43_2064():
    config = WIDConfig.from_preset("wid55", BERT_BASE)
    assert (config.target_hidden, config.target_heads, config.student_head_dim(), config.target_intermediate) == (516, 12, 43, 2064)


def test_wid11_on_bert_base_dim_and_head():
    dim = WIDConfig.from_preset("wid11", BERT_BASE)
    head = WIDConfig.from_preset("wid11", BERT_BASE, strategy="head")
    assert (dim.target_hidden, dim.target_heads, dim.target_intermediate) == (192, 12, 768)
    assert (head.target_hidden, head.target_heads, head.student_head_dim()) == (192, 3, 64)


def test_presets_scale_to_other_teachers():
    config = WIDConfig.from_preset("half", MINILM)
    assert (config.target_hidden, config.target_heads, config.target_intermediate) == (192, 12, 768)
    wid55 = WIDConfig.from_preset("wid55", MINILM)
    assert wid55.target_hidden % 12 == 0 and wid55.target_hidden < 384


@pytest.mark.parametrize("preset", [None, "half"])
def test_the_head_count_alone_sets_the_width_under_the_head_strategy(preset):
    """--strategy head --target_heads 4 means 4 whole heads, whatever width the (default) preset would give."""
    config = WIDConfig(preset=preset, strategy="head", target_heads=4).for_teacher(BERT_BASE)
    assert (config.target_hidden, config.target_heads, config.student_head_dim()) == (256, 4, 64)
    assert config.target_intermediate == (1536 if preset == "half" else 1024)
    with pytest.raises(ValueError, match="the teacher has 12 heads; choose at least 1 and at most 12"):
        WIDConfig(preset=preset, strategy="head", target_heads=13).for_teacher(BERT_BASE)


def test_accepts_a_real_bert_config():
    teacher = BertConfig(hidden_size=96, num_attention_heads=4, intermediate_size=200, num_hidden_layers=2)
    config = WIDConfig(target_hidden=48, target_intermediate=100).for_teacher(teacher)
    assert (config.target_hidden, config.target_heads, config.target_intermediate) == (48, 4, 100)


def test_intermediate_defaults_to_the_hidden_ratio():
    config = WIDConfig(target_hidden=384).for_teacher(BERT_BASE)
    assert config.target_intermediate == 1536


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(target_hidden=1024, target_intermediate=100), "larger than the teacher's hidden size 768"),
        (dict(target_hidden=384, target_intermediate=4000), "larger than the teacher's FFN width 3072"),
        (dict(target_hidden=500, target_intermediate=2000), "use a multiple of 12 such as 492 or 504"),
        (dict(target_hidden=200, target_intermediate=800, strategy="head"), "must be a multiple of 64"),
        (dict(target_hidden=192, target_intermediate=800, strategy="head", target_heads=4), "use target_heads=3"),
        (dict(target_hidden=192, target_intermediate=800, target_heads=3), "strategy='dim' keeps all 12 heads"),
    ],
)
def test_impossible_targets_say_what_would_work(kwargs, fragment):
    with pytest.raises(ValueError) as error:
        WIDConfig(**kwargs).for_teacher(BERT_BASE)
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(target_hidden=8, strategy="width"), "strategy='width' is not valid"),
        (dict(target_hidden=8, alignment="shared"), "alignment='shared' is not valid"),
        (dict(target_hidden=8, criterion="l1"), "criterion='l1' is not valid"),
        (dict(preset="wid42"), "unknown preset 'wid42'"),
        (dict(), "give target_hidden"),
        (dict(target_hidden=0), "target_hidden must be a positive integer"),
        (dict(target_hidden=8, w_step=0), "w_step must be a positive integer"),
        (dict(target_hidden=8, penalty=-1.0), "penalty must be a finite number >= 0"),
        (dict(target_hidden=8, penalty=float("nan")), "penalty must be a finite number >= 0, got nan"),
        (dict(target_hidden=8, compactor_lr=float("nan")), "compactor_lr must be a finite number > 0, got nan"),
        (dict(target_hidden=8, compactor_lr=0.0), "compactor_lr must be a finite number > 0"),
        (dict(target_hidden=8, teacher_lr=float("inf")), "teacher_lr must be a finite number >= 0"),
        (dict(target_hidden=8, weight_decay=-1.0), "weight_decay must be a finite number >= 0"),
        (dict(target_hidden=8, adam_eps=-1.0), "adam_eps must be a finite number > 0"),
        (dict(target_hidden=8, adam_betas=(1.5, 0.9)), "adam_betas must be two numbers in [0, 1)"),
        (dict(target_hidden=8, adam_betas=(0.9,)), "adam_betas must be two numbers in [0, 1)"),
        (dict(target_hidden=8, warmup_ratio=float("nan")), "warmup_ratio must be in [0, 1)"),
        (dict(target_hidden=True), "target_hidden must be a positive integer, got True"),
        (dict(target_hidden=8, w_step=True), "w_step must be a positive integer, got True"),
    ],
)
def test_invalid_config_fails_on_creation(kwargs, fragment):
    with pytest.raises(ValueError, match=None) as error:
        WIDConfig(**kwargs)
    assert fragment in str(error.value)


def test_round_trips_through_a_dict():
    config = WIDConfig.from_preset("wid11", BERT_BASE, alignment="tied", penalty=5.0)
    assert WIDConfig.from_dict(config.to_dict()) == config
    assert WIDConfig.from_dict({**config.to_dict(), "layer_norm_eps": None}) == config  # a checkpoint of an older wid


def test_steps_to_target_counts_the_slowest_group():
    dim = WIDConfig.from_preset("wid11", BERT_BASE, w_step=10)
    head = WIDConfig.from_preset("wid11", BERT_BASE, w_step=10, strategy="head")
    assert dim.steps_to_target(BERT_BASE) == 160  # FFN/MLM: 16 updates
    assert head.steps_to_target(BERT_BASE) == 180  # 9 heads to cut, one per 2 updates


@pytest.mark.parametrize(
    "change, fragment",
    [
        (dict(model_type="deberta-v2"), "model_type 'deberta-v2'"),
        (dict(model_type="modernbert"), "bert, roberta, xlm-roberta, camembert, electra, distilbert"),
        (dict(position_embedding_type="relative_key"), "absolute position embeddings"),
        (dict(is_decoder=True), "bidirectional encoder"),
        (dict(hidden_act="sigmoid"), "not zero at zero"),
    ],
)
def test_unsupported_teachers_are_refused(change, fragment):
    config = BertConfig(hidden_size=12, num_attention_heads=3, intermediate_size=20, num_hidden_layers=1)
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(UnsupportedModelError) as error:
        TeacherDims.from_config(config)
    assert fragment in str(error.value)
