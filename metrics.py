"""Frame metrics of Finn et al. (2016), as the course grades them: PSNR and SSIM per channel, averaged
over channels. Twice: `finn_eval_seq`, the course sample's signature in plain NumPy, and `batch_metrics`,
the same numbers for whole batches in torch (tested equal to 1e-5), which the pipeline uses.

    python -c "import metrics; help(metrics.batch_metrics)"
"""
import functools

import numpy as np
import torch
import torch.nn.functional as F

MIN_MSE = 1e-10  # caps PSNR at 100 dB so one identical frame cannot make an average infinite


def _gaussian_1d(size=11, sigma=1.5):
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-ax ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def _gaussian_window(size=11, sigma=1.5):
    """The 11x11 Gaussian SSIM window (sum 1): the outer product of the normalised 1-D window."""
    g = _gaussian_1d(size, sigma)
    return np.outer(g, g)


def finn_psnr(x, y, data_range=1.0):
    """PSNR of one channel: -10 log10(mean((x - y)^2)) for data range 1 (Finn et al. 2016)."""
    mse = max(float(np.mean((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)), MIN_MSE)
    return 10 * np.log10(data_range ** 2 / mse)


def finn_ssim(x, y, data_range=1.0):
    """Mean SSIM of one channel: 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, 'valid' support."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    w = _gaussian_window()
    win = lambda a: np.einsum("ijkl,kl->ij", np.lib.stride_tricks.sliding_window_view(a, w.shape), w)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu1, mu2 = win(x), win(y)
    s11, s22, s12 = win(x * x) - mu1 ** 2, win(y * y) - mu2 ** 2, win(x * y) - mu1 * mu2
    ssim_map = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s11 + s22 + c2))
    return float(ssim_map.mean())


def finn_eval_seq(gt, pred):
    """The sample's metric signature. gt, pred: time-major sequences of (B, C, H, W) arrays in [0, 1].

    Returns (mse, ssim, psnr), each (B, T): MSE over the image; SSIM and PSNR per channel, averaged
    over channels.
    """
    gt = [np.asarray(g.detach().cpu() if torch.is_tensor(g) else g, np.float64) for g in gt]
    pred = [np.asarray(p.detach().cpu() if torch.is_tensor(p) else p, np.float64) for p in pred]
    T, B, C = len(gt), gt[0].shape[0], gt[0].shape[1]
    mse, ssim, psnr = np.zeros((B, T)), np.zeros((B, T)), np.zeros((B, T))
    for t in range(T):
        for i in range(B):
            mse[i, t] = np.mean((gt[t][i] - pred[t][i]) ** 2)
            ssim[i, t] = np.mean([finn_ssim(gt[t][i][c], pred[t][i][c]) for c in range(C)])
            psnr[i, t] = np.mean([finn_psnr(gt[t][i][c], pred[t][i][c]) for c in range(C)])
    return mse, ssim, psnr


def batch_psnr(gt, pred):
    """Per-channel PSNR averaged over channels, for frames (..., C, H, W) in [0, 1] -> (...), float64."""
    return _psnr(_mse(gt.float(), pred.float(), (-2, -1))).mean(-1)


def _mse(x, y, dims):
    # Differences in float32 (exact enough for 8-bit frames), their mean accumulated in float64.
    return (x - y).pow(2).mean(dim=dims, dtype=torch.float64)


def _psnr(mse):
    return -10 * torch.log10(mse.clamp_min(MIN_MSE))


SSIM_CHUNK = 128  # planes per pass: the windowed maps of a chunk stay in the CPU caches


def batch_metrics(gt, pred, compiled=False):
    """(PSNR, SSIM) of frames (..., C, H, W) in [0, 1]: each per channel, averaged over channels -> (...), float64.

    The same numbers as finn_eval_seq (within 1e-5, tested). Each (frame, channel) plane is one
    computation; they are done a cache-sized chunk at a time in float32. compiled: run the chunks
    through torch.compile, which fuses the windowing and the elementwise passes into one loop nest
    (2-3x faster on a CPU, after a one-time compilation of about ten seconds; needs a C++ compiler).
    """
    lead, (C, H, W) = gt.shape[:-3], gt.shape[-3:]
    x, y = gt.reshape(-1, H, W), pred.reshape(-1, H, W)  # (N, H, W), N = prod(lead) * C
    g = torch.as_tensor(_gaussian_1d(), dtype=torch.float32, device=gt.device)
    fn = _compiled_planes() if compiled else _planes
    out = []
    for i in range(0, x.shape[0], SSIM_CHUNK):
        xs, ys = x[i: i + SSIM_CHUNK].float(), y[i: i + SSIM_CHUNK].float()
        n = xs.shape[0]
        if compiled and n < SSIM_CHUNK:  # one static shape, so one compilation: pad with blank planes
            xs, ys = (F.pad(a, (0, 0, 0, 0, 0, SSIM_CHUNK - n)) for a in (xs, ys))
        out.append(torch.stack(fn(xs, ys, g), -1)[:n])  # (n, 2)
    psnr, ssim = torch.cat(out).reshape(*lead, C, 2).mean(-2).unbind(-1)
    return psnr, ssim


@functools.cache
def _compiled_planes():
    return torch.compile(_planes, dynamic=False)


def _planes(x, y, g):
    """PSNR and mean SSIM map of each plane: x, y (n, H, W) float32, g the 1-D window -> 2 x (n,) float64.

    The planes are first centred on their means, which leaves the (co)variances unchanged and removes
    the float32 cancellation in E[x^2] - E[x]^2. SSIM needs the two variances only through their sum,
    so with p = x + y and q = x - y four windowed maps suffice instead of five:
    s_xx + s_yy = (E[p^2] + E[q^2]) / 2 and 2 s_xy = (E[p^2] - E[q^2]) / 2 (means over the window).
    """
    psnr = _psnr(_mse(x, y, (-2, -1)))
    mx, my = x.mean((-2, -1), keepdim=True), y.mean((-2, -1), keepdim=True)  # (n, 1, 1)
    xc, yc = x - mx, y - my
    p, q = xc + yc, xc - yc
    m1c, m2c, pp, qq = _window(torch.stack([xc, yc, p * p, q * q], 1), g).unbind(1)  # each (n, H', W')
    mu1, mu2 = m1c + mx, m2c + my
    s_sum = 0.5 * (pp + qq) - (m1c * m1c + m2c * m2c)  # s11 + s22
    s12_2 = 0.5 * (pp - qq) - 2 * m1c * m2c  # 2 s12, rounded as s_sum is: exactly 1 for identical planes
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = ((2 * mu1 * mu2 + c1) * (s12_2 + c2)) / ((mu1 * mu1 + mu2 * mu2 + c1) * (s_sum + c2))
    return psnr, ssim_map.double().mean(dim=(-2, -1))


def _window(maps, g):
    """'valid' Gaussian windowing of maps (n, m, H, W) -> (n, m, H - k + 1, W - k + 1).

    The 2-D window is the outer product of the 1-D one, so it is 11 taps down then 11 across (22
    instead of 121 multiply-adds per pixel). Eagerly, one depthwise convolution per direction does it
    for all maps; under torch.compile, the same taps as shifted slices, which the compiler fuses with
    the surrounding elementwise work instead of calling out to a convolution.
    """
    n, m, H, W = maps.shape
    k = g.numel()
    Ho, Wo = H - k + 1, W - k + 1
    if torch.compiler.is_compiling():
        down = sum(g[i] * maps[:, :, i: i + Ho] for i in range(k))  # (n, m, Ho, W)
        return sum(g[i] * down[..., i: i + Wo] for i in range(k))
    flat = maps.reshape(1, n * m, H, W)  # one channel per map
    flat = F.conv2d(flat, g.view(1, 1, k, 1).expand(n * m, 1, k, 1).contiguous(), groups=n * m)
    flat = F.conv2d(flat, g.view(1, 1, 1, k).expand(n * m, 1, 1, k).contiguous(), groups=n * m)
    return flat.view(n, m, Ho, Wo)
