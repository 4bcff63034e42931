"""A user's frame target, fifteenth audit: `-> [AUDIO:clip]` / `-> [MOTION:pose]` without adaptor=
gets its modality's decoder-side adapter (``ModalitySpec.target_adaptor``: ``audio_tgt_fbank``,
``motion_tgt``, a ``FedBackFrameAdapter`` with Tacotron 2's pre-net dropout), not the input adapter
every audio or motion input shares. Only the presets, which spell adaptor=, had it; the tests failed
before the fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_gen.model import GeneralistModel, flavour
from moe_gen.registry import MODALITIES
from moe_gen.tasks import Task, Tokenizer, load_preset
from moe_gen.tasks.modalities.signals import FedBackFrameAdapter, FrameMLPAdapter

TONE = (0.5 * np.sin(2 * np.pi * 300 * np.arange(4800) / 16000)).astype(np.float32)
POSE = np.random.default_rng(0).standard_normal((12, 6)).astype(np.float32)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def _adaptors(task: Task, tok: Tokenizer) -> dict[str, str]:
    """Each data slot's adapter by ``side:column``."""
    encoder, decoder = task.plan(tok).templates[0]
    return {f"{p.side}:{p.slot.column}": p.adaptor for p in encoder + decoder if p.slot.column}


@pytest.mark.parametrize("instruction, expected", [
    ("[TEXT:word] say it -> [AUDIO:clip]", {"encoder:word": None, "decoder:clip": "audio_tgt_fbank"}),
    ("[TEXT:word] -> [MOTION:pose]", {"encoder:word": None, "decoder:pose": "motion_tgt"}),
    ("[AUDIO:clip] [MOTION:pose] -> [TEXT:word]",
     {"encoder:clip": "audio_conv", "encoder:pose": "motion_mlp", "decoder:word": None}),
    ("[TEXT:word] -> [AUDIO:clip,adaptor=audio_conv]", {"encoder:word": None, "decoder:clip": "audio_conv"}),
])
def test_decoder_side_frames_default_to_the_target_adapter(tok, instruction, expected):
    """(Inputs, and a target naming its adapter, as before.)"""
    task = Task("t", instruction, [{"word": "low", "clip": TONE, "pose": POSE}])
    assert _adaptors(task, tok) == expected


def test_a_text_to_speech_task_and_a_listening_task_get_two_adapters(tok):
    assert MODALITIES.get("AUDIO").target_adaptor == "audio_tgt_fbank"
    assert MODALITIES.get("MOTION").target_adaptor == "motion_tgt"
    rows = [{"word": w, "clip": TONE * s} for w, s in [("low", 0.5), ("high", 1.0)] * 2]
    say = Task("say", "[TEXT:word] say it -> [AUDIO:clip]", rows)
    hear = Task("hear", "[AUDIO:clip] which word? -> [TEXT:word,closed_set]", rows)
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [say, hear], tok)
    assert model.config.adapters == {"audio_tgt_fbank": 320, "audio_conv": 320}
    assert list(model.frame_heads) == ["audio_tgt_fbank"]
    assert isinstance(model.adapters["audio_tgt_fbank"], FedBackFrameAdapter)
    assert not isinstance(model.adapters["audio_conv"], FrameMLPAdapter)  # the inputs' convolutional one


def test_the_presets_spelling_adaptor_plan_as_before(tok):
    for name, adaptor in [("text_to_speech", "audio_tgt_fbank"), ("text_to_motion", "motion_tgt")]:
        task = load_preset(name, "train", limit=1)
        assert [p.adaptor for p in task.plan(tok).templates[0][1]] == [adaptor]


def test_a_model_saved_when_targets_took_the_input_adapter_answers_as_it_trained(tok, tmp_path):
    """Before the target adapter was the default, `-> [MOTION:pose]` trained through motion_mlp: such
    a saved model (it has no motion_tgt) reads the slot as it was trained, not a KeyError."""
    rng = np.random.default_rng(0)
    rows = [{"desc": f"motion {i % 2}", "pose": (40 + 15 * rng.standard_normal((12, 6))).astype(np.float32)}
            for i in range(8)]
    old = Task("t2m", "[TEXT:desc] -> [MOTION:pose,adaptor=motion_mlp]", rows)  # what the default was
    torch.manual_seed(0)
    GeneralistModel.build(flavour("debug"), [old], tok).save_pretrained(str(tmp_path / "model"))
    model = GeneralistModel.from_pretrained(str(tmp_path / "model")).eval()
    assert "motion_tgt" not in model.config.adapters
    task = Task("t2m", "[TEXT:desc] -> [MOTION:pose]", rows)
    assert model.plan(task).templates[0][1][0].adaptor == "motion_mlp"
    assert task.plan(tok).templates[0][1][0].adaptor == "motion_tgt"  # (the task's own plan is untouched)
    answer, expected = model.infer(task, rows[:1], max_frames=3)[0], model.infer(old, rows[:1], max_frames=3)[0]
    assert np.array_equal(answer.targets["pose"], expected.targets["pose"])
    from moe_gen.analysis.report import analyze, key_numbers  # (the analysis encodes with the model's plan too)

    assert key_numbers(analyze(model, [task], limit=4, interference_rows=2))
