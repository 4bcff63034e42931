"""Motion read as a summary of its window: one feature row of per-feature statistics over the frames.

    [MOTION:motion,preprocess=pose_summary] what is the person doing? -> [TEXT:label,closed_set]

For classifying short pose windows from a few hundred rows, a model trained from scratch on the
frames fits the exact poses of its training windows and transfers poorly to held-out ones (the
quality suite's ``motion_classification``: 311 windows of 12 frames, many test windows from
phases of a clip that no training window holds), where a linear model on each feature's mean,
standard deviation and mean absolute frame-to-frame change over the window does well. This
preprocessor gives the model that representation: the three statistics of every feature (row
``[1, 3·J]`` for J features a frame), each standardised with its mean and standard deviation over
the task's training rows (``Preprocessor.fit``, saved with the model, so held-out windows are
scaled as the training windows were) and clipped to ±10 (``MOTION_Z_CLIP``, as MOTION frames).
The order of the frames within the window is not kept beyond the mean change. ``sample_rate`` and
``max_length`` select the frames as for ``preprocess=motion`` (a random window of ``max_length``
frames in training, the first one otherwise). ``feature_noise=σ`` adds independent Gaussian noise
of standard deviation σ to every standardised statistic of a training row (drawn afresh each time
the row is read; evaluation reads the exact row): with a few hundred windows, a network that fits
them exactly generalises worse than a linear model, and input noise is a smoothness penalty much
like L2 weight decay (Bishop, 1995). The ``pose_summary`` adapter (an MLP) projects the row to one
position of the model's width.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import numpy as np
import torch
from torch import nn

from moe_gen.tasks.modalities.base import (
    ADAPTERS,
    PREPROCESSORS,
    Adapter,
    EncodeContext,
    Preprocessor,
    SlotEncoding,
    SlotValueError,
)
from moe_gen.tasks.modalities.signals import MOTION_Z_CLIP, feature_scale, motion_frames, motion_window

__all__ = ["PoseSummary", "PoseSummaryAdapter", "pose_summary"]


def pose_summary(frames_TJ: np.ndarray) -> np.ndarray:
    """``[3·J]``: each feature's mean, standard deviation and mean absolute change between
    consecutive frames (0 for a one-frame window), in that order, as float64."""
    frames = np.asarray(frames_TJ, dtype=np.float64)
    change = np.abs(np.diff(frames, axis=0)).mean(0) if len(frames) > 1 else np.zeros(frames.shape[1])
    return np.concatenate([frames.mean(0), frames.std(0), change])


@PREPROCESSORS.register("pose_summary")
class PoseSummary(Preprocessor):
    """Pose frames ``[T, J]`` → one row ``[1, 3·J]`` of standardised window statistics (see the
    module docstring).

    Args:
        statistics: slot name (its column, or ``"slot N"`` for a slot filled by position:
            ``EncodeContext.slot_name``) → ``fit`` result (``{"mean": [...], "std": [...]}``, 3·J
            each); a slot without them cannot be encoded (``SlotValueError``: fit the task's
            statistics first, as ``GeneralistModel.build`` does).
    """

    modality = "MOTION"
    adaptor = "pose_summary"
    fit_attrs = ("sample_rate", "max_length", "min_length")  # (motion_window's)

    def __init__(self, statistics: Optional[Mapping[str, Mapping[str, Any]]] = None) -> None:
        self.statistics = dict(statistics or {})
        self._scales: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for column, fitted in self.statistics.items():
            mean, std = np.asarray(fitted.get("mean", []), np.float64), np.asarray(fitted.get("std", []), np.float64)
            if mean.ndim != 1 or mean.shape != std.shape or mean.size % 3 or (std <= 0).any():
                raise ValueError(f"pose_summary statistics of column {column!r}: need equal-length mean and "
                                 f"std of 3·J values, std > 0; got {mean.shape} and {std.shape}")
            self._scales[column] = (mean, std)

    @classmethod
    def fit(cls, slot, values: Iterable[Any]) -> Optional[dict]:
        """Mean and standard deviation of every window statistic over the training values, each
        read as in evaluation (the first ``max_length`` frames), for the most common number of
        features a frame (as the MOTION statistics do); values that are not pose frames, or have
        another width, are passed over (encoding them names their row). A statistic that hardly
        varies for its magnitude gets 1 (``feature_scale``), so a held-out clip's small difference
        stays small."""
        by_width: dict[int, list[np.ndarray]] = {}
        for value in values:
            try:
                frames = motion_window(motion_frames(value, np.float64), slot)
            except SlotValueError:
                continue
            by_width.setdefault(frames.shape[1], []).append(pose_summary(frames))
        if not by_width:
            return None
        table = np.stack(max(by_width.values(), key=len))  # the first-seen width wins a tie
        return {"mean": table.mean(0).tolist(), "std": feature_scale(table.std(0), table.mean(0)).tolist()}

    def check_slot(self, where: str, slot) -> None:
        if slot.modality != "MOTION":
            raise ValueError(f"{where}: pose_summary reads pose frames; declare the slot as MOTION")

    def __call__(self, value: Any, slot, ctx: EncodeContext) -> SlotEncoding:
        try:
            frames = motion_frames(value, np.float64)
        except SlotValueError as exc:
            raise SlotValueError(f"{ctx.where(slot.column)}: {exc}") from None
        scale = self._scales.get(ctx.slot_name)
        if scale is None:
            raise SlotValueError(f"{ctx.where(slot.column)}: pose_summary has no statistics for this column; fit "
                                 "them on the training rows first (Task.fit_statistics, which a model runs when "
                                 "it is built)")
        mean, std = scale
        if 3 * frames.shape[1] != mean.size:
            raise SlotValueError(f"{ctx.where(slot.column)}: the clip has {frames.shape[1]} features a frame, the "
                                 f"task's pose_summary statistics {mean.size // 3}")
        frames = motion_window(frames, slot, ctx.rng if ctx.training else None)
        row = np.clip((pose_summary(frames) - mean) / std, -MOTION_Z_CLIP, MOTION_Z_CLIP)
        noise = float(slot.attrs.get("feature_noise", 0.0))
        if ctx.training and noise > 0:
            row = row + noise * np.random.default_rng(ctx.rng.getrandbits(64)).standard_normal(row.shape)
        return SlotEncoding("MOTION", features=torch.from_numpy(row).float()[None],
                            positions=torch.zeros(1, 3, dtype=torch.long), meta={"frames": int(len(frames))})


@ADAPTERS.register("pose_summary")
class PoseSummaryAdapter(Adapter):
    """A pose-summary row ``[N, 3·J]`` → ``[N, D]``: an MLP."""

    def __init__(self, feature_dim: int, d_model: int) -> None:
        super().__init__(feature_dim, d_model)
        self.mlp = nn.Sequential(nn.Linear(feature_dim, d_model), nn.GELU(), nn.Linear(d_model, d_model))

    def forward(self, features_NF: torch.Tensor, positions_N3: torch.Tensor) -> torch.Tensor:
        return self.mlp(features_NF)
