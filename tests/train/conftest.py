"""Fixtures shared by the stage-1 tests (train_test, scaling_fields_test)."""

import os

import pytest

from configs import tiny
from d2g_jax import pipeline
from d2g_jax.workdir import TINY_PROMPTS


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One tiny teacher and one pair set shared by the tests (each run still has its own workdir)."""
    base = str(tmp_path_factory.mktemp("stage1"))
    with open(os.path.join(base, "prompts.txt"), "w") as f:
        f.write("\n".join(TINY_PROMPTS) + "\n")
    c = tiny.get_config()
    c.pairs.num_pairs = 48
    c.pairs.prompts = os.path.join(base, "prompts.txt")
    pipeline.run_pairs(c, base)
    return os.path.join(base, "tiny_teacher"), os.path.join(base, "pairs")
