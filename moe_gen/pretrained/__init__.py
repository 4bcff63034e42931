"""Pretrained dense checkpoints in moe_gen's own transformer, and sparse upcycling.

    from moe_gen.pretrained import from_hf, upcycle
    model = from_hf("minilm", tasks)                       # BERT weights, a new decoder
    model, summary = upcycle(model, num_experts=8, top_k=2, router="attribute", layers="every_other")

``locate`` finds the checkpoints that ship inside installed packages (``checkpoints.py``);
``hf.py`` converts the BERT, Llama and Whisper families; ``ctranslate2.py`` reads Whisper's
CTranslate2 file; ``upcycle.py`` turns dense FFNs into MoE layers of identical experts.
"""

from moe_gen.pretrained.checkpoints import CHECKPOINTS, CheckpointMissing, locate
from moe_gen.pretrained.hf import HFCheckpoint, dense_config, from_hf, load_weights, read_checkpoint
from moe_gen.pretrained.upcycle import UpcycleSummary, upcycle

__all__ = ["CHECKPOINTS", "CheckpointMissing", "locate", "HFCheckpoint", "dense_config", "from_hf", "load_weights",
           "read_checkpoint", "UpcycleSummary", "upcycle"]
