"""Inference from the instruction: greedy decoding constrained by the target slot's decode spec.

- text: any token until EOS;
- closed set: only tokens that continue a label in the trie (so the answer is always a label);
- box: exactly 4 location tokens, mapped back to the original image's pixels;
- frames (audio, motion): regression of one row per step until the stop flag fires.

The encoder runs once per batch. Token answers decode incrementally with a key-value cache: each
step embeds only the newest token and attends to the cached keys and values of the earlier
positions (cross-attention keys and values are computed once). Beam search reorders the
caches of its beams; frame answers re-run the decoder on the growing prefix.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from moe_gen.routing.tags import TokenTags
from moe_gen.tasks.batch import Side, collate
from moe_gen.tasks.modalities.box import dequantize_box
from moe_gen.tasks.plan import TARGET, Chunk, Sample

__all__ = ["Prediction", "generate", "rank", "beam_search"]


@dataclasses.dataclass
class Prediction:
    """One answer.

    Attributes:
        text: decoded text (text and closed-set targets).
        box: ``[x0, y0, x1, y1]`` in the original image's pixels (box targets).
        frames: float ``[T, F]`` rows (continuous targets).
        tokens: generated token ids.
        score: sum of log-probabilities of the generated tokens.
        scores: for ranking, the log-likelihood of every candidate (best first is ``argmax``).
    """

    text: Optional[str] = None
    box: Optional[list[float]] = None
    frames: Optional[torch.Tensor] = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    score: float = 0.0
    scores: Optional[list[float]] = None


def _with_target(sample: Sample, modality: str, tokens: Optional[list[int]] = None,
                 rows: Optional[torch.Tensor] = None, adaptor: Optional[str] = None) -> Sample:
    """The sample with a target chunk whose last item is a placeholder: the position reading the
    last generated item is the one that predicts the next."""
    if rows is not None:
        positions = torch.stack([torch.arange(rows.shape[0]), torch.zeros(rows.shape[0], dtype=torch.long),
                                 torch.zeros(rows.shape[0], dtype=torch.long)], -1)
        chunk = Chunk(modality, TARGET, True, rows=rows, positions=positions, adaptor=adaptor)
    else:
        chunk = Chunk(modality, TARGET, True, tokens=list(tokens))
    return dataclasses.replace(sample, decoder=[*sample.decoder, chunk])


@torch.no_grad()
def generate(model, plan, samples: Sequence[Sample], *, max_new_tokens: int = 32,
             max_frames: int = 64) -> list[Prediction]:
    """Greedy answers for encoded inference samples (``plan.encode(..., inference=True)``)."""
    spec = plan.decode_specs()[0]
    target = next(p for p in plan.templates[0][1] if p.loss)
    tok = model.tokenizer
    task_ids = model.task_ids
    dev = model.token_embedding.weight.device
    enc_batch = collate(list(samples), tok, task_ids).to(dev)
    memory = model.encode(enc_batch.encoder)
    B = len(samples)
    if spec.kind == "frames":
        return _generate_frames(model, samples, target, enc_batch, memory, max_frames)
    generated: list[list[int]] = [[] for _ in range(B)]
    scores = [0.0] * B
    done = [False] * B
    nodes = [spec.trie for _ in range(B)]
    limit = 4 if spec.kind == "box" else max_new_tokens
    bins = torch.tensor([tok.bin_id(k) for k in range(tok.num_bins)], device=dev)
    decoder = _CachedDecoder(model, samples, target.modality.name, enc_batch, memory, limit)
    last = decoder.log_probs(decoder.prefill())
    for _ in range(limit):
        step_tokens = []
        for b in range(B):
            if done[b]:
                step_tokens.append(tok.pad_id)
                continue
            allowed = None
            if spec.kind == "closed_set":
                allowed = torch.tensor(sorted(nodes[b]), device=dev)
            elif spec.kind == "box":
                allowed = bins
            scores_b = last[b]
            if allowed is not None:
                masked = torch.full_like(scores_b, float("-inf"))
                masked[allowed] = scores_b[allowed]
                scores_b = masked
            token = int(scores_b.argmax())
            scores[b] += float(scores_b[token])
            step_tokens.append(token)
            if spec.kind == "closed_set":
                nodes[b] = nodes[b][token]
            if token == tok.eos_id or (spec.kind == "closed_set" and not nodes[b]):
                done[b] = True
                if token != tok.eos_id:
                    generated[b].append(token)
                continue
            generated[b].append(token)
        if all(done):
            break
        last = decoder.step(step_tokens, active=[not d for d in done])
    predictions = []
    for b, sample in enumerate(samples):
        ids = [t for t in generated[b] if t != tok.eos_id]
        if spec.kind == "box":
            width, height = sample.meta.get("image_size", (1.0, 1.0))
            box = dequantize_box([tok.bin_index(t) for t in ids], width, height, tok.num_bins)
            predictions.append(Prediction(box=box, tokens=ids, score=scores[b]))
        else:
            predictions.append(Prediction(text=tok.decode(ids), tokens=ids, score=scores[b]))
    return predictions


def _generate_frames(model, samples, target, enc_batch, memory, max_frames) -> list[Prediction]:
    """One row per step from the frame head, fed back through the adapter, until the stop head fires."""
    adaptor = str(target.adaptor)
    width = int(model.config.adapters[adaptor])
    B = len(samples)
    decoder = _CachedDecoder(model, samples, target.modality.name, enc_batch, memory, max_frames,
                             placeholder=(adaptor, width))
    hidden = decoder.prefill()
    frames = [[] for _ in range(B)]
    done = [False] * B
    for step in range(max_frames):
        rows = model.frame_heads[adaptor](hidden)
        stop = torch.sigmoid(model.stop_heads[adaptor](hidden)).squeeze(-1)
        for b in range(B):
            if not done[b]:
                frames[b].append(rows[b])
                done[b] = bool(stop[b] > 0.5)
        if all(done) or step == max_frames - 1:
            break
        hidden = decoder.step_rows(adaptor, rows, torch.full((B,), step, device=rows.device), [not d for d in done])
    return [Prediction(frames=torch.stack(f).cpu()) for f in frames]


@torch.no_grad()
def rank(model, plan, samples: Sequence[Sample], candidates: Sequence[str]) -> list[Prediction]:
    """Scores every candidate text as the answer of every sample: the sum of its tokens'
    log-probabilities (EOS included) given the input, teacher-forced in one batch per sample.
    ``text`` is the best candidate, ``scores`` all of them (retrieval, multiple choice)."""
    tok = model.tokenizer
    target = next(p for p in plan.templates[0][1] if p.loss)
    encoded = [tok.encode(c) + [tok.eos_id] for c in candidates]
    predictions = []
    for sample in samples:
        pairs = [_with_target(sample, target.modality.name, ids) for ids in encoded]
        batch = collate(pairs, tok, model.task_ids).to(model.token_embedding.weight.device)
        logp = model(batch).logits.float().log_softmax(-1).cpu()
        start = sum(len(c) for c in sample.decoder)  # positions before the candidate
        scores = []
        for b, ids in enumerate(encoded):
            positions = torch.arange(start, start + len(ids))
            scores.append(float(logp[b, positions, torch.tensor(ids)].sum()))
        best = max(range(len(candidates)), key=scores.__getitem__)
        predictions.append(Prediction(text=candidates[best], score=scores[best], scores=scores))
    return predictions


@torch.no_grad()
def beam_search(model, plan, samples: Sequence[Sample], *, beams: int = 4, max_new_tokens: int = 32,
                length_penalty: float = 1.0) -> list[Prediction]:
    """Beam search for text targets (closed sets keep to their trie): the ``beams`` best partial
    answers by summed log-probability, finished ones ranked by score / length^length_penalty."""
    spec = plan.decode_specs()[0]
    if spec.kind not in ("text", "closed_set"):
        raise ValueError(f"beam search decodes text and closed-set targets, not {spec.kind!r}; use generate")
    target = next(p for p in plan.templates[0][1] if p.loss)
    tok = model.tokenizer
    predictions = []
    for sample in samples:
        dev = model.token_embedding.weight.device
        enc_batch = collate([sample] * beams, tok, model.task_ids).to(dev)
        memory = model.encode(enc_batch.encoder)
        decoder = _CachedDecoder(model, [sample] * beams, target.modality.name, enc_batch, memory, max_new_tokens)
        logp = decoder.log_probs(decoder.prefill()).cpu()
        alive = [([], 0.0, spec.trie, 0)]  # (tokens, score, trie node, cache row)
        finished: list[tuple[list[int], float]] = []
        for _ in range(max_new_tokens):
            expansions = []
            for tokens, score, node, row in alive:
                scores = logp[row]
                options = sorted(node) if spec.kind == "closed_set" else None
                values, ids = (scores[options].topk(min(beams, len(options))) if options is not None
                               else scores.topk(beams))
                for v, i in zip(values.tolist(), ids.tolist()):
                    token = options[i] if options is not None else i
                    child = node.get(token, {}) if node is not None else None
                    expansions.append((tokens + [token], score + v, child, row))
            expansions.sort(key=lambda e: -e[1])
            alive = []
            for tokens, score, node, row in expansions:
                if tokens[-1] == tok.eos_id or (spec.kind == "closed_set" and not node):
                    finished.append((tokens, score))
                elif len(alive) < beams:
                    alive.append((tokens, score, node, row))
            if not alive or len(finished) >= beams:
                break
            # Cache row j continues beam j: copy its parent's keys and values, then feed its token.
            parents = [row for _, _, _, row in alive] + [alive[-1][3]] * (beams - len(alive))
            decoder.reorder(torch.tensor(parents, device=dev))
            step_tokens = [t[-1] for t, _, _, _ in alive] + [tok.pad_id] * (beams - len(alive))
            active = [True] * len(alive) + [False] * (beams - len(alive))
            logp = decoder.step(step_tokens, active).cpu()
            alive = [(t, s, n, j) for j, (t, s, n, _) in enumerate(alive)]
        finished += [(t, s) for t, s, _, _ in alive]
        best, score = max(finished, key=lambda f: f[1] / max(len(f[0]), 1) ** length_penalty)
        ids = [t for t in best if t != tok.eos_id]
        predictions.append(Prediction(text=tok.decode(ids), tokens=ids, score=score))
    return predictions


class _CachedDecoder:
    """Incremental decoding of one target slot with per-layer key/value caches.

    The forced prefix (BOS, literal decoder text, copied prompts) is fed position by position,
    then one generated token per step; every position is tagged like the target slot's tokens.
    """

    def __init__(self, model, samples, modality: str, enc_batch, memory, limit: int, placeholder=None) -> None:
        tok = model.tokenizer
        self.model = model
        # The prefix with one placeholder target position: its tags are those of every new position.
        if placeholder is None:
            targets = [_with_target(s, modality, [tok.pad_id]) for s in samples]
        else:
            adaptor, width = placeholder
            targets = [_with_target(s, modality, rows=torch.zeros(1, width), adaptor=adaptor) for s in samples]
        self.device = dev = model.token_embedding.weight.device
        self.prefix = collate(targets, tok, model.task_ids).to(dev)
        dec = self.prefix.decoder
        B, P = dec.tokens.shape
        self.lengths = (~dec.padding_mask).sum(1)  # prefix positions, placeholder included
        self.total = P + limit
        cfg = model.config
        D, H = cfg.d_model, cfg.num_heads
        dtype = model.token_embedding.weight.dtype
        self.caches = [{"k": torch.zeros(B, H, self.total, D // H, device=dev, dtype=dtype),
                        "v": torch.zeros(B, H, self.total, D // H, device=dev, dtype=dtype)}
                       for _ in model.decoder.blocks]
        self.memory_kv = [block.cross_attn.project_kv(memory.hidden) for block in model.decoder.blocks]
        self.key_valid = torch.zeros(B, self.total, dtype=torch.bool, device=dev)
        self.cross_mask = (~enc_batch.encoder.padding_mask).unsqueeze(1)
        self.write = torch.zeros(B, dtype=torch.long, device=dev)
        last_index = self.lengths - 1
        rows = torch.arange(B, device=dev)
        self.target_tags = _select_column(dec.tags, rows, last_index)

    def _run(self, side_B1, positions_B, active_B) -> torch.Tensor:
        model = self.model
        x = model.embed(side_B1, positions_B.unsqueeze(1))
        rope = model.rope(side_B1, positions_B.unsqueeze(1))
        self.key_valid[torch.arange(len(active_B), device=self.device), self.write] = active_B
        mask = (self.key_valid & (torch.arange(self.total, device=self.device) <= self.write.unsqueeze(1))).unsqueeze(1)
        padding = ~active_B.unsqueeze(1)
        for block, cache, kv in zip(model.decoder.blocks, self.caches, self.memory_kv):
            x = block.step(x, cache, self.write, mask, side_B1.tags, padding, kv, self.cross_mask, rope)
        self.write = self.write + 1
        return model.decoder.norm(x)[:, 0]

    def log_probs(self, hidden_BD: torch.Tensor) -> torch.Tensor:
        return (hidden_BD @ self.model.token_embedding.weight.t()).float().log_softmax(-1)

    def prefill(self) -> torch.Tensor:
        """Feeds the prefix; returns the hidden state ``[B, D]`` that predicts the first answer item."""
        dec = self.prefix.decoder
        B, P = dec.tokens.shape
        out = torch.zeros(B, self.model.config.d_model, device=self.device)
        for t in range(P):
            active = t < self.lengths
            side = _column_side(dec, t)
            hidden = self._run(side, torch.full((B,), t, device=self.device), active)
            finished = self.lengths - 1 == t
            out[finished] = hidden[finished]
        self.write = self.lengths.clone()  # the next position of each row
        return out

    def reorder(self, parents: torch.Tensor) -> None:
        """Row j takes over the cached state of row ``parents[j]`` (beam search)."""
        for cache in self.caches:
            cache["k"], cache["v"] = cache["k"][parents], cache["v"][parents]
        self.key_valid, self.write = self.key_valid[parents], self.write[parents]

    def step(self, tokens: list[int], active: list[bool]) -> torch.Tensor:
        """Feeds one generated token per row; returns the next log-probabilities."""
        B = len(tokens)
        dev = self.device
        active_B = torch.tensor(active, device=dev)
        side = Side(tokens=torch.tensor(tokens, device=dev).unsqueeze(1),
                    is_token=torch.ones(B, 1, dtype=torch.bool, device=dev), rows={}, index={}, positions={},
                    padding_mask=~active_B.unsqueeze(1), tags=self.target_tags)
        return self.log_probs(self._run(side, self.write.clone(), active_B))

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
        return self._run(side, self.write.clone(), active_B)


def _select_column(tags: TokenTags, rows: torch.Tensor, columns: torch.Tensor) -> TokenTags:
    """Tags ``[B, 1]`` of one position per row."""
    return tags._map(lambda t: t[rows, columns].unsqueeze(1))


def _column_side(side: Side, t: int) -> Side:
    """Position t of every row as a ``[B, 1]`` side (feature rows at t included)."""
    B, S = side.tokens.shape
    rows, index, positions = {}, {}, {}
    for name, flat in side.index.items():
        hit = (flat % S) == t
        if hit.any():
            rows[name] = side.rows[name][hit]
            index[name] = flat[hit] // S
            positions[name] = side.positions[name][hit]
    return Side(tokens=side.tokens[:, t:t + 1], is_token=side.is_token[:, t:t + 1], rows=rows, index=index,
                positions=positions, padding_mask=side.padding_mask[:, t:t + 1],
                tags=side.tags._map(lambda x: x[:, t:t + 1]))
