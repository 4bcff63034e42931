"""FSDP on a CUDA device (marked ``gpu``: run with ``-m gpu`` where a GPU is lent; ``scripts/gpu_checks.sh``
runs it). A one-process NCCL group is enough to shard and gather."""

from __future__ import annotations

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_an_unsharded_copy_of_a_sharded_gpu_model_is_on_the_gpu(tmp_path):
    """The copy evaluation runs (Trainer.trained_model) was built on the CPU, so a GPU run evaluated
    there, and under expert parallelism sent CPU tensors through NCCL (found by reading, fourteenth
    session's audit; this test had not run on a GPU when it was written)."""
    import torch.distributed as dist

    from moe_gen.fsdp import shard_dense, unsharded_copy
    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.tasks import Tokenizer, load_preset

    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = GeneralistModel.build(flavour("debug"), [load_preset("digit_classification", "train", limit=4)],
                                      Tokenizer.default()).cuda()
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        shard_dense(model)
        copy = unsharded_copy(model)
        assert {p.device.type for p in copy.parameters()} == {"cuda"}
        assert all(torch.equal(copy.state_dict()[k], v) for k, v in before.items())
    finally:
        dist.destroy_process_group()
