"""The decoder's key/value caches for incremental decoding (``moe_gen.model.generate``).

``CachedDecoder`` feeds the forced prefix of every row in one call, then one token (or one feature
row) per step, each position attending to the cached keys and values of the positions before it;
cross-attention keys and values of the encoder's states are computed once. ``with_target`` lays a
sample out with a placeholder target position, as the prefix and ``rank`` read it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from moe_gen.masking import masked_place
from moe_gen.model.transformer import BlockCache
from moe_gen.routing.tags import TokenTags
from moe_gen.tasks.batch import Side, collate
from moe_gen.tasks.plan import TARGET, Chunk, Sample

__all__ = ["CachedDecoder", "PastPositionTable", "with_target"]


def with_target(sample: Sample, modality: str, tokens: Optional[list[int]] = None,
                 rows: Optional[torch.Tensor] = None, adaptor: Optional[str] = None,
                 place: Optional[int] = None) -> Sample:
    """The sample with a target chunk whose last item is a placeholder: the position reading the
    last generated item is the one that predicts the next. ``place``: the position of its first
    item in the sample, where the items are placed (``Chunk.position_ids``: masked samples)."""
    if rows is not None:
        positions = torch.stack([torch.arange(rows.shape[0]), torch.zeros(rows.shape[0], dtype=torch.long),
                                 torch.zeros(rows.shape[0], dtype=torch.long)], -1)
        chunk = Chunk(modality, TARGET, True, rows=rows, positions=positions, adaptor=adaptor)
    else:
        chunk = Chunk(modality, TARGET, True, tokens=list(tokens))
    if place is not None:
        chunk.position_ids = list(range(place, place + len(chunk)))
    return dataclasses.replace(sample, decoder=[*sample.decoder, chunk])


class PastPositionTable(ValueError):
    """Decoding reached a position past the learned position table (``ModelConfig.max_positions``)."""


class CachedDecoder:
    """Incremental decoding with per-layer key/value caches.

    The forced prefix (BOS, literal decoder text, copied prompts) is fed position by position,
    then one token per step, tagged like the item it predicts (``step``); frame answers feed one
    row per step, tagged like the target slot (``step_rows``).
    """

    def __init__(self, model, samples, modality: str, enc_batch, memory, limit: int, placeholder=None,
                 pass_name: str = "generative") -> None:
        tok = model.tokenizer
        self.model = model
        # The prefix with one placeholder target position: its tags are those of every new position.
        if placeholder is None:
            targets = [with_target(s, modality, [tok.pad_id]) for s in samples]
        else:
            adaptor, width = placeholder
            targets = [with_target(s, modality, rows=torch.zeros(1, width), adaptor=adaptor) for s in samples]
        self.device = dev = model.token_embedding.weight.device
        self.prefix = collate(targets, tok, model.task_ids, pass_name=pass_name,
                              modality_ids=model.modality_ids).to(dev)
        dec = self.prefix.decoder
        B, P = dec.tokens.shape
        self.lengths = (~dec.padding_mask).sum(1)  # prefix positions, placeholder included
        cfg = model.config
        G, Dh = cfg.kv_heads, cfg.d_model // cfg.num_heads
        dtype = model.token_embedding.weight.dtype
        enc = enc_batch.encoder
        # The decoder-only layout caches the input prefix's keys and values in front of the
        # decoder's (positions 0..S-1 of every row, padding masked) and continues its positions.
        self.base = enc.tokens.shape[1] if cfg.decoder_only else 0
        self.offset = ((~enc.padding_mask).sum(1) if cfg.decoder_only
                       else torch.zeros(B, dtype=torch.long, device=dev))
        if pass_name == "masked":  # the answer's place in a masked sample, in either layout (masked_place)
            self.offset = torch.tensor([masked_place(s, modality) for s in samples], device=dev)
        self.total = self.base + P + limit
        # a decoding that may run past the learned position table checks each step's positions
        self.check_positions = cfg.positions == "learned" and (
            int(self.offset.max()) + P + limit > cfg.max_positions if B else False)
        self.caches = [BlockCache(torch.zeros(B, G, self.total, Dh, device=dev, dtype=dtype),
                                  torch.zeros(B, G, self.total, Dh, device=dev, dtype=dtype))
                       for _ in model.decoder.blocks]
        self.key_valid = torch.zeros(B, self.total, dtype=torch.bool, device=dev)
        if cfg.decoder_only:
            for cache, (k, v), carries in zip(self.caches, memory.kv, memory.carries):
                cache.k[:, :, :self.base], cache.v[:, :, :self.base] = k, v
                # the decoding state after the prefix (copied: the caller may decode from it again)
                cache.carries = {name: {key: t.clone() for key, t in carry.items()} for name, carry in carries.items()}
            self.key_valid[:, :self.base] = ~enc.padding_mask
        else:
            for cache, block in zip(self.caches, model.decoder.blocks):
                cache.memory_kv = block.cross_attn.project_kv(memory.hidden)
        self.cross_mask = (~enc.padding_mask).unsqueeze(1)
        self.write = torch.full((B,), self.base, dtype=torch.long, device=dev)
        last_index = self.lengths - 1
        rows = torch.arange(B, device=dev)
        self.target_tags = _select_column(dec.tags, rows, last_index)
        self.step_batches: dict = {}  # what a step's tags are made of → its TagBatch (``_step_tags``)

    def _extend(self, side, steps_BS, active_BS, tags=None) -> torch.Tensor:
        """Runs ``side``'s positions (decoder step ``steps_BS`` of each row; ``active_BS`` False at
        padding) through the decoder on the caches, each seeing the cached keys up to itself;
        returns their final states ``[B, S, D]``. ``tags``: their ``TagBatch`` when the caller
        keeps one (padding included), else built from ``side.tags`` and ``active_BS``."""
        model = self.model
        positions = steps_BS + self.offset.unsqueeze(1)
        if self.check_positions:
            unread = ~active_BS if model.config.positions_on_features else ~active_BS | ~side.is_token
            top = int(positions.masked_fill(unread, 0).max())
            if top >= model.config.max_positions:
                raise PastPositionTable(f"decoding reached position {top}, past the learned position table "
                                 f"(ModelConfig.max_positions={model.config.max_positions}); ask for fewer new "
                                 "tokens or frames, or shorten the inputs")
        write = self.base + steps_BS
        rows = torch.arange(steps_BS.shape[0], device=self.device).unsqueeze(1)
        self.key_valid[rows, write] = active_BS
        mask = self.key_valid.unsqueeze(1) & (torch.arange(self.total, device=self.device) <= write.unsqueeze(-1))
        for cache in self.caches:
            cache.write = write
        # the decoder's one forward path, on the caches
        tags, padding = (side.tags, ~active_BS) if tags is None else (tags, None)
        return model.decoder(model.embed(side, positions), mask, tags, padding, cross_mask=self.cross_mask,
                             rope=model.rope(side, positions), caches=self.caches).hidden

    def _run(self, side_B1, steps_B, active_B, tags=None) -> torch.Tensor:
        """One position per row (decoder step ``steps_B``); its final state ``[B, D]``."""
        hidden = self._extend(side_B1, steps_B.unsqueeze(1), active_B.unsqueeze(1), tags)
        self.write = self.write + 1
        return hidden[:, 0]

    def log_probs(self, hidden_BD: torch.Tensor) -> torch.Tensor:
        return self.model.output_logits(hidden_BD).float().log_softmax(-1)

    def prefill(self) -> torch.Tensor:
        """Feeds the prefix; returns the hidden state ``[B, D]`` that predicts the first answer item."""
        dec = self.prefix.decoder
        B, P = dec.tokens.shape
        steps = torch.arange(P, device=self.device).expand(B, P)
        hidden = self._extend(dec, steps, ~dec.padding_mask)  # the whole prefix in one call
        self.write = self.base + self.lengths  # the next position of each row
        return hidden[torch.arange(B, device=self.device), self.lengths - 1]

    def reorder(self, parents: list[int]) -> None:
        """Row j takes over the cached state of row ``parents[j]`` (beam search; greedy keeps its rows)."""
        if parents == list(range(len(parents))):
            return
        parents = torch.tensor(parents, device=self.device)
        for cache in self.caches:
            cache.reorder(parents)
        self.key_valid, self.write = self.key_valid[parents], self.write[parents]

    def step(self, tokens: list[int], tags: list[tuple[int, int]], active: list[bool]) -> torch.Tensor:
        """Feeds one chosen token per row, its position tagged ``tags[b]`` (``(modality id, role)``
        of what it predicts, ``TargetGrammar.tag``); returns the next log-probabilities ``[B, V]``
        on the CPU."""
        B = len(tokens)
        dev = self.device
        active_B = torch.tensor(active, device=dev)
        modality, role = (torch.tensor(column, device=dev).unsqueeze(1) for column in zip(*tags))
        side = Side(tokens=torch.tensor(tokens, device=dev).unsqueeze(1),
                    is_token=torch.ones(B, 1, dtype=torch.bool, device=dev), rows={}, index={}, positions={},
                    padding_mask=~active_B.unsqueeze(1),
                    tags=dataclasses.replace(self.target_tags, modality=modality, role=role))
        batch = self._step_tags(side, (tuple(tags), tuple(active)))
        return self.log_probs(self._run(side, self.write - self.base, active_B, batch)).cpu()

    def _step_tags(self, side, key: tuple):
        """The ``TagBatch`` of a step's positions, built once per distinct ``key`` (the Python values
        its tags and padding are made of) of this decoding and used again by the steps that repeat
        it (most steps of an answer: every row stays in its slot), which saves the decoder's MoE
        layers a validation and a grouping per step. None for a decoder without MoE layers."""
        if key not in self.step_batches:
            self.step_batches[key] = self.model.decoder.tag_batch(side.tags, side.padding_mask, side.tokens.shape,
                                                                  self.device)
        return self.step_batches[key]

    def step_rows(self, adaptor: str, rows_BF: torch.Tensor, frame_B: torch.Tensor, active: list[bool]) -> torch.Tensor:
        """Feeds one generated feature row per row (frame index ``frame_B``); returns hidden ``[B, D]``."""
        B = rows_BF.shape[0]
        positions = torch.stack([frame_B, torch.zeros_like(frame_B), torch.zeros_like(frame_B)], -1)
        dev = self.device
        active_B = torch.tensor(active, device=dev)
        side = Side(tokens=torch.full((B, 1), self.model.tokenizer.pad_id, device=dev),
                    is_token=torch.zeros(B, 1, dtype=torch.bool, device=dev),
                    rows={adaptor: rows_BF}, index={adaptor: torch.arange(B, device=dev)},
                    positions={adaptor: positions}, padding_mask=~active_B.unsqueeze(1), tags=self.target_tags)
        return self._run(side, self.write - self.base, active_B, self._step_tags(side, ("rows", tuple(active))))


def _select_column(tags: TokenTags, rows: torch.Tensor, columns: torch.Tensor) -> TokenTags:
    """Tags ``[B, 1]`` of one position per row."""
    return tags.select((rows.unsqueeze(1), columns.unsqueeze(1)))
