"""Shared fixtures: a tiny simulated data set in the lab layout, and helpers to write broken ones."""
import os
import shutil
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

# Sleeping OpenMP threads, as the scripts choose on a busy CPU: tests share the cores with their subprocesses.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# measured conv algorithms (evaluation.ALGORITHM_CACHE) of test runs and their subprocesses: not the user's cache
os.environ["SVG_CVAE_CACHE"] = tempfile.mkdtemp(prefix="svg-cvae-tests-")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
BAIR_REAL = os.path.join(REPO, "..", "shared", "bair_real")

# A model small enough to train a few iterations in seconds on a CPU.
TINY = ["--base_channels", "4", "--rnn_size", "16", "--g_dim", "8", "--z_dim", "4", "--cond_embed_dim", "4",
        "--batch_size", "4", "--num_workers", "0", "--no_progress", "--eval_batch_size", "3",
        "--conv_layouts", "off"]  # no layout measurement at start (a second per run); tests of it pass "auto"


@pytest.fixture(scope="session")
def sim_root(tmp_path_factory):
    """A few simulated sequences per split, generated once per test session."""
    from make_sim_dataset import generate
    root = tmp_path_factory.mktemp("sim")
    generate(str(root), n_train=8, n_validate=4, n_test=5, seed=0, workers=0, progress=False)
    return str(root)


@pytest.fixture
def sim_copy(sim_root, tmp_path):
    """A private copy of the simulated set that a test may damage."""
    dst = tmp_path / "data"
    shutil.copytree(sim_root, dst, ignore=shutil.ignore_patterns(".cache"))
    return str(dst)


def seq_dirs(root, split):
    from dataset import list_sequences
    return list_sequences(os.path.join(root, split))


def write_png(path, arr):
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)
