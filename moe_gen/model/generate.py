"""Inference from the instruction: greedy decoding constrained by the target slot's decode spec.

- text: any token until EOS;
- closed set: only tokens that continue a label in the trie (so the answer is always a label);
- box: exactly 4 location tokens, mapped back to the original image's pixels;
- frames (audio, motion): regression of one row per step until the stop flag fires.

The encoder runs once per batch; the decoder is re-run on the growing prefix at each step (no
key-value cache yet: fine for the short answers of the built-in tasks).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from moe_gen.tasks.batch import collate
from moe_gen.tasks.modalities.box import dequantize_box
from moe_gen.tasks.plan import TARGET, Chunk, Sample

__all__ = ["Prediction", "generate"]


@dataclasses.dataclass
class Prediction:
    """One answer.

    Attributes:
        text: decoded text (text and closed-set targets).
        box: ``[x0, y0, x1, y1]`` in the original image's pixels (box targets).
        frames: float ``[T, F]`` rows (continuous targets).
        tokens: generated token ids.
        score: sum of log-probabilities of the generated tokens.
    """

    text: Optional[str] = None
    box: Optional[list[float]] = None
    frames: Optional[torch.Tensor] = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    score: float = 0.0


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
    enc_batch = collate(list(samples), tok, task_ids)
    memory = model.encode(enc_batch.encoder)
    B = len(samples)
    if spec.kind == "frames":
        return _generate_frames(model, samples, target, enc_batch, memory, max_frames)
    generated: list[list[int]] = [[] for _ in range(B)]
    scores = [0.0] * B
    done = [False] * B
    nodes = [spec.trie for _ in range(B)]
    limit = 4 if spec.kind == "box" else max_new_tokens
    bins = torch.tensor([tok.bin_id(k) for k in range(tok.num_bins)])
    for _ in range(limit):
        batch = collate([_with_target(s, target.modality.name, g + [tok.pad_id]) for s, g in zip(samples, generated)],
                        tok, task_ids)
        out = model.decode(batch.decoder, enc_batch.encoder, memory)
        logits = out.hidden @ model.token_embedding.weight.t()
        lengths = (~batch.decoder.padding_mask).sum(1)
        last = logits[torch.arange(B), lengths - 1].float().log_softmax(-1)
        for b in range(B):
            if done[b]:
                continue
            allowed = None
            if spec.kind == "closed_set":
                allowed = torch.tensor(sorted(nodes[b]))
            elif spec.kind == "box":
                allowed = bins
            scores_b = last[b]
            if allowed is not None:
                masked = torch.full_like(scores_b, float("-inf"))
                masked[allowed] = scores_b[allowed]
                scores_b = masked
            token = int(scores_b.argmax())
            scores[b] += float(scores_b[token])
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
    tok = model.tokenizer
    adaptor = str(target.adaptor)
    width = int(model.config.adapters[adaptor])
    B = len(samples)
    frames = [torch.zeros(0, width) for _ in range(B)]
    done = [False] * B
    for _ in range(max_frames):
        # Each sample's rows so far plus a zero placeholder row whose position predicts the next.
        batch = collate([_with_target(s, target.modality.name, rows=torch.cat([f, torch.zeros(1, width)]),
                                      adaptor=adaptor) for s, f in zip(samples, frames)], tok, model.task_ids)
        out = model.decode(batch.decoder, enc_batch.encoder, memory)
        lengths = (~batch.decoder.padding_mask).sum(1)
        last = out.hidden[torch.arange(B), lengths - 1]
        rows = model.frame_heads[adaptor](last)
        stop = torch.sigmoid(model.stop_heads[adaptor](last)).squeeze(-1)
        for b in range(B):
            if not done[b]:
                frames[b] = torch.cat([frames[b], rows[b:b + 1]])
                done[b] = bool(stop[b] > 0.5)
        if all(done):
            break
    return [Prediction(frames=f) for f in frames]


