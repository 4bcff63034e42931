"""The generalist model: adapters embed every slot, one shared encoder-decoder does the work,
heads produce tokens (shared vocabulary) and continuous frames.

Shape legend: B rows, S encoder positions, L decoder positions, D width, V vocabulary, N feature
rows of one adapter, F their width.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import numbers
import types
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from moe_gen.model.config import ModelConfig
from moe_gen.model.files import MODEL_FILES
from moe_gen.model.modes import _EVAL_LOCK, eval_mode, mode_during_calls  # noqa: F401  (eval_mode: also imported from here)
from moe_gen.model.positions import check_positions, location_basis, positions_in_sample, side_positions
from moe_gen.model.task_setup import (
    _build_inputs,
    _distinct_tasks,
    _fitted_statistics,
    _task_features,
    _task_words,
    _with_saved_target_adapters,
    check_task_modalities,
    row_indices,
)
from moe_gen.model.transformer import Stack, StackOutput, make_norm
from moe_gen.registry import ADAPTERS
from moe_gen.routing.inputs import InstructionInput
from moe_gen.tasks.batch import Batch, Side
from moe_gen.tasks.plan import TaskDataError
from moe_gen.tasks.tokenizer import Tokenizer

__all__ = ["GeneralistModel", "ModelOutput", "MODEL_FILES"]

PARALLEL_STEPS = 4  # decoder passes of parallel decoding (16 image codes: a quarter of left to right)
_NO_STATISTICS: Mapping = types.MappingProxyType({})  # one object, so plans cached by its id are reused


@dataclasses.dataclass
class ModelOutput:
    """What one forward pass returns.

    Attributes:
        logits: float ``[B, L, V]`` next-token logits of the decoder.
        frames: adapter name → float ``[N, F]`` predicted rows at the batch's ``frame_index``.
        stop_logits: adapter name → float ``[N]`` stop-flag logits there.
        moe_outputs: every MoE call's output (routing decisions), encoder then decoder.
        encoder_hidden: ``[B, S, D]``.
        aux_losses: routing losses summed over MoE layers, by name (already weighted); without
            autograd summed (and computed) on first access only.
    """

    logits: torch.Tensor
    frames: dict[str, torch.Tensor]
    stop_logits: dict[str, torch.Tensor]
    moe_outputs: list
    encoder_hidden: torch.Tensor

    @functools.cached_property
    def aux_losses(self) -> dict[str, torch.Tensor]:
        return summed_aux_losses(self.moe_outputs)


def summed_aux_losses(moe_outputs) -> dict[str, torch.Tensor]:
    """The named auxiliary losses of MoE layers' outputs, summed by name."""
    aux: dict[str, torch.Tensor] = {}
    for moe_out in moe_outputs:
        for name, value in moe_out.aux_losses.items():
            aux[name] = aux[name] + value if name in aux else value
    return aux


def _sampling(temperature, top_k, top_p, seed: int, beams: int, candidates):
    """The ``Sampling`` that ``infer``'s arguments ask for (None: greedy, beam search or ranking)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"infer: seed must be a whole number, got {seed!r}")
    if temperature is None and top_k is None and top_p is None:
        return None
    if beams > 1 or candidates is not None:
        raise ValueError("temperature/top_k/top_p draw one answer per row; they do not combine with beams > 1 "
                         "or candidates")
    from moe_gen.model.generate import Sampling

    return Sampling(1.0 if temperature is None else temperature, top_k, top_p, seed)


def _parallel_steps(task, steps: Optional[int], sampling, beams: int, candidates) -> Optional[int]:
    """The decoder passes of parallel decoding for ``infer``'s arguments: ``steps`` as given, a
    ``parallel``-objective task's default (it trained to fill masked codes at once: decoded that
    way), or None (left to right).

    Raises:
        ValueError: naming the task, for arguments parallel decoding cannot honour (before the
            fifteenth audit ``beams > 1`` on a parallel-objective task silently decoded it left to
            right, a way it never trained).
    """
    if steps is None and task.objective == "parallel":
        steps = PARALLEL_STEPS
    if steps is None:
        return None
    where = f"task {task.name!r}: parallel decoding (parallel_steps={steps!r}" + \
        ("; the parallel objective's tasks decode this way)" if task.objective == "parallel" else ")")
    if beams > 1 or candidates is not None:
        raise ValueError(f"{where} fixes all image codes at once (MaskGIT); it does not combine with beams > 1 or "
                         "candidates (draw several images with temperature and seed instead)")
    if sampling is not None and (sampling.top_k is not None or sampling.top_p is not None):
        raise ValueError(f"{where} draws codes at a temperature only (no top_k/top_p)")
    return steps


NEW_HEADS = ":heads"  # add_tasks' name for new frame and stop heads of an adapter the model had


def _tokenizer_module(key: str) -> str:
    """The ``image_tokenizers`` module name of ``"task/preprocessor"`` (module names take no dots)."""
    return key.replace(".", "_").replace("/", "__")


def _frozen_vq(fields: Mapping) -> nn.Module:
    from moe_gen.tasks.modalities.image_codes import ImageVQ, VQConfig

    with torch.random.fork_rng(devices=[]):  # weights come from the task's tokenizer or a saved model: no draws
        return ImageVQ(VQConfig(**fields)).requires_grad_(False).eval()


def _image_code_preprocessors(plan) -> list[str]:
    """Names of ``plan``'s preprocessors that turn images into codes (image tokenizers)."""
    names = {p.preprocess for encoder, decoder in plan.templates for p in encoder + decoder if p.preprocess}
    return sorted(n for n in names if hasattr(plan.preprocessor_named(n), "code_tokens"))


class GeneralistModel(nn.Module):
    """One model for every task. Build it for a set of tasks with ``GeneralistModel.build``.

    Args:
        config: ``ModelConfig`` with ``vocab_size``, ``tasks`` and ``adapters`` filled in.
        tokenizer: the shared vocabulary (saved with the model).
    """

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer) -> None:
        super().__init__()
        if config.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"config.vocab_size={config.vocab_size} but the tokenizer has {tokenizer.vocab_size}")
        self.config, self.tokenizer = config, tokenizer
        D = config.d_model
        self.token_embedding = nn.Embedding(config.vocab_size, D)
        self.position_embedding = nn.Embedding(config.max_positions, D)
        self.modality_embedding = nn.Embedding(config.moe.router.num_modalities, D)
        self.adapters = nn.ModuleDict({name: ADAPTERS.get(name)(int(width), D)
                                       for name, width in sorted(config.adapters.items())})
        continuous = {name: int(config.adapters[name]) for name in config.frame_adapters}
        self.frame_heads = nn.ModuleDict({name: nn.Linear(D, width) for name, width in sorted(continuous.items())})
        self.stop_heads = nn.ModuleDict({name: nn.Linear(D, 1) for name in sorted(continuous)})
        # Contrastive (MaMMUT) heads: projections of the pooled encoder and of the pooled
        # bidirectional decoder pass, and a learned temperature starting at 1/0.07 (CLIP).
        self.contrastive_image = nn.Linear(D, D, bias=False)
        self.contrastive_text = nn.Linear(D, D, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # The decoder-only layout (a prefix LM) has one stack: the decoder, without cross-attention.
        self.encoder = Stack(config, 0 if config.decoder_only else config.encoder_layers, cross=False, name="encoder")
        self.decoder = Stack(config, config.decoder_layers, cross=not config.decoder_only, name="decoder")
        self.embedding_norm = make_norm(config) if config.embedding_norm else None
        self.lm_head = None if config.tie_embeddings else nn.Linear(D, config.vocab_size, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=D ** -0.5)
        self.image_tokenizers = nn.ModuleDict({_tokenizer_module(key): _frozen_vq(fields)
                                               for key, fields in sorted(config.image_tokenizers.items())})
        # FSDP (moe_gen.fsdp.shard_dense) and the Trainer on several processes set it: every trainable
        # adapter and frame/stop head parameter joins every forward with weight 0 (FSDP reduces a sharded
        # unit's gradients only when every process has them all; DDP and expert parallelism need every
        # process to run backward, also one whose batch uses no adapter while only adapters train), and
        # the names of the adapters (and "<adapter>:heads") a batch really used collect in
        # adapters_in_step until moe_gen.fsdp.drop_unused_adapter_grads reads and clears them
        self.touch_all_adapters = False
        self.adapters_in_step: set[str] = set()
        self.location_embedding = None
        if config.location_frequencies and tokenizer.num_bins:
            F = config.location_frequencies
            self.location_embedding = nn.Linear(2 * F, D, bias=False)
            # each row's smooth part starts as large as its own part (the basis has norm sqrt(F))
            nn.init.normal_(self.location_embedding.weight, std=(D * F) ** -0.5)
            self.register_buffer("location_basis", location_basis(tokenizer.num_bins, F), persistent=False)

    def __getstate__(self):
        # copied or pickled while eval_mode blocks run on it (another thread's infer): the copy comes
        # out in the modes every module has outside them, with no block of its own to join. The modes
        # are read here, under the lock, for every module: submodules are copied after this returns,
        # and a block starting meanwhile put them in eval mode in the copy (before the
        # twenty-seventh session's audit only the blocks running now were seen)
        with _EVAL_LOCK:
            state = dict(super().__getstate__())
            record = state.pop("_eval_block", None)
            switched = {id(m) for m in record.training} if record is not None else set()
            state["_modes_outside"] = [m.training or id(m) in switched for m in self.modules()]
        return state

    def __setstate__(self, state):
        modes, training = state.pop("_modes_outside", None), state.pop("_training_outside", None)
        super().__setstate__(state)
        for module, mode in zip(self.modules(), modes or ()):
            module.training = mode
        for module in training or ():  # (pickled by an earlier version)
            module.training = True

    # ---- building and saving -----------------------------------------------------------------

    @classmethod
    def build(cls, config: ModelConfig, tasks: Sequence, tokenizer: Tokenizer) -> "GeneralistModel":
        """A model for ``tasks`` (``moe_gen.tasks.Task``): the task vocabulary, and an adapter for
        every feature slot, sized from the first rows of each task that encode (``Task.probe``)."""
        _build_inputs(config, tokenizer)
        tasks = _distinct_tasks(tasks, "GeneralistModel.build")
        adapters, frame_adapters = _task_features(tasks, tokenizer, dict(config.adapters),
                                                  list(config.frame_adapters))
        if config.predict_all_features:
            frame_adapters += [name for name in adapters if name not in frame_adapters]
        names = tuple(dict.fromkeys([*config.tasks, *(t.name for t in tasks)]))
        statistics = _fitted_statistics(tasks, config.preprocessor_statistics)
        from moe_gen.tasks.modalities.base import modality_tag_names

        rc = config.moe.router
        router = dataclasses.replace(rc, num_tasks=max(rc.num_tasks, len(names)),
                                     num_modalities=max(rc.num_modalities, len(modality_tag_names())),
                                     task_words=_task_words(names, tasks, config.tasks, rc.task_words))
        config = dataclasses.replace(config, vocab_size=tokenizer.vocab_size, tasks=names, adapters=adapters,
                                     frame_adapters=tuple(frame_adapters), moe=config.moe.replace(router=router),
                                     preprocessor_statistics=statistics,
                                     modalities=config.modalities or tuple(modality_tag_names()))
        model = cls(config, tokenizer)
        model._adopt_image_tokenizers(tasks)
        return model

    def add_tasks(self, tasks: Sequence) -> list[str]:
        """Makes room for new tasks (fine-tuning): their names join the task vocabulary, and slots
        whose features no adapter embeds yet get a new adapter (and frame heads for continuous
        targets), fitted on their rows as the model's encoding statistics (tasks the model already
        knows keep theirs). Returns the names of the new adapters, and ``<adapter>:heads`` for new
        frame and stop heads of an adapter the model had (``TrainConfig(trainable="new_adapters")``
        trains just those)."""
        if any(getattr(m, "frozen", False) for m in self.modules()):
            raise ValueError("this model's MoE layers are frozen for inference (merge_for_inference): add the "
                             "tasks to the model it was merged from, train it, and merge again")
        tasks = _distinct_tasks(tasks, "add_tasks")
        check_task_modalities(tasks, self.modality_ids)
        names = tuple(dict.fromkeys([*self.config.tasks, *(t.name for t in tasks)]))
        if len(names) > self.config.moe.router.num_tasks:
            raise ValueError(f"the model's routers were built for {self.config.moe.router.num_tasks} tasks; "
                             f"{len(names)} would not fit ({', '.join(names[len(self.config.tasks):])} are new)")
        adapters, frame_adapters = _task_features(tasks, self.tokenizer, dict(self.config.adapters),
                                                  list(self.config.frame_adapters))
        if self.config.predict_all_features:  # as build does: every adapter gets a frame head
            frame_adapters += [name for name in adapters if name not in frame_adapters]
        for name, width in adapters.items():
            known = self.config.adapters.get(name)
            if known is not None and int(known) != int(width):
                raise ValueError(f"a new task feeds {name!r} features of width {width}, the model's adapter "
                                 f"takes {known}")
        # in the model's device and dtype (fp32 heads in a bf16 model failed its first forward)
        like = {"device": self.token_embedding.weight.device, "dtype": self.token_embedding.weight.dtype}
        D = self.config.d_model
        added = sorted(set(adapters) - set(self.adapters))
        for name in added:
            self.adapters[name] = ADAPTERS.get(name)(int(adapters[name]), D).to(**like)
        for name in frame_adapters:
            if name not in self.frame_heads:
                self.frame_heads[name] = nn.Linear(D, int(adapters[name])).to(**like)
                self.stop_heads[name] = nn.Linear(D, 1).to(**like)
                if name not in added:  # new heads of an adapter the model has: "<adapter>:heads"
                    added.append(f"{name}{NEW_HEADS}")
        new_tasks = [t for t in tasks if t.name not in self.config.tasks]
        statistics = _fitted_statistics(new_tasks, self.config.preprocessor_statistics)
        rc = self.config.moe.router
        router = rc.replace(task_words=_task_words(names, new_tasks, self.config.tasks, rc.task_words))
        self.config = dataclasses.replace(self.config, tasks=names, adapters=adapters,
                                          frame_adapters=tuple(frame_adapters), preprocessor_statistics=statistics,
                                          moe=self.config.moe.replace(router=router))
        for module in self.modules():
            if isinstance(module, InstructionInput):
                module.set_task_words(router.task_words)
        self._adopt_image_tokenizers(new_tasks)
        return added

    @property
    def task_ids(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.config.tasks)}

    @property
    def modality_ids(self) -> dict[str, int]:
        """Modality name → the id this model's tokens are tagged with (``ModelConfig.modalities``;
        the process's modality vocabulary for models saved before it was kept)."""
        from moe_gen.tasks.modalities.base import modality_tag_names

        return {name: i for i, name in enumerate(self.config.modalities or modality_tag_names())}

    def encoding_statistics(self, task) -> Mapping:
        """What the preprocessors learned from ``task``'s training rows when the model met it (a
        ``Task`` or its name; see ``ModelConfig.preprocessor_statistics``): pass it to
        ``task.plan``/``task.encode`` to encode as the model was trained. Empty for tasks
        whose slots learn nothing, and for tasks of models saved before statistics were kept
        (their preprocessors then use their unfitted defaults). A task with image codes encodes
        with the model's own image tokenizer once ``plan(task)`` has bound its plan (``infer``,
        evaluation and the trainer do)."""
        name = task if isinstance(task, str) else task.name
        return self.config.preprocessor_statistics.get(name, _NO_STATISTICS)

    def plan(self, task):
        """``task``'s plan as this model encodes it: the preprocessor statistics it was trained
        with (``encoding_statistics``) and its own copies of image tokenizers."""
        plan = _with_saved_target_adapters(task.plan(self.tokenizer, self.encoding_statistics(task)),
                                           self.config.adapters)
        for name in _image_code_preprocessors(plan):
            key = f"{task.name}/{name}"
            own = self.image_tokenizers[_tokenizer_module(key)] if key in self.config.image_tokenizers else None
            current = plan.preprocessor_named(name)
            if own is not None and current.vq is not own:
                plan.use_preprocessor(name, current.with_tokenizer(own))
        return plan

    def _adopt_image_tokenizers(self, tasks: Sequence) -> None:
        """Keeps a frozen copy of the image tokenizer of every image-code preprocessor of ``tasks``
        (on the model's device), records its shape in ``config.image_tokenizers`` under
        ``"task/preprocessor"`` and binds the tasks' plans to the copies."""

        known = dict(self.config.image_tokenizers)
        device = self.token_embedding.weight.device
        for task in tasks:
            plan = task.plan(self.tokenizer, self.encoding_statistics(task))
            for name in _image_code_preprocessors(plan):
                key = f"{task.name}/{name}"
                if key not in known:
                    vq = plan.preprocessor_named(name).vq
                    known[key] = dataclasses.asdict(vq.config)
                    self.image_tokenizers[_tokenizer_module(key)] = copy.deepcopy(vq).requires_grad_(False).to(device)
        if known != self.config.image_tokenizers:
            self.config = dataclasses.replace(self.config, image_tokenizers=known)
        for task in tasks:
            self.plan(task)

    def save_pretrained(self, directory: str) -> None:
        """Writes ``config.json``, ``model.safetensors`` and the files the tokenizer saves, atomically
        where it can (``moe_gen.model.files.save_model``)."""
        from moe_gen.model.files import save_model

        save_model(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str) -> "GeneralistModel":
        """Loads a model written by ``save_pretrained`` (safetensors: no pickles). Raises
        ``ValueError`` naming the file that is missing, unreadable or does not fit
        (``moe_gen.model.files.load_model``)."""
        from moe_gen.model.files import load_model

        return load_model(cls, directory)

    # ---- forward -----------------------------------------------------------------------------

    def embed(self, side: Side, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings, adapter outputs scattered into place, positions within each sample and
        a modality embedding. ``[B, S, D]``."""
        B, S = side.tokens.shape
        x = nn.functional.embedding(side.tokens, self.token_table()) * side.is_token.unsqueeze(-1)
        flat = x.reshape(B * S, -1)
        for name, rows in side.rows.items():
            if name not in self.adapters:
                raise ValueError(f"the batch has {name!r} features but the model has no such adapter "
                                 f"(adapters: {', '.join(self.adapters) or 'none'}); build the model with this task")
            # batches hold fp32 rows: in the adapter's dtype for a model cast to bf16/fp16/fp64 (autocast casts
            # itself), except for adapters whose rows hold integer ids (``Adapter.exact_features``: bf16 would
            # merge STRUCT text ids above 256); with FSDP gathering parameters in bf16 the token embedding may
            # differ in dtype from an adapter's output
            adapter = self.adapters[name]
            weight = next((p for p in adapter.parameters() if p.is_floating_point()), None)
            if weight is not None and rows.is_floating_point() and not getattr(adapter, "exact_features", False) \
                    and not torch.is_autocast_enabled(rows.device.type):
                rows = rows.to(weight.dtype)
            flat = flat.index_add(0, side.index[name], adapter(rows, side.positions[name]).to(flat.dtype))
        x = flat.view(B, S, -1) + self.modality_embedding(side.tags.modality)
        if self.touch_all_adapters and torch.is_grad_enabled():  # (an evaluation between steps uses none)
            self.adapters_in_step.update(side.rows)
            x = x + self._adapters_times_zero()
        if self.config.positions == "learned":
            limit = self.config.max_positions
            if positions is None:
                positions = side_positions(side)
                if S > limit or side.position_ids is not None:  # else no sample can reach the limit
                    check_positions(positions, side, self.config)
            # (padding may run past the table: it reads its last row; decoding steps pass their positions)
            table = self.position_embedding(positions.clamp_max(limit - 1))
            x = x + (table if self.config.positions_on_features else table * side.is_token.unsqueeze(-1))
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        return x

    def train(self, mode: bool = True) -> "GeneralistModel":
        """As ``nn.Module.train``, refusing training mode for a model ``merge_for_inference`` made
        (or one whose MoE layers it froze, ``merged_in_place``) before any module changes mode: a
        frozen layer refused from inside the walk, after a quarter of the modules had switched to
        training mode (dropout on in a copy meant for inference), and a copy whose layers are all
        routed by content (none frozen) did not refuse at all."""
        mode_during_calls(self, mode)
        frozen = any(getattr(m, "frozen", False) for m in self.modules())
        if mode and (getattr(self, "inference_copy", False) or frozen):
            raise ValueError("this model is a copy for inference (merge_for_inference) or has MoE layers frozen for "
                             "it: train the original model and merge it again")
        return super().train(mode)

    def _adapters_times_zero(self):
        """0 · a weight of every trainable adapter, frame head and stop head parameter: each gets a
        gradient (zero where the batch did not use it), on every process alike (``touch_all_adapters``)."""
        parts = [*self.adapters.values(), *self.frame_heads.values(), *self.stop_heads.values()]
        terms = [p.reshape(-1)[0].float() for part in parts for p in part.parameters() if p.requires_grad]
        return 0.0 * torch.stack(terms).sum() if terms else 0.0

    def rope(self, side: Side, positions: Optional[torch.Tensor] = None):
        """Rotary tables for a side (None with learned positions)."""
        if self.config.positions != "rotary":
            return None
        from moe_gen.model.transformer import rotary_tables

        if positions is None:
            positions = side_positions(side)
        return rotary_tables(positions, self.config.d_model // self.config.num_heads, self.config.rotary_base)

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits of decoder hidden states (the tied embedding, or ``lm_head``)."""
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return hidden @ self.token_table().t()

    def token_table(self) -> torch.Tensor:
        """``[V, D]``: the token embedding, with the location tokens' smooth part added
        (``config.location_frequencies``)."""
        table = self.token_embedding.weight
        if self.location_embedding is None:
            return table
        first, count = self.tokenizer.bin_id(0), self.location_basis.shape[0]
        weight = self.location_embedding.weight  # (the basis is not saved: a load may leave it in another dtype)
        smooth = self.location_embedding(self.location_basis.to(weight.dtype)).to(table.dtype)
        return torch.cat([table[:first], table[first:first + count] + smooth, table[first + count:]])

    def prefix_lengths(self, dec: Side, enc: Side) -> torch.Tensor:
        """long ``[B, L]``: how many input (prefix) positions the sample of each decoder position
        has: where its positions continue in the decoder-only layout."""
        return dec.cross_attention_mask(enc).sum(-1)

    def _prefix_mask(self, enc: Side) -> torch.Tensor:
        return enc.attention_mask(causal=self.config.prefix_attention == "causal")

    def encode(self, enc: Side, keep: bool = False):
        """The encoder over all input slots (bidirectional within each sample). In the
        decoder-only layout: the prefix pass of the one stack; with ``keep`` (generation), its
        per-block keys and values are in ``.kv`` and its MoE layers' decoding state in
        ``.carries``, what generation caches before decoding."""
        if self.config.decoder_only:
            kv: Optional[list] = [] if keep else None
            out = self.decoder(self.embed(enc), self._prefix_mask(enc), enc.tags, enc.padding_mask,
                               rope=self.rope(enc), keep_kv=kv)
            return dataclasses.replace(out, kv=kv)
        return self.encoder(self.embed(enc), enc.attention_mask(), enc.tags, enc.padding_mask, rope=self.rope(enc))

    def decode(self, dec: Side, enc: Side, memory, causal: bool = True):
        """The decoder (causal, or bidirectional for parallel decoding; cross-attending to the
        encoder output ``memory``)."""
        return self.decoder(self.embed(dec), dec.attention_mask(causal=causal), dec.tags, dec.padding_mask,
                            memory=memory.hidden, cross_mask=dec.cross_attention_mask(enc), rope=self.rope(dec))

    def _forward_prefix_lm(self, enc: Side, dec: Side) -> tuple[StackOutput, StackOutput]:
        """The decoder-only layout: one pass over [inputs ; targets] per row. Input positions see
        the inputs of their sample (``prefix_attention``), target positions see those and the
        earlier targets of their sample; target positions continue the sample's input positions.
        Returns the (input, target) parts as the encoder and decoder outputs."""
        from moe_gen.routing.tags import TokenTags

        (B, S), L = enc.tokens.shape, dec.tokens.shape[1]
        # (positions given by the samples, the masked objective's, are places in the whole sample already)
        dec_positions = dec.position_ids if dec.position_ids is not None else \
            positions_in_sample(dec.tags.sample) + self.prefix_lengths(dec, enc)
        if self.config.positions == "learned" and (S + L > self.config.max_positions or dec.position_ids is not None):
            check_positions(dec_positions, dec, self.config)
        x = torch.cat([self.embed(enc), self.embed(dec, dec_positions)], dim=1)
        inputs_see_no_targets = torch.zeros(B, S, L, dtype=torch.bool, device=x.device)
        top = torch.cat([self._prefix_mask(enc), inputs_see_no_targets], dim=2)
        bottom = torch.cat([dec.cross_attention_mask(enc), dec.attention_mask(causal=True)], dim=2)
        rope = None
        if self.config.positions == "rotary":
            rope = self.rope(enc, torch.cat([side_positions(enc), dec_positions], dim=1))
        out = self.decoder(x, torch.cat([top, bottom], dim=1), TokenTags.cat([enc.tags, dec.tags], dim=1),
                           torch.cat([enc.padding_mask, dec.padding_mask], dim=1), rope=rope)
        # Each MoE call routed both parts at once: its output is reported once, with the targets'.
        return StackOutput(out.hidden[:, :S], []), StackOutput(out.hidden[:, S:], out.moe_outputs)

    def decode_bidirectional(self, side: Side):
        """The decoder's contrastive pass: same weights, bidirectional, no cross-attention."""
        return self.decoder(self.embed(side), side.attention_mask(causal=False), side.tags, side.padding_mask,
                            rope=self.rope(side))

    def forward(self, batch: Batch) -> ModelOutput:
        enc, dec = batch.encoder, batch.decoder
        if self.config.decoder_only:
            if not batch.causal:
                raise ValueError("a bidirectional decoder batch (parallel objective) needs the encoder-decoder layout")
            memory, out = self._forward_prefix_lm(enc, dec)
        else:
            memory = self.encode(enc)
            out = self.decode(dec, enc, memory, causal=batch.causal)
        hidden = out.hidden
        logits = self.output_logits(hidden)
        flat = hidden.reshape(-1, hidden.shape[-1])
        frames, stops = {}, {}
        for name, index in batch.frame_index.items():
            frames[name] = self.frame_heads[name](flat[index])
            stops[name] = self.stop_heads[name](flat[index]).squeeze(-1).clone()  # not a view: FSDP2 hooks outputs
        if self.touch_all_adapters and torch.is_grad_enabled():
            self.adapters_in_step.update(f"{name}{NEW_HEADS}" for name in batch.frame_index)
        output = ModelOutput(logits, frames, stops, memory.moe_outputs + out.moe_outputs, memory.hidden)
        if torch.is_grad_enabled():
            _ = output.aux_losses  # summed now, in the graph (a later read under no_grad must not cut it)
        return output

    def infer(self, task, rows: Sequence, *, max_new_tokens: int = 32, max_frames: int = 64, beams: int = 1,
              candidates: Optional[Sequence[str]] = None, max_items: int = 8,
              indices: Optional[Sequence[int]] = None, temperature: Optional[float] = None,
              top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
              no_repeat_ngram: int = 0, min_length: int = 0, parallel_steps: Optional[int] = None,
              merged: bool = True) -> list:
        """Answers for ``rows`` of a task the model knows (a ``Task`` or a preset name).

        Every target slot of the instruction is decoded, repetition groups item by item (at most
        ``max_items``; ``max_new_tokens`` per free-text value, except a slot that declares
        ``max_length``, which decodes up to that many: training cut its values there).
        ``beams > 1`` uses beam search (token targets); ``candidates`` ranks the given answers by
        likelihood instead of generating (retrieval, multiple choice; ``.scores`` holds them all).
        Returns ``Prediction`` objects (``temperature``, ``top_k``, ``top_p``: draw token answers
        instead, reproducibly by ``seed``; see ``moe_gen.model.generate.Sampling``;
        ``no_repeat_ngram`` and ``min_length`` rule free-text values, see ``TextRules``): ``.text``,
        ``.box`` or ``.frames`` for single-target tasks, ``.targets`` (by column, shaped like a data
        row; a frame target's read back: a pose clip, audio features) and ``.groups`` (per group), and
        ``.score``. ``parallel_steps=T`` decodes an image-code target (``preprocess=image_vq``) in T
        bidirectional decoder passes, at most its codes (MaskGIT; train the task with the
        ``parallel`` objective, whose tasks decode this way by default with T = 4, refusing
        beams > 1 and candidates; ``temperature`` and ``seed`` draw the codes) and answers
        ``.image``. Raises ``ValueError`` for tasks outside the model's vocabulary, length limits
        that are not whole numbers >= 1, modalities it has no adapter for, and rows that do
        not fit the instruction (naming column and row: ``indices[i]``, by default its position,
        which also seeds its input masking) or whose answer runs past the learned position table; under the
        task's ``on_error="skip"`` such a row's answer is None instead (counted by that index in
        ``task.skipped``, its message in ``task.errors``).
        ``merged`` (default): for the call, the MoE layers routed by tags alone run merged, as
        ``merge_for_inference``'s copy would (``moe_gen.moe.merged_in_place``: merged weights,
        routes and plans kept for the call only, the model itself unchanged afterwards); the
        answers are the unmerged layers' within float rounding. ``merged=False`` runs the layers
        as they train.
        """
        from moe_gen.model.generate import TextRules, check_rules, check_search
        from moe_gen.model.grammar import check_limits
        from moe_gen.moe import merged_in_place

        task = self._known_task(task)
        plan = self.plan(task)  # as trained, whatever rows task holds
        check_search(plan, beams=beams, candidates=candidates)  # before "beams 0" could mean greedy
        max_new_tokens, max_items, max_frames = check_limits(plan.name, max_new_tokens=max_new_tokens,
                                                             max_items=max_items, max_frames=max_frames)
        sampling = _sampling(temperature, top_k, top_p, seed, beams, candidates)
        rules = check_rules(plan, TextRules(no_repeat_ngram, min_length), candidates, max_new_tokens)
        parallel_steps = _parallel_steps(task, parallel_steps, sampling, beams, candidates)
        samples, failed = self._encode_rows(task, plan, rows, indices)
        self._check_features(task.name, samples)
        with eval_mode(self), merged_in_place(self) if merged else contextlib.nullcontext():
            if parallel_steps is not None:
                answers = self._parallel(plan, samples, parallel_steps, sampling)
            else:
                answers = self._answer_rows(task, plan, samples, candidates=candidates, beams=beams,
                                            sampling=sampling, rules=rules, max_new_tokens=max_new_tokens,
                                            max_frames=max_frames, max_items=max_items,
                                            masked=task.objective == "masked")
        if not failed:
            return answers
        answered = iter(answers)
        return [None if i in failed else next(answered) for i in range(len(rows))]

    def _known_task(self, task):
        """``task`` as a ``Task`` (a preset name loaded without rows), checked against the task vocabulary."""
        from moe_gen.tasks import Task, load_preset

        if isinstance(task, str):
            from moe_gen.tasks import preset_info

            try:
                preset_info(task)
            except ValueError:
                if task in self.task_ids:  # one of the model's own tasks: its instruction is not saved by name
                    raise ValueError(f"{task!r} is not a preset; pass the Task object itself "
                                     f"(model.infer(Task({task!r}, instruction, rows), rows))") from None
                raise
            task = load_preset(task, "test", limit=0)
        if not isinstance(task, Task):
            raise ValueError(f"infer needs a Task or a preset name, got {type(task).__name__}")
        if task.name not in self.task_ids:
            raise ValueError(f"the model was not built for task {task.name!r}; it knows: "
                             f"{', '.join(self.config.tasks)}")
        return task

    def _encode_rows(self, task, plan, rows: Sequence, indices: Optional[Sequence[int]]) -> tuple[list, set[int]]:
        """The rows encoded for inference, and the positions of those skipped under ``on_error="skip"``
        (a row that fails to encode, or reaches past the learned position table)."""
        if isinstance(rows, (Mapping, str)):
            raise ValueError(f"task {task.name!r}: infer takes a list of rows, got one {type(rows).__name__}; "
                             "pass [row] for a single row")
        indices = row_indices(task.name, indices, len(rows))
        samples, failed = [], set()
        for i, (row, index) in enumerate(zip(rows, indices)):
            try:
                sample = plan.encode(row, index, training=False, inference=True, template=0)
                self.check_reach(task.name, sample)
                samples.append(sample)
            except TaskDataError as exc:
                exc.row = index
                if task.on_error != "skip":
                    raise
                task.skip_row(index, exc)
                failed.add(i)
        return samples, failed

    def check_reach(self, task_name: str, sample) -> None:
        """Raises ``TaskDataError`` naming task and row for a sample that reaches past the learned
        position table (raised from the batch's forward, it failed every row of the call and named
        none, and ``on_error="skip"`` could not skip it; the trainer's sampler checks every training
        row with it too). Only a sample as long as the table, or one
        whose chunks give their own positions, can: those are collated alone and checked as
        ``forward`` checks them."""
        from moe_gen.tasks.batch import collate

        limit = self.config.max_positions
        given = any(c.position_ids is not None for c in (*sample.encoder, *sample.decoder))
        if self.config.positions != "learned" or (sum(sample.lengths()) < limit and not given):
            return
        batch = collate([sample], self.tokenizer, self.task_ids, modality_ids=self.modality_ids)
        enc, dec = batch.encoder, batch.decoder
        try:
            check_positions(side_positions(enc), enc, self.config)
            if self.config.decoder_only:
                positions = dec.position_ids if dec.position_ids is not None else \
                    positions_in_sample(dec.tags.sample) + self.prefix_lengths(dec, enc)
                check_positions(positions, dec, self.config)
        except ValueError as exc:
            raise TaskDataError(f"task {task_name!r}, row {sample.index}: {exc}") from None

    def _check_features(self, task_name: str, samples: Sequence) -> None:
        """Raises ``ValueError`` for feature chunks the model has no adapter for, or of the wrong width."""
        for sample in samples:
            for chunk in sample.encoder:
                if chunk.rows is not None and chunk.adaptor not in self.adapters:
                    raise ValueError(f"task {task_name!r}: the model has no adapter {chunk.adaptor!r} "
                                     f"for {chunk.modality} (adapters: {', '.join(self.adapters)})")
                if chunk.rows is not None and chunk.rows.shape[1] != self.config.adapters[chunk.adaptor]:
                    raise ValueError(f"task {task_name!r}, row {sample.index}: {chunk.modality} features have width "
                                     f"{chunk.rows.shape[1]}, the model's {chunk.adaptor} adapter expects "
                                     f"{self.config.adapters[chunk.adaptor]}")

    def _answer_rows(self, task, plan, samples: Sequence, **options) -> list:
        """``_answer``; where decoding runs past the learned position table (a long answer), the
        samples are decoded one by one, so that only the rows that reach it fail: ``TaskDataError``
        naming task and row, or, under the task's ``on_error="skip"``, None for them (counted in
        ``task.skipped``) and the other rows answered as they would be alone."""
        from moe_gen.model.cached_decoder import PastPositionTable

        try:
            return self._answer(plan, samples, **options)
        except PastPositionTable:
            pass
        answers = []
        for sample in samples:
            try:
                answers.extend(self._answer(plan, [sample], **options))
            except PastPositionTable as exc:
                error = TaskDataError(f"task {task.name!r}, row {sample.index}: {exc}")
                if task.on_error != "skip":
                    raise error from None
                task.skip_row(sample.index, error)
                answers.append(None)
        return answers

    def _answer(self, plan, samples: Sequence, *, candidates: Optional[Sequence[str]], beams: int, sampling, rules,
                max_new_tokens: int, max_frames: int, max_items: int, masked: bool) -> list:
        """The answers to encoded samples: ranked candidates, beam search or greedy generation.
        ``masked``: the task trained with the masked objective, so it is decoded as that objective
        shows samples (``moe_gen.masking.masked_view``, the ``masked`` pass tag)."""
        from moe_gen.masking import check_masked_answer, masked_view
        from moe_gen.model.generate import beam_search, generate, rank

        if not samples:
            return []
        pass_name = "masked" if masked else "generative"
        if masked:  # (targets of one modality, back to back, as the masked objective trains them)
            check_masked_answer(plan)
            samples = [masked_view(sample) for sample in samples]
        if candidates is not None:
            return rank(self, plan, samples, list(candidates), pass_name=pass_name)
        if beams > 1:
            return beam_search(self, plan, samples, beams=beams, max_new_tokens=max_new_tokens, max_items=max_items,
                               rules=rules, pass_name=pass_name)
        return generate(self, plan, samples, max_new_tokens=max_new_tokens, max_frames=max_frames,
                        max_items=max_items, sampling=sampling, rules=rules, pass_name=pass_name)

    def _parallel(self, plan, samples: Sequence, steps: int, sampling) -> list:
        """Parallel iterative decoding of an image-code target (``moe_gen.model.parallel``;
        arguments checked by ``_parallel_steps``)."""
        from moe_gen.model.parallel import parallel_generate

        if not samples:
            return []
        return parallel_generate(self, plan, samples, steps=steps, seed=sampling.seed if sampling else 0,
                                 temperature=sampling.temperature if sampling else 0.0)

    def set_backend(self, name: str) -> None:
        """Switches every MoE layer to dispatch backend ``name`` (``merged`` for tag-routed
        inference) and records it in ``config.moe.backend``, so a saved model reloads with it."""
        from moe_gen.experts.dispatch import make_backend
        from moe_gen.moe import MoE

        make_backend(name)  # (an unknown name or one this machine cannot run is refused as it is)
        layers = [(path, m) for path, m in self.named_modules() if isinstance(m, MoE)]
        before = [m.config.backend for _, m in layers]
        for i, (path, module) in enumerate(layers):
            try:
                module.set_backend(name)
            except ValueError as exc:  # (put back the layers already switched: none is left half-way)
                for (_, switched), old in zip(layers[:i], before):
                    switched.set_backend(old)
                raise ValueError(f"layer {path}: {exc}; no layer was switched") from None
        self.config = self.config.with_moe(backend=name)

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """In training, every block of the encoder and decoder keeps only its input and recomputes
        its activations during backward (``torch.utils.checkpoint``, non-reentrant): less memory
        for about one more forward of compute; outputs and gradients are unchanged."""
        for stack in (self.encoder, self.decoder):
            stack.checkpoint_blocks = bool(enabled)

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count (frozen image tokenizers excluded); ``active``: counting only top_k of each
        MoE layer's experts."""
        total = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("image_tokenizers."))
        if not active:
            return total
        from moe_gen.moe import MoE

        for module in self.modules():
            if isinstance(module, MoE):
                expert_params = sum(p.numel() for p in module.experts.parameters())
                total -= expert_params - expert_params * module.config.top_k // module.config.num_experts
        return total
