"""What an audit of pretrained loading found (2026-12-05, eighth session), each pinned: Whisper's
default tokenizer starts the decoder with <|startoftranscript|>, and a frozen-encoder input refuses
a checkpoint folder of another family."""

from __future__ import annotations

import warnings

import pytest

from moe_gen.pretrained import locate
from moe_gen.tasks import Task, Tokenizer

WHISPER = "[AUDIO:audio,preprocess=whisper_mel,adaptor=whisper_conv] -> <|notimestamps|> [TEXT:text]"


def test_from_hf_whisper_with_its_default_tokenizer_transcribes_as_transformers_does():
    from moe_gen.pretrained.checkpoints import CheckpointMissing
    from moe_gen.pretrained.ctranslate2 import greedy_decode, load_whisper, prompt_ids
    from moe_gen.pretrained.hf import from_hf
    from moe_gen.tasks.sources.speech import load_real_clips

    try:
        path = locate("whisper-tiny.en")
    except CheckpointMissing as exc:  # not installed: the message names the command
        pytest.skip(str(exc))
    rows = [{"audio": r["audio"], "text": r["text"]} for r in load_real_clips()][:2]
    task = Task("transcribe", WHISPER, rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = from_hf("whisper-tiny.en", [task]).eval()  # no tokenizer given: the checkpoint's
        reference, hf_tokenizer, extractor = load_whisper(path)
    assert model.tokenizer.bos_id == model.tokenizer.backend.token_to_id("<|startoftranscript|>")  # was EOS's
    for row, prediction in zip(rows, model.infer(task, rows, max_new_tokens=24)):
        features = extractor(row["audio"], sampling_rate=16000, return_tensors="pt").input_features
        ids = greedy_decode(reference, features, prompt_ids(reference), 24)
        assert prediction.text.strip() == hf_tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_a_frozen_encoder_refuses_a_folder_of_another_family(tmp_path):
    from transformers import LlamaConfig, LlamaModel

    LlamaModel(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)).save_pretrained(str(tmp_path))
    rows = [{"text": "Lists are mutable.", "topic": "lists"}]
    task = Task("t", "[TEXT:text,preprocess=bert_states] which topic? -> [TEXT:topic,closed_set]", rows,
                preprocessor_options={"bert_states": {"checkpoint": str(tmp_path)}})
    with pytest.raises(ValueError, match="holds a llama checkpoint, not bert"):
        task.plan(Tokenizer.default())


# ---- a second audit (2026-12-05, ninth session) ----------------------------------------------------

def test_new_heads_of_an_adapter_the_model_has_train_with_new_adapters(tmp_path):
    """A new task predicting audio frames through an adapter the model read audio with got new
    frame and stop heads that trainable="new_adapters" left frozen (and the run was refused for
    "no task needed a new adapter")."""
    from helpers import spoken_words_and_a_new_speaking_task

    from moe_gen.trainer import TrainConfig, Trainer

    old, model, new = spoken_words_and_a_new_speaking_task(Tokenizer.default())
    trainer = Trainer(model, [old, new], TrainConfig(steps=1, batch_size=4, trainable="new_adapters", progress=False,
                                                     tensorboard=False, device="cpu"), output_dir=str(tmp_path))
    adapter = next(iter(model.frame_heads))
    assert trainer.new_adapters == [f"{adapter}:heads"]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"{head}.{adapter}.{w}" for head in ("frame_heads", "stop_heads") for w in ("weight", "bias")}
    trainer.close()


def test_a_mixed_dtype_model_comes_back_in_its_dtypes(tmp_path):
    """A bf16 model with fp32 routers came back all fp32 (its logits 0.03 off)."""
    import torch
    from helpers import flavour_with

    from moe_gen.model import GeneralistModel
    from moe_gen.moe import MoE
    from moe_gen.tasks import collate, load_preset

    tok = Tokenizer.default()
    task = load_preset("table_species", "train", limit=4)
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour_with("debug", router="token"), [task], tok).eval().to(torch.bfloat16)
    for module in model.modules():
        if isinstance(module, MoE):
            module.router.float()
    batch = collate([model.plan(task).encode(task.data[i], i, training=False) for i in range(3)], tok, model.task_ids)
    model.save_pretrained(str(tmp_path))
    loaded = GeneralistModel.from_pretrained(str(tmp_path)).eval()
    assert {n: p.dtype for n, p in loaded.named_parameters()} == {n: p.dtype for n, p in model.named_parameters()}
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, model(batch).logits)


def test_loading_errors_name_the_right_loader(tmp_path):
    import torch
    from helpers import flavour_with

    from moe_gen.cli import _init_section
    from moe_gen.model import GeneralistModel
    from moe_gen.pretrained.checkpoints import CheckpointMissing
    from moe_gen.pretrained.hf import from_hf
    from moe_gen.tasks import load_preset

    task = load_preset("table_species", "train", limit=4)
    torch.manual_seed(0)
    GeneralistModel.build(flavour_with("debug"), [task], Tokenizer.default()).save_pretrained(str(tmp_path / "ours"))
    with pytest.raises(ValueError, match="is a moe_gen model folder.*GeneralistModel.from_pretrained"):
        from_hf(str(tmp_path / "ours"))  # was transformers' "Unrecognized model"
    (tmp_path / "run" / "model").mkdir(parents=True)
    for name in ("config.json",):
        (tmp_path / "run" / "model" / name).write_text((tmp_path / "ours" / name).read_text())
    with pytest.raises(ValueError, match="looks like a run directory: its model is"):
        GeneralistModel.from_pretrained(str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"does not exist \(a folder or .gguf file; shipped checkpoints are named hf:"):
        from_hf(str(tmp_path / "minilm2"))
    # --model.moe settings beside model.init were refused as not a MoELayers (from_hf takes a mapping)
    assert _init_section({"init": "hf:minilm", "moe": {"num_experts": 4}})[2] == {"moe": {"num_experts": 4}}
    try:
        minilm = locate("minilm")
    except CheckpointMissing:
        pytest.skip("the MiniLM checkpoint is not installed")
    with pytest.raises(ValueError, match="is a transformers checkpoint .*from_hf"):
        GeneralistModel.from_pretrained(minilm)
    with pytest.raises(ValueError, match="loads as a dense model .*upcycle"):  # was AttributeError fc_in
        from_hf(minilm, [task], moe={"every": 2, "num_experts": 4})
