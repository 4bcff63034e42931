"""The benchmark suite: built-in tasks over seven input modalities, plus numeric tables that the
package does not ship as presets, each with a fixed held-out split.

Every task is a ``moe_gen.tasks.Task`` declared by its instruction. Classification tasks also give
the raw features a classical model sees (pixels, pooled fbank, pose statistics, table values,
TF-IDF of text) and the label column, so a majority class, a logistic regression and a k-NN can be
scored on exactly the rows the models are scored on.

The numeric tables come from scikit-learn's bundled data (no download): breast_cancer (30 columns,
2 classes), wine (13 columns, 3 classes) and diabetes (10 columns, the regression target binned
into three classes at the tertiles of the training rows). Every 5th row is held out, as in the
presets. A row is ``{"table": {column: value}, "label": name}``: a one-row table of scalars, the
first thing a user writes.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Callable, Optional, Sequence

import numpy as np

from moe_gen.tasks import Task, load_preset, preset_info
from moe_gen.tasks.sources.moving_digits import DIGIT_QUESTION, DIRECTION_QUESTION
from moe_gen.tasks.sources.vision import DIGIT_NAMES, count_hypothesis

__all__ = ["SuiteTask", "SUITE", "suite_tasks", "TABLE_INSTRUCTION", "PRETRAINED_INPUTS"]

TABLE_INSTRUCTION = "[STRUCT:table] which class is this? -> [TEXT:label,closed_set]"


@dataclasses.dataclass(frozen=True)
class SuiteTask:
    """One task of the suite.

    Attributes:
        name: task name (a preset name for built-in tasks).
        modality: the input modalities, for the report (``"IMAGE+BOX"``).
        build: ``(split) -> Task``.
        metric: the metric the report compares (the task's first metric).
        higher_is_better: False for losses and error rates.
        features: ``(rows) -> [N, F]`` raw features for classical baselines, or None.
        label_column: the column a classical model predicts (classification tasks).
        text_features: the features are text (TF-IDF), not numbers.
        frozen_states: the frozen-encoder preprocessor its input slot is declared with
            (``pretrained_inputs``), whose mean-pooled states a second logistic regression reads.
    """

    name: str
    modality: str
    build: Callable[[str], Task]
    metric: str
    higher_is_better: bool = True
    features: Optional[Callable[[Sequence[dict]], object]] = None
    label_column: Optional[str] = None
    text_features: bool = False
    frozen_states: Optional[str] = None

    @property
    def classification(self) -> bool:
        return self.features is not None


# ---- raw features for classical baselines --------------------------------------------------------

def _gray(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    return image.mean(-1) if image.ndim == 3 else image


def _pool(image_HW: np.ndarray, size: int) -> np.ndarray:
    """Mean-pools a 2-D image to ``size × size`` (sides divisible by ``size``, else cropped)."""
    H, W = image_HW.shape
    fh, fw = max(H // size, 1), max(W // size, 1)
    image_HW = image_HW[: fh * size, : fw * size]
    return image_HW.reshape(size, fh, size, fw).mean((1, 3))


def pixel_features(rows: Sequence[dict], column: str = "image", size: int = 16) -> np.ndarray:
    """Gray pixels, mean-pooled to ``size × size`` when larger (8×8 digits stay as they are)."""
    out = []
    for row in rows:
        gray = _gray(row[column])
        out.append((gray if gray.shape[0] <= size else _pool(gray, size)).ravel())
    return np.stack(out)


def crop_features(rows: Sequence[dict], size: int = 8) -> np.ndarray:
    """Gray pixels inside the row's ``query_box``, resized to ``size × size`` (grounded captioning)."""
    from PIL import Image

    out = []
    for row in rows:
        x0, y0, x1, y1 = (int(round(v)) for v in row["query_box"])
        crop = _gray(row["image"])[max(y0, 0):max(y1, y0 + 1), max(x0, 0):max(x1, x0 + 1)]
        resized = Image.fromarray(crop.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR)
        out.append(np.asarray(resized).ravel())
    return np.stack(out)


def fbank_features(rows: Sequence[dict], segments: int = 8) -> np.ndarray:
    """The 80-bin log-mel filterbank (the model's features) with the utterance's mean removed
    (cepstral mean normalisation), averaged over ``segments`` equal stretches of time: a fixed-size
    picture of the word that keeps the order of its sounds."""
    from moe_gen.tasks.modalities.signals import fbank, load_waveform

    out = []
    for row in rows:
        feats = fbank(load_waveform(row["audio"], row.get("sample_rate"))).numpy()
        feats = feats - feats.mean(0)
        stretches = np.array_split(np.arange(len(feats)), segments)
        out.append(np.concatenate([feats[s].mean(0) if len(s) else np.zeros(feats.shape[1]) for s in stretches]))
    return np.stack(out)


def pose_features(rows: Sequence[dict]) -> np.ndarray:
    """Per-feature mean and standard deviation over the window's frames, and the mean frame-to-frame change."""
    out = []
    for row in rows:
        frames = np.asarray(row["motion"], dtype=np.float64)
        out.append(np.concatenate([frames.mean(0), frames.std(0), np.abs(np.diff(frames, axis=0)).mean(0)]))
    return np.stack(out)


def video_features(rows: Sequence[dict]) -> np.ndarray:
    """The mean frame (RGB, pooled to 8×8) and the mean absolute change between frames (pooled to 8×8)."""
    out = []
    for row in rows:
        video = np.asarray(row["video"], dtype=np.float32) / 255.0  # [T, H, W, 3]
        mean_rgb = np.stack([_pool(video[..., c].mean(0), 8) for c in range(3)])
        change = _pool(np.abs(np.diff(video.mean(-1), axis=0)).mean(0), 8)
        out.append(np.concatenate([mean_rgb.ravel(), change.ravel()]))
    return np.stack(out)


def question_features(rows: Sequence[dict], column: str, values: Sequence[str]) -> np.ndarray:
    """Pixel features with the question (``row[column]``, one of ``values``) one-hot after them."""
    one_hot = np.zeros((len(rows), len(values)), np.float32)
    for i, row in enumerate(rows):
        one_hot[i, list(values).index(row[column])] = 1.0
    return np.concatenate([pixel_features(rows), one_hot], axis=1)


def video_question_features(rows: Sequence[dict], column: str, values: Sequence[str]) -> np.ndarray:
    """``video_features``, the signed change from the first picture to the last (grey, pooled to 8×8: where
    something went and where it left) and the question (``row[column]``, one of ``values``) one-hot."""
    one_hot = np.zeros((len(rows), len(values)), np.float32)
    moves = []
    for i, row in enumerate(rows):
        one_hot[i, list(values).index(row[column])] = 1.0
        grey = np.asarray(row["video"], dtype=np.float32).mean(-1) / 255.0  # [T, H, W]
        moves.append(_pool(grey[-1] - grey[0], 8).ravel())
    return np.concatenate([video_features(rows), np.stack(moves), one_hot], axis=1)


def table_features(rows: Sequence[dict], column: str = "table") -> np.ndarray:
    """The cells of each one-row table ``{column: number}``, in column order."""
    return np.asarray([[float(v) for v in row[column].values()] for row in rows], dtype=np.float64)


def text_features(rows: Sequence[dict], column: str = "text") -> list[str]:
    return [str(row[column]) for row in rows]


def pair_text_features(rows: Sequence[dict], columns: Sequence[str]) -> list[str]:
    """The texts of ``columns`` joined by `` ||| `` (TF-IDF sees the words of both sides, not which
    side holds them)."""
    return [" ||| ".join(str(row[c]) for c in columns) for row in rows]


# ---- numeric tables from scikit-learn -------------------------------------------------------------

def _split(n: int, split: str) -> list[int]:
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; known: train, test")
    return [i for i in range(n) if (i % 5 == 0) == (split == "test")]


@functools.cache
def _sklearn_table(name: str) -> tuple[list[str], np.ndarray, list[str]]:
    """(columns, values [N, F], labels [N]) of a scikit-learn table."""
    from sklearn import datasets

    if name == "diabetes":
        data = datasets.load_diabetes()
        train = _split(len(data.target), "train")
        low, high = np.quantile(data.target[train], [1 / 3, 2 / 3])  # tertiles of the training rows
        labels = ["low" if y <= low else "high" if y > high else "medium" for y in data.target]
        return list(data.feature_names), data.data, labels
    loaders = {"breast_cancer": datasets.load_breast_cancer, "wine": datasets.load_wine}
    if name not in loaders:
        raise ValueError(f"unknown scikit-learn table {name!r}; known: diabetes, {', '.join(loaders)}")
    data = loaders[name]()
    return list(data.feature_names), data.data, [str(data.target_names[t]) for t in data.target]


def table_rows(name: str, split: str) -> list[dict]:
    """Rows ``{"table": {column: value}, "label": class}`` of a scikit-learn table."""
    columns, values, labels = _sklearn_table(name)
    return [{"table": {c: float(v) for c, v in zip(columns, values[i])}, "label": labels[i], "id": f"{name}/{i}"}
            for i in _split(len(labels), split)]


def _table_task(name: str) -> Callable[[str], Task]:
    def build(split: str) -> Task:
        return Task(f"table_{name}", TABLE_INSTRUCTION, table_rows(name, split), metrics=("accuracy",))

    return build


SUCCESSOR_INSTRUCTION = "[IMAGE:image] which digit comes after this one? -> [TEXT:label,closed_set]"


def successor_rows(split: str) -> list[dict]:
    """digit_classification's rows with the label moved on by one (0 → one, …, 9 → zero)."""
    from moe_gen.tasks.sources.vision import load_digit_images

    return [{"image": row["image"], "label": DIGIT_NAMES[(row["digit"] + 1) % 10], "id": row["id"]}
            for row in load_digit_images(split)]


def _successor_task(split: str) -> Task:
    return Task("digit_successor", SUCCESSOR_INSTRUCTION, successor_rows(split), metrics=("accuracy",))


def unseen_clip_rows(split: str) -> list[dict]:
    """Motion windows of the kinds that have two or more source clips (dance, getup, turn_left,
    turn_right, walk), each kind's last clip by name held out whole: "test" holds only windows of
    clips no training window comes from. (``motion_classification`` splits every clip by time, so
    its held-out windows are later frames of clips it trained on.) "all": the training windows, then
    the held-out ones."""
    from moe_gen.tasks.sources.motion import load_motion_clips

    if split not in ("train", "test", "all"):  # (any other split read as "train" before the fourteenth audit)
        raise ValueError(f"unknown split {split!r}; known: train, test, all")
    if split == "all":
        return unseen_clip_rows("train") + unseen_clip_rows("test")
    rows = load_motion_clips("whole")  # windows of whole clips, across the train/test split point
    clips: dict[str, set] = {}
    for row in rows:
        clips.setdefault(row["label"], set()).add(row["clip"])
    held = {label: max(names) for label, names in clips.items() if len(names) > 1}
    return [row for row in rows if row["label"] in held and (row["clip"] == held[row["label"]]) == (split == "test")]


def _unseen_clips_task(split: str) -> Task:
    return Task("motion_unseen_clips", preset_info("motion_classification").instruction, unseen_clip_rows(split),
                metrics=("accuracy",))


def _preset(name: str) -> Callable[[str], Task]:
    return functools.partial(load_preset, name)


def _builtin(name: str, modality: str, **kwargs) -> SuiteTask:
    info = preset_info(name)
    from moe_gen.trainer.evaluation import LOWER_IS_BETTER

    return SuiteTask(name, modality, _preset(name), info.metrics[0],
                     higher_is_better=info.metrics[0] not in LOWER_IS_BETTER, **kwargs)


SUITE: tuple[SuiteTask, ...] = (
    _builtin("digit_classification", "IMAGE", features=functools.partial(pixel_features, size=8),
             label_column="label"),
    _builtin("digit_counting", "IMAGE", features=pixel_features, label_column="count"),
    _builtin("grounded_captioning", "IMAGE+BOX", features=crop_features, label_column="query"),
    _builtin("visual_grounding", "IMAGE+TEXT"),
    _builtin("digit_detection", "IMAGE"),
    _builtin("spoken_word_classification", "AUDIO", features=fbank_features, label_column="text"),
    _builtin("motion_classification", "MOTION", features=pose_features, label_column="label"),
    _builtin("video_classification", "VIDEO", features=video_features, label_column="label"),
    _builtin("table_species", "STRUCT", features=table_features, label_column="species"),
    _builtin("table_qa", "STRUCT", features=table_features, label_column="longer"),
    _builtin("doc_topic", "TEXT", features=text_features, label_column="topic", text_features=True),
    _builtin("text_to_speech", "PHONE"),
    SuiteTask("table_breast_cancer", "STRUCT", _table_task("breast_cancer"), "accuracy",
              features=table_features, label_column="label"),
    SuiteTask("table_wine", "STRUCT", _table_task("wine"), "accuracy", features=table_features,
              label_column="label"),
    SuiteTask("table_diabetes", "STRUCT", _table_task("diabetes"), "accuracy", features=table_features,
              label_column="label"),
)


# Tasks run only when named (``--tasks``): newer presets, kept out of the default suite so that its
# published table stays comparable.
EXTRA: tuple[SuiteTask, ...] = (
    _builtin("sudoku_4x4", "TEXT"),
    _builtin("text_to_sql", "TEXT"),
    _builtin("vqa_digits", "IMAGE+TEXT", label_column="answer",
             features=functools.partial(question_features, column="asked", values=DIGIT_NAMES)),
    _builtin("visual_entailment", "IMAGE+TEXT", label_column="relation",
             features=functools.partial(question_features, column="hypothesis",
                                        values=[count_hypothesis(n) for n in (1, 2, 3)])),
    _builtin("reply_matching", "TEXT", label_column="answer", text_features=True,
             features=functools.partial(pair_text_features, columns=("first", "second"))),
    _builtin("language_identification", "TEXT", features=text_features, label_column="language",
             text_features=True),
    _builtin("few_shot_instructions", "TEXT"),
    _builtin("docstring_summary", "TEXT"),
    _builtin("video_qa", "VIDEO+TEXT", label_column="answer",
             features=functools.partial(video_question_features, column="question",
                                        values=(DIRECTION_QUESTION, DIGIT_QUESTION))),
    _builtin("text_to_image", "TEXT"),
    _builtin("text_to_image_maskgit", "TEXT"),
    _builtin("digit_masked_modeling", "IMAGE", features=functools.partial(pixel_features, size=8),
             label_column="label"),
    _builtin("image_infilling", "IMAGE+TEXT"),
    # digit_classification's images answered with the next digit: a task that conflicts with it
    # (the same inputs, a different answer from the same words), to see what routing by task does
    # where tasks interfere
    SuiteTask("digit_successor", "IMAGE", _successor_task, "accuracy",
              features=functools.partial(pixel_features, size=8), label_column="label"),
    # motion kinds recognised in clips no training window comes from (motion_classification holds out
    # the last frames of every clip instead)
    SuiteTask("motion_unseen_clips", "MOTION", _unseen_clips_task, "accuracy", features=pose_features,
              label_column="label"),
)


# ``pretrained_inputs``: the input slot of these tasks is read by a frozen pretrained encoder
# (``moe_gen.tasks.modalities.frozen``) instead of the model's own token embedding or fbank stem.
PRETRAINED_INPUTS: dict[str, tuple[str, str]] = {
    "doc_topic": ("[TEXT:text]", "bert_states"),
    "spoken_word_classification": ("[AUDIO:audio]", "whisper_states"),
}


# ``bag_of_words``: the text input of these tasks is read as TF-IDF weights of a vocabulary fitted on
# the training rows (``moe_gen.tasks.modalities.bag_of_words``) instead of as sentencepiece tokens.
BAG_OF_WORDS_INPUTS: dict[str, tuple[str, str]] = {"doc_topic": ("[TEXT:text]", "bag_of_words")}

# ``subword_sampling``: the text input of these tasks is read as pieces of segmentations drawn in
# training (the TEXT slot's ``subword_sampling=alpha``; subword regularisation).
SUBWORD_SAMPLING_INPUTS: dict[str, tuple[str, str]] = {"doc_topic": ("[TEXT:text]", "text")}

# ``pose_summary``: the pose windows of these tasks are read as one row of per-feature window
# statistics (``moe_gen.tasks.modalities.pose_summary``) instead of frame by frame.
POSE_SUMMARY_INPUTS: dict[str, tuple[str, str]] = {"motion_classification": ("[MOTION:motion]", "pose_summary")}


def _with_preprocess(task: SuiteTask, slot: str, preprocess: str, frozen: bool) -> SuiteTask:
    """``task`` declared with its input ``slot`` read by ``preprocess``: the preset's rows, metrics
    and objective, its instruction with ``preprocess=`` added to that slot (``frozen``: a frozen
    encoder's states, which a second logistic regression reads too)."""
    info = preset_info(task.name)
    if info.instruction.count(slot) != 1:
        raise ValueError(f"suite task {task.name!r}: its instruction {info.instruction!r} should hold {slot} once")
    instruction = info.instruction.replace(slot, f"{slot[:-1]},preprocess={preprocess}]")

    def build(split: str) -> Task:
        return Task(task.name, instruction, info.build(split), objective=info.objective, metrics=info.metrics)

    return dataclasses.replace(task, build=build, frozen_states=preprocess if frozen else None)


def suite_tasks(names: Optional[Sequence[str]] = None, *, pretrained_inputs: bool = False,
                bag_of_words: bool = False, pose_summary: bool = False, pose_noise: float = 0.0,
                pose_min_length: int = 0, subword_sampling: float = 0.0) -> list[SuiteTask]:
    """The suite, or the named tasks (of the suite or ``EXTRA``, in that order); unknown names are
    an error. With ``pretrained_inputs`` the tasks of ``PRETRAINED_INPUTS`` read their input
    through a frozen pretrained encoder; with ``bag_of_words`` those of ``BAG_OF_WORDS_INPUTS``
    read their text as a bag of words (not both: they declare the same slot); with
    ``pose_summary`` those of ``POSE_SUMMARY_INPUTS`` read their pose windows as window statistics,
    perturbed in training by Gaussian noise of std ``pose_noise`` (the slot's ``feature_noise``)
    and, with ``pose_min_length``, taken over a training window of a random length of that many
    frames or more (the slot's ``min_length``); with ``subword_sampling`` (alpha) those of
    ``SUBWORD_SAMPLING_INPUTS`` draw segmentations of their text in training."""
    if sum(map(bool, (pretrained_inputs, bag_of_words, subword_sampling))) > 1:
        raise ValueError("pretrained_inputs, bag_of_words and subword_sampling each redeclare doc_topic's text input; "
                         "choose one")
    if (pose_noise or pose_min_length) and not pose_summary:
        raise ValueError("pose_noise and pose_min_length change the pose-summary rows; they need pose_summary")
    options = (f",feature_noise={float(pose_noise)!r}" if pose_noise else "") + \
        (f",min_length={int(pose_min_length)}" if pose_min_length else "")
    summary = {name: (slot, preprocess + options) for name, (slot, preprocess) in POSE_SUMMARY_INPUTS.items()}
    every = SUITE + EXTRA
    known = {t.name for t in every}
    unknown = [n for n in names or () if n not in known]
    if unknown:
        raise ValueError(f"unknown suite task(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    chosen = list(SUITE) if not names else [t for t in every if t.name in set(names)]
    if {"motion_classification", "motion_unseen_clips"} <= {t.name for t in chosen}:
        # (measured: a generalist trained on both scored 0.97 on "unseen" clips, its specialist 0.76)
        raise ValueError("motion_unseen_clips holds out clips whose first 70% motion_classification trains on: "
                         "a generalist of both would have seen them; run motion_unseen_clips without "
                         "motion_classification")
    if {"language_identification", "reply_matching"} <= {t.name for t in chosen}:
        warnings.warn("language_identification's English test turns are chatterbot turns, 42 of its 60 also "
                      "reply_matching training inputs (and 76 of reply_matching's 454 test rows hold a "
                      "language_identification training turn): a generalist of both has read them, its specialists "
                      "and the classical baselines have not", UserWarning, stacklevel=2)
    sampled = {name: (slot, f"{preprocess},subword_sampling={float(subword_sampling)!r}")
               for name, (slot, preprocess) in SUBWORD_SAMPLING_INPUTS.items()}
    redeclared = [(inputs, frozen) for inputs, frozen, wanted in (
        (PRETRAINED_INPUTS, True, pretrained_inputs), (BAG_OF_WORDS_INPUTS, False, bag_of_words),
        (summary, False, pose_summary), (sampled, False, subword_sampling)) if wanted]
    for inputs, frozen in redeclared:  # each redeclares other tasks' slots
        chosen = [_with_preprocess(t, *inputs[t.name], frozen) if t.name in inputs else t for t in chosen]
    return chosen
