"""Tasks: instructions, modalities, task plans, built-in tasks and their data.

Built so far: the shared text vocabulary (``Tokenizer``). The instruction parser, modality
registry, task plans and presets are being added (issue 3).
"""

from moe_gen.tasks.tokenizer import Tokenizer, default_corpus

__all__ = ["Tokenizer", "default_corpus"]
