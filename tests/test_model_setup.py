"""What a model derives from its tasks when it is built or given new ones (``moe_gen.model.task_setup``
and ``GeneralistModel.build``/``add_tasks``): task ids and prompt words, fitted statistics that old
tasks keep, frame heads listed once, width and room checks, and the saved-target-adapter reading of
``GeneralistModel.plan``; plus the model's own refusals (a tokenizer of another size, training mode
inside a merged block, a bidirectional batch in the decoder-only layout). Written from a hand-made
mutation test of those modules: each test failed with one mutant the rest of the suite let pass."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from helpers import build, flavour_with

from moe_gen.config import RouterConfig
from moe_gen.model import GeneralistModel
from moe_gen.tasks import Task, Tokenizer, collate

TONE = (0.5 * np.sin(2 * np.pi * 300 * np.arange(4800) / 16000)).astype(np.float32)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def _labelled(name: str, question: str, labels: list[str]) -> Task:
    return Task(name, f"[TEXT:text] {question} -> [TEXT:label,closed_set]",
                [{"text": f"row {i}", "label": label} for i, label in enumerate(labels)])


def test_a_configs_tasks_keep_their_ids_and_the_given_instructions_words_win(tok):
    """Tasks the config already lists keep their ids (new ones follow); a task given to build takes
    its prompt words from its instruction, not from what the config remembered for that name."""
    mood, topic = _labelled("mood", "how does it feel?", ["up"]), _labelled("topic", "what about?", ["x"])
    config = flavour_with("debug", tasks=("topic", "old"),
                          router=RouterConfig(strategy="instruction", task_words=(("stale",), ("kept",))))
    model = GeneralistModel.build(config, [mood, topic], tok)
    assert model.config.tasks == ("topic", "old", "mood")
    assert model.config.moe.router.task_words == (("about", "what"), ("kept",), ("does", "feel", "how", "it"))


def test_a_task_that_fits_nothing_has_no_statistics_entry(tok):
    free = Task("free", "[TEXT:text] say more -> [TEXT:more]", [{"text": "a", "more": "b"}])
    labelled = _labelled("labelled", "which?", ["p", "q"])
    model = build([free, labelled], tok)
    assert model.config.preprocessor_statistics == {"labelled": {"closed_sets": {"label": ["p", "q"]}}}
    assert model.encoding_statistics(free) == {}


def test_added_tasks_leave_the_known_tasks_statistics_as_trained(tok):
    """add_tasks fits the new tasks only: a known task passed again, with other rows, keeps the
    closed set it trained with, and the model's other tasks keep theirs."""
    first, kept = _labelled("first", "which?", ["p", "q"]), _labelled("kept", "what kind?", ["k"])
    model = build([first, kept], tok)
    again = _labelled("first", "which?", ["p", "q", "r"])
    model.add_tasks([again, _labelled("new", "what now?", ["n"])])
    assert model.config.preprocessor_statistics == {"first": {"closed_sets": {"label": ["p", "q"]}},
                                                    "kept": {"closed_sets": {"label": ["k"]}},
                                                    "new": {"closed_sets": {"label": ["n"]}}}


def test_two_speaking_tasks_list_their_frame_adapter_once(tok):
    rows = [{"word": w, "clip": TONE} for w in ("low", "high")]
    say, shout = (Task(n, f"[TEXT:word] {n} it -> [AUDIO:clip]", rows) for n in ("say", "shout"))
    model = build([say, shout], tok)
    assert model.config.frame_adapters == ("audio_tgt_fbank",)
    assert list(model.frame_heads) == ["audio_tgt_fbank"]


def test_add_tasks_refuses_a_width_the_models_adapter_does_not_take(tok):
    rng = np.random.default_rng(0)

    def moving(name: str, width: int) -> Task:
        return Task(name, "[MOTION:pose] which move? -> [TEXT:y,closed_set]",
                    [{"pose": rng.standard_normal((8, width)).astype(np.float32), "y": "a"} for _ in range(2)])

    model = build([moving("narrow", 3)], tok)
    with pytest.raises(ValueError, match="^a new task feeds 'motion_mlp' features of width 10, the model's adapter "
                                         "takes 6$"):
        model.add_tasks([moving("wide", 5)])
    assert model.config.adapters == {"motion_mlp": 6} and model.config.tasks == ("narrow",)


def test_add_tasks_fills_the_routers_task_room_exactly_and_no_further(tok):
    model = build([_labelled("a", "which?", ["p"])], tok, router=RouterConfig(strategy="attribute", num_tasks=2))
    assert model.add_tasks([_labelled("b", "what kind?", ["k"])]) == []
    assert model.config.tasks == ("a", "b")
    with pytest.raises(ValueError, match=r"^the model's routers were built for 2 tasks; 4 would not fit \(c, d are "
                                         r"new\)$"):
        model.add_tasks([_labelled("c", "what now?", ["n"]), _labelled("d", "and then?", ["m"])])


def test_plan_reads_a_target_through_the_input_adapter_only_where_the_model_lacks_the_target_one(tok):
    """(``task_setup._with_saved_target_adapters``) A model with both audio adapters plans a default
    speech target through its target adapter; a slot that names its adapter keeps it, also in a model
    without that adapter (refused there, not silently read through another one)."""
    rows = [{"word": w, "clip": TONE} for w in ("low", "high")]
    say = Task("say", "[TEXT:word] say it -> [AUDIO:clip]", rows)
    hear = Task("hear", "[AUDIO:clip] which word? -> [TEXT:word,closed_set]", rows)
    both = build([say, hear], tok)
    assert both.plan(say).templates[0][1][0].adaptor == "audio_tgt_fbank"
    listener = build([hear], tok)
    named = Task("named", "[TEXT:word] say it -> [AUDIO:clip,adaptor=audio_tgt_fbank]", rows)
    assert listener.plan(named).templates[0][1][0].adaptor == "audio_tgt_fbank"
    default = Task("default", "[TEXT:word] say it -> [AUDIO:clip]", rows)
    assert listener.plan(default).templates[0][1][0].adaptor == "audio_conv"  # as such models trained


def test_a_tokenizer_of_another_vocabulary_size_is_refused(tok):
    model = build([_labelled("a", "which?", ["p"])], tok)
    config = dataclasses.replace(model.config, vocab_size=tok.vocab_size + 1)
    with pytest.raises(ValueError, match=f"^config.vocab_size={tok.vocab_size + 1} but the tokenizer has "
                                         f"{tok.vocab_size}$"):
        GeneralistModel(config, tok)


def test_training_mode_is_refused_inside_a_merged_in_place_block(tok):
    from moe_gen.moe import merged_in_place

    model = build([_labelled("a", "which?", ["p"])], tok, router=RouterConfig(strategy="attribute")).eval()
    with merged_in_place(model):
        # (named the block since the twenty-seventh session's audit; before, "a copy for inference")
        with pytest.raises(ValueError, match="a merged_in_place block.* is running on this model"):
            model.train()
        assert not any(m.training for m in model.modules())
    assert model.train() is model and model.training


def test_the_decoder_only_layout_refuses_a_bidirectional_decoder_batch(tok):
    task = _labelled("a", "which?", ["p"])
    model = build([task], tok, layout="decoder-only")
    batch = dataclasses.replace(collate(list(task.samples(tok)), tok, model.task_ids), causal=False)
    with pytest.raises(ValueError, match="bidirectional decoder batch .* needs the encoder-decoder layout"):
        model(batch)


def test_activation_checkpointing_switches_off_again(tok):
    model = build([_labelled("a", "which?", ["p"])], tok)
    model.set_activation_checkpointing()
    assert model.encoder.checkpoint_blocks and model.decoder.checkpoint_blocks
    model.set_activation_checkpointing(False)
    assert not model.encoder.checkpoint_blocks and not model.decoder.checkpoint_blocks
