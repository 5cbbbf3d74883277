"""wid: Weight-Inherited Distillation for BERT-family encoders (Wu et al., NAACL 2024 Findings).

Families: bert, roberta, xlm-roberta, camembert, electra, distilbert (wid.architecture).

    model = wid.attach(teacher, wid.WIDConfig(preset="wid55"))   # identity compactors, same logits
    optimizer = wid.build_optimizer(model)                        # AdamW + the WID update rule
    scheduler = wid.build_scheduler(optimizer, total_steps)       # warm-up, decay (and bias correction if asked)
    ... every w_step steps: wid.update_masks(model) ...
    wid.finalize(model)                                           # masked entries to 0: the fold is exact
    student = wid.fold(model)                                     # plain model of the teacher's class
    model.save_pretrained(d); model = wid.load_checkpoint(d)      # the compactor model, masks included
"""
from .architecture import TeacherDims, UnsupportedModelError
from .compactors import CompactedLinear, MaskedLayerNorm, WIDState, attach
from .config import PRESETS, WIDConfig
from .export import CheckpointError, load_checkpoint
from .fold import FoldError, fold, kept_indices, verify_fold
from .masks import (
    KeptWidths,
    apply_schedule,
    current_widths,
    finalize,
    kept_widths,
    masked_compactor_fraction,
    masked_entry_norm,
    masked_parameters,
    prune,
    update_masks,
)
from .optim import WIDAdamW, build_optimizer, build_scheduler

__version__ = "0.1.0"

__all__ = [
    "WIDConfig", "PRESETS", "TeacherDims", "UnsupportedModelError", "attach", "CompactedLinear", "MaskedLayerNorm",
    "WIDState", "update_masks", "apply_schedule", "prune", "kept_widths", "KeptWidths", "masked_parameters",
    "masked_entry_norm", "current_widths", "WIDAdamW", "build_optimizer", "fold", "verify_fold", "kept_indices",
    "FoldError", "load_checkpoint", "CheckpointError", "finalize", "masked_compactor_fraction", "build_scheduler",
]
