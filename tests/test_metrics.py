"""finn_eval_seq and the batched torch metrics against a direct, independent implementation."""
import math

import numpy as np
import pytest
import torch

import metrics
import utils


def _ref_psnr(x, y):
    return 10 * math.log10(1.0 / float(np.mean((x - y) ** 2)))


def _ref_ssim(x, y):
    """SSIM written out position by position: 11x11 Gaussian (sigma 1.5), 'valid' windows."""
    r = np.arange(-5, 6)
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5 ** 2))
    g /= g.sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            ma, mb = (g * a).sum(), (g * b).sum()
            va, vb = (g * a * a).sum() - ma ** 2, (g * b * b).sum() - mb ** 2
            cov = (g * a * b).sum() - ma * mb
            vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def _pair(T=3, B=2, size=24):
    rng = np.random.default_rng(0)
    gt = rng.random((T, B, 3, size, size))
    pred = np.clip(gt + rng.normal(0, 0.1, gt.shape), 0, 1)
    return gt, pred


def test_finn_eval_seq_matches_reference():
    gt, pred = _pair()
    mse, ssim, psnr = utils.finn_eval_seq(list(gt), list(pred))
    assert mse.shape == ssim.shape == psnr.shape == (2, 3)  # (B, T)
    for t in range(3):
        for i in range(2):
            assert np.isclose(psnr[i, t], np.mean([_ref_psnr(gt[t, i, c], pred[t, i, c]) for c in range(3)]))
            assert np.isclose(ssim[i, t], np.mean([_ref_ssim(gt[t, i, c], pred[t, i, c]) for c in range(3)]))
            assert np.isclose(mse[i, t], np.mean((gt[t, i] - pred[t, i]) ** 2))


@pytest.mark.parametrize("chunk,compiled", [(128, False), (7, False), pytest.param(7, True, marks=pytest.mark.slow)])  # one pass; a ragged last one
def test_batched_metrics_equal_finn_eval_seq(chunk, compiled, monkeypatch):
    monkeypatch.setattr(metrics, "SSIM_CHUNK", chunk)
    gt, pred = _pair(T=4, B=3, size=64)
    _, ssim, psnr = utils.finn_eval_seq(list(gt), list(pred))
    g = torch.from_numpy(gt).permute(1, 0, 2, 3, 4).float()  # (B, T, C, H, W)
    p = torch.from_numpy(pred).permute(1, 0, 2, 3, 4).float()
    _, ssim32, psnr32 = utils.finn_eval_seq(list(g.permute(1, 0, 2, 3, 4)), list(p.permute(1, 0, 2, 3, 4)))
    psnr_b, ssim_b = metrics.batch_metrics(g, p, compiled=compiled)
    assert psnr_b.shape == ssim_b.shape == (3, 4)  # (B, T)
    np.testing.assert_allclose(psnr_b.numpy(), psnr32, atol=1e-5)
    np.testing.assert_allclose(ssim_b.numpy(), ssim32, atol=1e-5)
    np.testing.assert_allclose(metrics.batch_psnr(g, p).numpy(), psnr32, atol=1e-5)
    np.testing.assert_allclose(psnr32, psnr, atol=1e-4)  # float32 inputs vs float64


def test_identical_frames_give_finite_psnr():
    x = torch.rand(2, 3, 3, 64, 64)
    psnr, ssim = metrics.batch_metrics(x, x)
    assert torch.isfinite(psnr).all() and torch.isfinite(metrics.batch_psnr(x, x)).all()
    assert ssim.sub(1).abs().max() < 1e-9
