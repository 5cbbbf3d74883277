"""Which encoders WID supports, where each family keeps its layers, and the MLM head a bare encoder gets.

Every supported family (bert, roberta, xlm-roberta, camembert, electra, distilbert) is one `EncoderFamily`:
the module paths of its embeddings, attention q/k/v/out, FFN up/down, LayerNorms and MLM head, and the config
names of its widths. The compactor, mask, optimizer and fold code asks the family for modules and names and
never branches on the family itself.

WID needs an encoder with absolute positions, hidden = heads × head width, and activations with act(0) = 0
(so pruned channels stay exactly zero through the FFN and MLM head). A base encoder (a `BertModel`, a
sentence encoder such as all-MiniLM-L6-v2, an ELECTRA discriminator) is wrapped into its family's
`*ForMaskedLM` with a decoder tied to the word embeddings (WID_METHOD §7, "head warm-up").

ELECTRA checkpoints whose `embedding_size` differs from `hidden_size` have an `embeddings_project` linear:
the embedding space (word/position/type tables, their LayerNorm, the generator head's output) keeps its
width and the projection's output opens the residual stream H; the student keeps the teacher's
`embedding_size`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.activations import ACT2FN


class UnsupportedModelError(ValueError):
    """The teacher is not a model WID can compress."""


@dataclass(frozen=True)
class EncoderFamily:
    """Module paths (dotted, relative to the base model, a layer, or the masked-LM model) and config names."""

    name: str
    model_types: tuple[str, ...]
    layers: str = "encoder.layer"  # in the base model
    query: str = "attention.self.query"  # in a layer
    key: str = "attention.self.key"
    value: str = "attention.self.value"
    attention_output: str = "attention.output.dense"
    attention_norm: str = "attention.output.LayerNorm"
    ffn_up: str = "intermediate.dense"
    ffn_down: str = "output.dense"
    ffn_norm: str = "output.LayerNorm"
    head: tuple[str, ...] = ("cls",)  # in the masked-LM model: the modules mapping hidden states to logits, in order
    head_dense: str = "cls.predictions.transform.dense"
    head_activation: str | None = None  # config attribute of the head's activation (None: gelu, fixed by the family)
    head_norm: str = "cls.predictions.transform.LayerNorm"
    decoder: str = "cls.predictions.decoder"
    decoder_bias_alias: str | None = "cls.predictions.bias"  # a second name Hugging Face stores the decoder bias under
    intermediate_size: str = "intermediate_size"  # config attribute of the FFN width
    activation: str = "hidden_act"  # config attribute of the FFN activation
    token_types: bool = True  # the model takes token_type_ids
    padding_offset_positions: bool = False  # positions start after padding_idx (RoBERTa): fewer usable positions
    embedding_projection: str | None = None  # in the base model: the linear from embedding_size to hidden_size
    # in a layer: blocks computing LayerNorm(dropout(dense(h)) + residual) with children dense, dropout,
    # LayerNorm and forward(hidden_states, input_tensor): their residual add can be fused into the norm
    residual_blocks: tuple[str, ...] = ("attention.output", "output")

    def layer_paths(self) -> dict[str, str]:
        """Role → path in a layer of the six linears and two LayerNorms, in the order a layer runs them."""
        return dict(query=self.query, key=self.key, value=self.value, attention_output=self.attention_output,
                    attention_norm=self.attention_norm, ffn_up=self.ffn_up, ffn_down=self.ffn_down, ffn_norm=self.ffn_norm)


BERT = EncoderFamily("bert", ("bert",))
ROBERTA = EncoderFamily(
    "roberta", ("roberta", "xlm-roberta", "camembert"), head=("lm_head",), head_dense="lm_head.dense",
    head_norm="lm_head.layer_norm", decoder="lm_head.decoder", decoder_bias_alias="lm_head.bias",
    padding_offset_positions=True,
)
ELECTRA = EncoderFamily(
    "electra", ("electra",), head=("generator_predictions", "generator_lm_head"), head_dense="generator_predictions.dense",
    head_norm="generator_predictions.LayerNorm", decoder="generator_lm_head", decoder_bias_alias=None,
    embedding_projection="embeddings_project",
)
DISTILBERT = EncoderFamily(
    "distilbert", ("distilbert",), layers="transformer.layer", query="attention.q_lin", key="attention.k_lin",
    value="attention.v_lin", attention_output="attention.out_lin", attention_norm="sa_layer_norm", ffn_up="ffn.lin1",
    ffn_down="ffn.lin2", ffn_norm="output_layer_norm", head=("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector"),
    head_dense="vocab_transform", head_activation="activation", head_norm="vocab_layer_norm", decoder="vocab_projector",
    decoder_bias_alias=None, intermediate_size="hidden_dim", activation="activation", token_types=False,
    residual_blocks=(),  # the residual adds sit in TransformerBlock.forward, with the attention and the FFN
)
FAMILIES = (BERT, ROBERTA, ELECTRA, DISTILBERT)
SUPPORTED_MODEL_TYPES = tuple(t for family in FAMILIES for t in family.model_types)


def family_of(config_or_model) -> EncoderFamily:
    """The family of a config or model; a one-line UnsupportedModelError naming the supported ones otherwise."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedModelError(
        f"WID supports the encoder families {', '.join(SUPPORTED_MODEL_TYPES)}; got model_type '{model_type}': "
        "pass a teacher of one of these families"
    )


def submodule(root: torch.nn.Module, path: str) -> torch.nn.Module:
    return root.get_submodule(path)


def replace_at(root: torch.nn.Module, path: str, value) -> None:
    """Set the submodule or parameter at dotted `path` of `root`."""
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, value)


def base_model(model) -> torch.nn.Module:
    """The encoder inside a masked-LM model (`model.bert`, `model.roberta`, …), or the model itself."""
    return getattr(model, model.base_model_prefix, model)


def base_prefix(model) -> str:
    """The state-dict prefix of the encoder inside a masked-LM model ("bert", "roberta", "electra", "distilbert")."""
    return model.base_model_prefix


def encoder_layers(model) -> torch.nn.ModuleList:
    return submodule(base_model(model), family_of(model).layers)


def embedding_projection(model) -> torch.nn.Module | None:
    """ELECTRA's embeddings_project linear when embedding_size ≠ hidden_size, else None."""
    path = family_of(model).embedding_projection
    return getattr(base_model(model), path, None) if path else None


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The MLM head applied to hidden states (e.g. only those at the masked positions)."""
    for path in family_of(model).head:
        hidden = submodule(model, path)(hidden)
    return hidden


def head_input(model) -> torch.nn.Module:
    """The first module of the MLM head: a forward pre-hook on it sees the hidden states the head reads."""
    return submodule(model, family_of(model).head[0])


def model_inputs(model_or_config, batch: dict) -> dict:
    """The entries of `batch` the model takes (DistilBERT takes no token_type_ids)."""
    family = family_of(model_or_config)
    names = ("input_ids", "attention_mask", "token_type_ids") if family.token_types else ("input_ids", "attention_mask")
    return {key: value for key, value in batch.items() if key in names}


def max_positions(config) -> int | None:
    """How many tokens a sequence may have: RoBERTa-style positions start after padding_idx."""
    positions = getattr(config, "max_position_embeddings", None)
    offset = any(f.padding_offset_positions for f in FAMILIES if getattr(config, "model_type", None) in f.model_types)
    if positions is not None and offset:
        positions -= (getattr(config, "pad_token_id", None) or 0) + 1
    return positions


def intermediate_size(config) -> int:
    return getattr(config, family_of(config).intermediate_size)


def embedding_size(config) -> int:
    """Width of the word embeddings (and of ELECTRA's generator head); the hidden size elsewhere."""
    return getattr(config, "embedding_size", None) or config.hidden_size


def has_embedding_projection(config) -> bool:
    return family_of(config).embedding_projection is not None and embedding_size(config) != config.hidden_size


def set_widths(config, hidden: int, heads: int, intermediate: int) -> None:
    """Write a student's widths into a config of its family (DistilBERT names them dim, n_heads, hidden_dim)."""
    family = family_of(config)
    if family.embedding_projection and not has_embedding_projection(config):
        config.embedding_size = hidden  # embeddings live in the residual stream, which the student narrows
    config.hidden_size = hidden
    config.num_attention_heads = heads
    setattr(config, family.intermediate_size, intermediate)
    if getattr(config, "sinusoidal_pos_embds", False):
        config.sinusoidal_pos_embds = False  # the folded position table is no longer sinusoidal: store it as learned


def mlm_model_class(config):
    """The family's `*ForMaskedLM` class for `config`."""
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM._model_mapping[type(config)]


def encoder_model_class(config):
    """The family's base encoder class (`BertModel`, `RobertaModel`, …) for `config`."""
    from transformers import AutoModel

    return AutoModel._model_mapping[type(config)]


@dataclass(frozen=True)
class TeacherDims:
    layers: int
    hidden: int
    heads: int
    head_dim: int
    intermediate: int
    vocab: int
    mlm: int | None = None  # width of the MLM head's transform (group M); the hidden width unless stated
    mlm_follows_hidden: bool = True  # M is cut to the student's hidden width (False: ELECTRA's embedding space, kept)

    def __post_init__(self):
        if self.mlm is None:
            object.__setattr__(self, "mlm", self.hidden)

    @classmethod
    def from_config(cls, config) -> "TeacherDims":
        check_supported_config(config)
        projected = has_embedding_projection(config)
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            head_dim=config.hidden_size // config.num_attention_heads,
            intermediate=intermediate_size(config),
            vocab=config.vocab_size,
            mlm=embedding_size(config) if projected else config.hidden_size,
            mlm_follows_hidden=not projected,
        )


def _activation_is_zero_at_zero(act) -> bool:
    fn = ACT2FN[act] if isinstance(act, str) else act
    return float(fn(torch.zeros(1))[0]) == 0.0


def check_supported_config(config) -> None:
    """Raise a one-line UnsupportedModelError naming the fix if WID cannot run on this config."""
    family = family_of(config)
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError("WID needs a bidirectional encoder; set is_decoder=False and add_cross_attention=False")
    position_type = getattr(config, "position_embedding_type", "absolute") or "absolute"
    if position_type != "absolute":
        raise UnsupportedModelError(
            f"position_embedding_type='{position_type}' is not supported (its tables depend on the head width); "
            "use a teacher with absolute position embeddings"
        )
    if config.hidden_size % config.num_attention_heads:
        raise UnsupportedModelError(
            f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads {config.num_attention_heads}"
        )
    act = getattr(config, family.activation)
    if not _activation_is_zero_at_zero(act):
        raise UnsupportedModelError(f"activation '{act}' is not zero at zero, so pruned channels would not stay pruned")
    head_act = getattr(config, family.head_activation) if family.head_activation else "gelu"
    if not _activation_is_zero_at_zero(head_act):
        raise UnsupportedModelError(f"the MLM head's activation '{head_act}' is not zero at zero, so pruned channels would not stay pruned")


def _identity_head_transform(config, encoder) -> torch.Tensor:
    """The head transform's starting weight: I, or for ELECTRA with a projection its pseudo-inverse (back to the
    embedding space the tied decoder reads)."""
    projection = getattr(encoder, family_of(config).embedding_projection or "", None)
    if has_embedding_projection(config) and projection is not None:
        return torch.linalg.pinv(projection.weight.detach().float())
    return torch.eye(config.hidden_size)


def ensure_mlm_head(model):
    """Return the family's masked-LM model: the model itself, or a base encoder wrapped with a fresh MLM head.

    The new head's decoder is tied to the word embeddings; its transform starts as the identity
    (dense = I, bias 0, LayerNorm γ=1, β=0) and the decoder bias at zero, so the head starts as
    "LayerNorm(act(h)) · Eᵀ" and the trainer's head warm-up learns the rest.
    """
    config = getattr(model, "config", None)
    family = family_of(config) if config is not None else None
    if family is None:
        raise UnsupportedModelError(f"WID needs a Hugging Face encoder model, got {type(model).__name__}")
    check_supported_config(config)
    if isinstance(model, mlm_model_class(config)):
        return model
    if hasattr(model, "_orig_mod"):  # torch.compile's wrapper
        raise UnsupportedModelError("WID attaches to the model itself, not a torch.compile'd one: call wid.attach "
                                    "first, then torch.compile the attached model")
    if not isinstance(model, encoder_model_class(config)):
        raise UnsupportedModelError(
            f"WID takes a {mlm_model_class(config).__name__} or a {encoder_model_class(config).__name__}, got "
            f"{type(model).__name__}; load the teacher with AutoModelForMaskedLM or AutoModel"
        )
    param = next(model.parameters())
    with torch.device(param.device):
        wrapped = mlm_model_class(config)(config)
    setattr(wrapped, wrapped.base_model_prefix, model)
    dense, norm = submodule(wrapped, family.head_dense), submodule(wrapped, family.head_norm)
    decoder = submodule(wrapped, family.decoder)
    with torch.no_grad():
        dense.weight.copy_(_identity_head_transform(config, model))
        dense.bias.zero_()
        norm.weight.fill_(1.0)
        norm.bias.zero_()
        decoder.bias.zero_()
    decoder.weight = model.embeddings.word_embeddings.weight
    if family.decoder_bias_alias:
        replace_at(wrapped, family.decoder_bias_alias, decoder.bias)
    wrapped.config.tie_word_embeddings = True
    return wrapped.to(param.dtype)

