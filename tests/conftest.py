"""Shared test fixtures: offline hub, deterministic seeds, small random inputs with tags."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run in its interpreter (triton reads this when it is first imported,
# which importing torch does not do).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tok():
    """The package's default tokenizer (a module may define its own ``tok``, which wins there)."""
    from moe_gen.tasks import Tokenizer

    return Tokenizer.default()


@pytest.fixture(scope="module")
def mixed(tok):
    """(tasks, samples) of seven presets over many modalities (``helpers.mixed_tasks``)."""
    from helpers import mixed_tasks

    return mixed_tasks(tok)


# Property tests draw the same examples on every run, so CI results do not depend on luck; run
# with HYPOTHESIS_PROFILE=explore to search with fresh random examples.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
