"""Shared pieces: the graded evaluation, metrics (Finn et al. 2016 PSNR/SSIM), checkpoints, plots, GIFs.

`evaluate` is the one evaluation used by validation in train_fixed_prior.py and by test.py, so their
numbers mean the same thing. Metrics come twice: `finn_eval_seq`, the sample's per-channel signature
and definitions in plain NumPy, and `batch_metrics`, the same numbers for whole batches in
torch, which the pipeline uses.

    python -c "import utils; help(utils.evaluate)"
"""
import csv
import functools
import io
import json
import math
import os
import random
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

from models.norm import fold_batch_norm

CHECKPOINT_FORMAT = "cvae-video-prediction"
CHECKPOINT_VERSION = 1
MIN_MSE = 1e-10  # caps PSNR at 100 dB so one identical frame cannot make an average infinite


# ----------------------------------------------------------------------------------------------------
# Metrics
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


# ----------------------------------------------------------------------------------------------------
# Process setup
def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the kernel.

    A training step frees and re-allocates the same few hundred MB of activations; by default glibc
    serves blocks above its mmap threshold with fresh mmaps and trims the heap after each free, so every
    step pays page faults to zero new pages again (about 9% of a CPU step here). Raising both
    thresholds (mallopt M_TRIM_THRESHOLD=-1, M_MMAP_THRESHOLD=-3) keeps the pages. Returns whether it
    applied: a no-op off glibc (macOS, Windows, musl).
    """
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-1, 2**31 - 1)) and bool(libc.mallopt(-3, 2**30))
    except (OSError, AttributeError):
        return False


# ----------------------------------------------------------------------------------------------------
# The graded evaluation protocol
def sequence_noise(indices, steps, z_dim, seed, device):
    """Standard normal z noise (B, steps, z_dim), a function of (seed, sequence index) alone, so scores do
    not depend on batch size, worker count or order."""
    out = torch.empty(len(indices), steps, z_dim)
    for row, idx in enumerate(indices):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(idx))
        out[row] = torch.randn(steps, z_dim, generator=g)
    return out.to(device)


def autocast(device, amp):
    """Autocast context for --amp {off, bf16, fp16}."""
    if amp == "off":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class CondPermuted(torch.utils.data.Dataset):
    """Ablation view of a dataset: sequence i gets the conditions of sequence perm[i]."""

    def __init__(self, dataset, perm):
        self.dataset, self.perm = dataset, perm

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0], self.dataset[int(self.perm[i])][1]


def cond_ablation(dataset, mode, seed):
    """'real' (unchanged), 'shuffled' (a fixed derangement across sequences) or 'zero' (handled in evaluate)."""
    if mode != "shuffled":
        return dataset
    n = len(dataset)
    if n < 2:
        raise ValueError("--cond_mode shuffled needs at least 2 sequences")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    perm = np.roll(perm, 1)[np.argsort(perm)]  # i -> the element after i in a random cycle: no fixed points
    return CondPermuted(dataset, perm)


@torch.no_grad()
def evaluate(model, dataset, n_past, n_future, device, batch_size=32, num_workers=0, seed=1, amp="off",
             cond_mode="real", keep=(), compile_metrics=False):
    """Graded protocol (SPEC Sec. 4) on every sequence of `dataset`, each exactly once, in order.

    Frames 0..n_past-1 are given; frames n_past..n_past+n_future-1 are predicted without teacher
    forcing, z from the prior N(0, I) (one sample, noise fixed per sequence by `seed`); scored with
    per-channel PSNR and SSIM averaged over channels, then over all (sequence, predicted frame).
    `keep`: sequence indices whose (gt, pred) clips are returned for GIFs. BatchNorm runs in eval mode,
    folded into the layers before it (models.norm.fold_batch_norm: an inference copy; `model` is not
    touched). compile_metrics: score with the torch.compile'd metrics (batch_metrics).
    """
    model = fold_batch_norm(model)
    ds = cond_ablation(dataset, cond_mode, seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, drop_last=False,
                                         num_workers=num_workers)
    T = n_past + n_future
    psnr, ssim, copy_psnr, kept, offset = [], [], [], {}, 0
    for frames, conds in loader:
        B = frames.shape[0]
        frames, conds = frames[:, :T].to(device), conds[:, :T].to(device)  # (B, T, C, H, W), (B, T, 7)
        if cond_mode == "zero":
            conds = model.cond_mean.expand_as(conds)  # the embedding sees zeros after standardisation
        noise = sequence_noise(range(offset, offset + B), T - 1, model.z_dim, seed, device)
        with autocast(device, amp):
            out = model(frames, conds, n_past, teacher_forcing=False, prior=True, noise=noise, decode_from=n_past)
        pred = out["pred"].float().clamp(0, 1)  # (B, n_future, C, H, W): frames n_past..T-1
        gt = frames[:, n_past:]
        p, s = batch_metrics(gt, pred, compiled=compile_metrics)  # each (B, n_future)
        psnr.append(p.cpu())
        ssim.append(s.cpu())
        copy_psnr.append(batch_psnr(gt, frames[:, n_past - 1: n_past].expand_as(gt)).cpu())
        for i in keep:
            if offset <= i < offset + B:
                kept[i] = (frames[i - offset].cpu(), torch.cat([frames[i - offset, :n_past], pred[i - offset]]).cpu())
        offset += B
    psnr, ssim, copy_psnr = torch.cat(psnr), torch.cat(ssim), torch.cat(copy_psnr)  # (N, n_future)
    assert psnr.shape[0] == len(dataset), "every sequence must be scored exactly once"
    return {
        "psnr": psnr.mean().item(), "ssim": ssim.mean().item(),
        "psnr_per_step": psnr.mean(0).tolist(), "ssim_per_step": ssim.mean(0).tolist(),
        "psnr_std": psnr.mean(1).std(unbiased=False).item(), "n_sequences": psnr.shape[0],
        "copy_last_psnr": copy_psnr.mean().item(), "per_sequence_psnr": psnr.mean(1).tolist(),
        "clips": kept,
    }


# ----------------------------------------------------------------------------------------------------
# Checkpoints
class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which file and why."""


def rng_state():
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


# ----------------------------------------------------------------------------------------------------
# Logs, plots, GIFs
def run_name(args):
    """Run directory name exactly as the course sample forms it."""
    return ("rnn_size=%d-predictor-posterior-rnn_layers=%d-%d-n_past=%d-n_future=%d-lr=%.4f-g_dim=%d-z_dim=%d"
            "-last_frame_skip=%s-beta=%.7f" % (args.rnn_size, args.predictor_rnn_layers, args.posterior_rnn_layers,
                                                args.n_past, args.n_future, args.lr, args.g_dim, args.z_dim,
                                                args.last_frame_skip, args.beta))


METRIC_FIELDS = ["epoch", "step", "loss", "mse", "kld", "beta", "tfr", "lr", "val_psnr", "seconds"]


def read_metrics(path):
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [{k: (float(v) if v not in ("", None) else math.nan) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_curves(rows, path):
    """The four curves the course asks for: KL loss, MSE, validation PSNR, and tfr with the KL weight."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
    axes[0].plot(ep, [r["kld"] for r in rows], color="tab:purple")
    axes[0].set(title="KL loss (per step)", xlabel="epoch")
    axes[1].plot(ep, [r["mse"] for r in rows], color="tab:blue")
    axes[1].set(title="MSE (per step)", xlabel="epoch", yscale="log")
    val = [(r["epoch"], r["val_psnr"]) for r in rows if not math.isnan(r["val_psnr"])]
    axes[2].plot([v[0] for v in val], [v[1] for v in val], "o-", color="tab:green")
    axes[2].set(title="validation PSNR (dB)", xlabel="epoch")
    axes[3].plot(ep, [r["tfr"] for r in rows], color="tab:orange", label="teacher forcing ratio")
    axes[3].set(title="schedules", xlabel="epoch", ylabel="tfr", ylim=(-0.05, 1.05))
    ax2 = axes[3].twinx()
    betas = [r["beta"] for r in rows]
    ax2.plot(ep, betas, color="tab:red", label="KL weight")
    ax2.set(ylabel="KL weight", ylim=(-0.05 * max(max(betas), 1e-12), 1.05 * max(max(betas), 1e-12)))
    axes[3].legend(handles=axes[3].get_lines() + ax2.get_lines(), loc="center right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def _to_uint8(frames):
    """(T, C, H, W) in [0, 1] -> (T, H, W, C) uint8."""
    return (frames.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def _frame_border(img, color, width=2):
    img = img.copy()
    img[:width], img[-width:], img[:, :width], img[:, -width:] = color, color, color, color
    return img


def save_gif(path, gt, pred, n_past, scale=2, fps=4):
    """Ground truth beside prediction; given frames framed green, predicted frames framed red."""
    import imageio.v2 as imageio
    g, p = _to_uint8(gt), _to_uint8(pred)
    frames = []
    for t in range(len(g)):
        color = (0, 200, 0) if t < n_past else (220, 0, 0)
        row = np.concatenate([_frame_border(g[t], (128, 128, 128)), np.full((g.shape[1], 4, 3), 255, np.uint8),
                              _frame_border(p[t], color)], 1)
        frames.append(row.repeat(scale, 0).repeat(scale, 1))
    imageio.mimsave(path, frames, duration=1000 / fps, loop=0)


def save_strip(path, gt, pred, n_past, scale=2):
    """Per-step PNG: ground truth on the top row, prediction below, one column per frame."""
    from PIL import Image
    g, p = _to_uint8(gt), _to_uint8(pred)
    cols = [np.concatenate([_frame_border(g[t], (128, 128, 128)), _frame_border(p[t], (0, 200, 0) if t < n_past
                                                                                      else (220, 0, 0))], 0)
            for t in range(len(g))]
    Image.fromarray(np.concatenate(cols, 1).repeat(scale, 0).repeat(scale, 1)).save(path)


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))
