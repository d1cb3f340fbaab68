"""Pictures of a run: training curves, prediction GIFs and strips, the sample grid, per-step sample curves.

    python -c "import plots, run_log; plots.plot_curves(run_log.read_metrics('m.csv'), 'curves.png')"
"""
import io
import math

import numpy as np

import checkpoints


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=90):
    """Write a figure as PNG atomically (a reader never sees half a file) and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    checkpoints.atomic_write(path, lambda f: f.write(buf.getvalue()))


def plot_curves(rows, path):
    """The four curves the course asks for (KL loss, MSE, validation PSNR, and tfr with the KL weight), the
    number of active latent dimensions beside the KL (and each latent level's KL with --latent_levels > 1),
    and the KL per time step at the last validation."""
    plt = pyplot()
    ep = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 5, figsize=(22, 3.6))
    axes[0].plot(ep, [r["kld"] for r in rows], color="tab:purple", label="KL (train)")
    axes[0].set(title="KL loss (per step)", xlabel="epoch", ylabel="nats")
    levels = [r.get("kld_levels") for r in rows]  # with --latent_levels > 1: each level's KL, global z first
    if levels and all(isinstance(lv, list) and len(lv) == len(levels[0]) > 1 for lv in levels):
        for i in range(len(levels[0])):
            axes[0].plot(ep, [lv[i] for lv in levels], ":", label="global z" if i == 0 else f"level {i + 1}")
    active = [(r["epoch"], r.get("active_dims", math.nan)) for r in rows if not math.isnan(r.get("active_dims", math.nan))]
    if active:
        ax = axes[0].twinx()
        ax.plot([a[0] for a in active], [a[1] for a in active], "s--", color="tab:gray", label="active dims (val)")
        ax.set(ylabel="active latent dims", ylim=(-0.5, max(a[1] for a in active) + 1.5))
        axes[0].legend(handles=axes[0].get_lines() + ax.get_lines(), loc="upper right", fontsize=8)
    elif len(axes[0].get_lines()) > 1:
        axes[0].legend(loc="upper right", fontsize=8)
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
    last = [r for r in rows if isinstance(r.get("val_kld_per_step"), list)]
    if last:
        kl_t = last[-1]["val_kld_per_step"]
        axes[4].bar(range(1, len(kl_t) + 1), kl_t, color="tab:purple")
    axes[4].set(title="KL per time step (last validation)", xlabel="time step t", ylabel="nats")
    fig.tight_layout()
    save_figure(fig, path)


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


def _label(img, text, scale):
    """img (H, W, 3) uint8 with `text` drawn in its top-left corner (PIL's built-in font)."""
    from PIL import Image, ImageDraw
    im = Image.fromarray(img)
    ImageDraw.Draw(im).text((2, 1), text, fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0))
    return np.asarray(im)


def save_sample_grid(path_stem, clip, n_past, n_random=3, seed=0, scale=2):
    """The sample grid of a sequence as <path_stem>.png (one column per frame) and <path_stem>.gif (rows
    side by side, animated): ground truth, posterior reconstruction, the best sample by PSNR, and
    `n_random` other samples, each row labelled. clip: evaluation.evaluate's kept clip with samples."""
    import imageio.v2 as imageio
    import torch
    from PIL import Image
    from metrics import batch_psnr
    gt, given, samples = clip["gt"], clip["gt"][:n_past], clip["samples"]  # samples (N, n_future, C, H, W)
    T = n_past + samples.shape[1]
    gt = gt[:T]
    best = int(batch_psnr(gt[n_past:].expand_as(samples), samples).mean(1).argmax())
    others = [i for i in range(samples.shape[0]) if i != best]
    pick = torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[:n_random].tolist()
    rows = [("truth", gt), ("posterior", torch.cat([given, clip["posterior"]])),
            (f"best of {samples.shape[0]} (PSNR)", torch.cat([given, samples[best]]))]
    rows += [(f"sample {others[i]}", torch.cat([given, samples[others[i]]])) for i in pick]
    imgs = [(name, _to_uint8(frames)) for name, frames in rows]  # each (T, H, W, 3)
    color = lambda t: (0, 200, 0) if t < n_past else (220, 0, 0)
    grid = np.concatenate([np.concatenate([_frame_border(f[t], color(t)) for t in range(T)], 1) for _, f in imgs], 0)
    H = imgs[0][1].shape[1]
    for r, (name, _) in enumerate(imgs):  # label the first frame of each row
        grid[r * H:(r + 1) * H, :H] = _label(np.ascontiguousarray(grid[r * H:(r + 1) * H, :H]), name.split(" (")[0][:10], scale)
    Image.fromarray(grid.repeat(scale, 0).repeat(scale, 1)).save(path_stem + ".png")
    frames = []
    for t in range(T):
        row = np.concatenate([_label(_frame_border(f[t], color(t)).repeat(scale, 0).repeat(scale, 1), name[:18], scale)
                              for name, f in imgs], 1)
        frames.append(row)
    imageio.mimsave(path_stem + ".gif", frames, duration=250, loop=0)


def plot_sample_curves(metrics, path, n_past):
    """Per-step PSNR and SSIM of the best, mean and worst of N samples beside the graded single sample and
    copy-last, from evaluate()'s result with n_samples > 1."""
    plt = pyplot()
    s = metrics["samples"]
    steps = range(n_past, n_past + len(metrics["psnr_per_step"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key in zip(axes, ("psnr", "ssim")):
        for name, style in (("best", "-"), ("mean", "--"), ("worst", ":")):
            ax.plot(steps, s[key][f"{name}_per_step"], style, color="tab:blue", label=f"{name} of {s['n_samples']}")
        ax.plot(steps, metrics[f"{key}_per_step"], color="tab:green", label="graded (sample 0)")
        if key == "psnr":
            ax.plot(steps, metrics["copy_last_psnr_per_step"], color="tab:gray", label="copy last frame")
        ax.set(title=f"{key.upper()} per predicted frame", xlabel="frame", ylabel=key.upper() + (" (dB)" if key == "psnr" else ""))
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
