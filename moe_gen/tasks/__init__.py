"""Tasks: instructions, modalities, task plans, batches, built-in tasks and their data.

    from moe_gen.tasks import Task, Tokenizer, collate
    task = Task("caption", "[IMAGE:img] what does the image describe? -> [TEXT:cap]", rows)
    tok = Tokenizer.default()
    batch = collate(list(task.samples(tok)), tok, {"caption": 0})
"""

from moe_gen.tasks.batch import IGNORE_INDEX, Batch, Side, collate, pack_rows
from moe_gen.tasks.hf_tokenizer import HFTokenizer, resize_token_rows
from moe_gen.tasks.instruction import Instruction, InstructionError, Slot, Template
from moe_gen.tasks.modalities.base import (
    Adapter,
    EncodeContext,
    ModalitySpec,
    Preprocessor,
    SlotEncoding,
    SlotValueError,
    register_modality,
)
from moe_gen.tasks.plan import Chunk, DecodeSpec, Sample, SlotPlan, TaskDataError, TaskPlan
from moe_gen.tasks.presets import load_preset, preset, preset_info
from moe_gen.tasks.task import Task, load_jsonl
from moe_gen.tasks.tokenizer import BaseTokenizer, Tokenizer, default_corpus

from moe_gen.tasks import metrics  # noqa: F401,E402  isort: skip  (fills METRICS)

__all__ = [
    "HFTokenizer", "resize_token_rows", "BaseTokenizer",
    "Instruction", "InstructionError", "Slot", "Template", "Task", "TaskPlan", "SlotPlan", "DecodeSpec",
    "Sample", "Chunk", "TaskDataError", "Batch", "Side", "collate", "pack_rows", "IGNORE_INDEX",
    "Tokenizer", "default_corpus", "ModalitySpec", "Preprocessor", "Adapter", "SlotEncoding",
    "EncodeContext", "SlotValueError", "register_modality", "load_preset", "preset", "preset_info",
    "load_jsonl",
]
