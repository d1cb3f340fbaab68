"""Checkpoints and files that survive crashes: atomic writes, save/load with torch.load(weights_only=True),
and the RNG states an exact resume needs.

    python -c "import checkpoints; print(sorted(checkpoints.load_checkpoint('logs/demo/<run>/last.pth')))"
"""
import json
import os
import random
import tempfile

import numpy as np
import torch

CHECKPOINT_FORMAT = "cvae-video-prediction"
CHECKPOINT_VERSION = 1


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# The mode a plain open() would give a new file; mkstemp's 0600 would hide a run from a teammate or a
# TensorBoard server running as another user.
FILE_MODE = 0o666 & ~_umask()


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which file and why."""


def rng_state():
    """Python, NumPy, torch and CUDA generator states, as tensors and lists that weights_only loading accepts."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_write(path, write_fn):
    """Write via a temporary file in the same directory, fsync, then rename: a crash or a full disk
    mid-write leaves the previous file intact. Raises OSError with the path on failure."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"could not write {path}: {e.strerror or e}") from e
        raise


def save_checkpoint(path, obj):
    obj = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **obj}
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, map_location="cpu"):
    """Load with torch.load(weights_only=True) only: no pickled code is ever executed."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, arbitrary bytes
        raise CheckpointError(f"{path}: not a readable checkpoint of this project (truncated, corrupt, "
                              f"or a pickled object that weights_only loading refuses): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no '{CHECKPOINT_FORMAT}' tag); "
                              f"checkpoints of the course sample pickle whole modules and cannot be loaded safely")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {ckpt.get('version')}, this code reads "
                              f"version {CHECKPOINT_VERSION}")
    return ckpt


def load_model_state(model, ckpt, path):
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the architecture saved with them "
                              f"({str(e).splitlines()[1] if len(str(e).splitlines()) > 1 else e})") from None


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))
