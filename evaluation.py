"""The graded evaluation protocol, and the field's evaluation over many samples beside it.

`evaluate` is the one evaluation used by validation in train_fixed_prior.py and by test.py, so their
numbers mean the same thing. Graded (README, "Evaluation"): every sequence once, in order; frames
0..n_past-1 given, the next n_future predicted without teacher forcing, z from the prior (one sample,
noise fixed by (seed, sequence)); PSNR and SSIM per channel, averaged over channels, then over every
(sequence, predicted frame). With n_samples > 1, also N prior samples per sequence, noise fixed by
(seed, sequence, sample), summarised as SVG, SAVP and SRVP report them: best of N chosen per metric by
its mean over the predicted frames, mean and worst of N, 95% confidence intervals over sequences
(1.96 std / sqrt(n)), and diversity (per-pixel std across samples; mean pairwise LPIPS, SAVP Sec. 5).

    python -c "import evaluation; help(evaluation.evaluate)"
"""
import itertools
import json
import math
import os
import time

import numpy as np
import torch

import checkpoints
from metrics import batch_metrics, batch_psnr
from models import fast
from runtime import autocast, cpu_info


def sequence_noise(indices, steps, z_dim, seed, device, sample=0, spatial=()):
    """Standard normal z noise (B, steps, z_dim), a function of (seed, sequence index, sample) alone, so
    scores do not depend on batch size, worker count or order. Sample 0 is the graded one.

    spatial: the spatial latent levels' shapes per step (CVAE.noise_shapes()[1:]); when given, the result
    is the list [global (B, steps, z_dim), level 2 (B, steps, *shape), ...], each row's levels drawn from
    the same stream after its global noise, so the global noise is the same as without them."""
    out = [torch.empty(len(indices), steps, *shape) for shape in [(z_dim,), *spatial]]
    for row, idx in enumerate(indices):
        if sample == 0:
            s = int(seed) * 1_000_003 + int(idx)
        else:  # independent streams for every (seed, sequence, sample) triple
            s = int(np.random.SeedSequence([int(seed), int(idx), int(sample)]).generate_state(1, np.uint64)[0] >> 1)
        g = torch.Generator().manual_seed(s)
        for level in out:
            level[row] = torch.randn(level.shape[1:], generator=g)
    return [level.to(device) for level in out] if spatial else out[0].to(device)


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
@fast.keeps_inference_algorithms
def evaluate(model, dataset, n_past, n_future, device, batch_size=32, num_workers=0, seed=1, amp="off",
             cond_mode="real", keep=(), compile_metrics=False, n_samples=1, lpips=None, diversity_samples=0,
             fvd_scorer=None, fvd_ref=None, fvd_samples=1, sample_rows=256, algorithms="auto"):
    """Score `model` on every sequence of `dataset`, each exactly once, in order (see the module docstring).

    keep: sequence indices whose clips are returned for pictures: (gt, given + predicted frames) and, with
        n_samples > 1, every sample's frames and the posterior reconstruction.
    compile_metrics: score with the torch.compile'd metrics (metrics.batch_metrics).
    n_samples: prior samples per sequence; sample 0 is the graded one, so the headline numbers do not
        change with it. lpips: a metrics-LPIPS module (lpips_torch.LPIPS) to add LPIPS to the sampled
        summary and the pairwise-LPIPS diversity, over the first `diversity_samples` samples (0: all; the
        pairs grow as N^2 and their features are held for a whole batch).
    fvd_scorer, fvd_ref: an fvd.Scorer and the split's fvd.reference: FVD of the first `fvd_samples`
        samples against the real clips, for the predicted frames and for the whole clip (fvd.summarize).
    sample_rows: with n_samples > 1, about this many rows (samples x sequences) per rollout call; it does
        not change the result.
    algorithms: how each 3x3 convolution's algorithm (direct or Winograd, models.fast.conv3x3) is chosen
        in fp32 CPU inference: "auto" measures the model's layer shapes at this batch size once per machine
        (choose_algorithms: a screen on a few random rows, then the algorithms left timed on this
        evaluation's own first calls, so that measuring costs only their differences on those calls), "rule"
        takes the fixed rule of models.fast._algorithm_rule, "direct" the direct algorithm everywhere. The
        choice is returned ("inference_algorithms", and what measuring it cost, "inference_algorithms_s": the
        screen and the timed calls' excess over the chosen algorithm); it changes the rounding (~1e-5 per
        layer; in a measuring evaluation, of its first calls a few run each candidate), not the function.
    BatchNorm runs in eval mode, folded into the layers before it (models.fast.inference_copy: `model`
    itself is not touched).
    """
    import fvd as fvd_module
    t_choose = time.perf_counter()
    pending = choose_algorithms(model, dataset, n_past, batch_size, device, amp, algorithms)
    t_choose = time.perf_counter() - t_choose
    model = fast.inference_copy(model)
    loader = torch.utils.data.DataLoader(cond_ablation(dataset, cond_mode, seed), batch_size=batch_size,
                                         shuffle=False, drop_last=False, num_workers=num_workers)
    T, steps = n_past + n_future, n_past + n_future - 1
    n_div = min(diversity_samples or n_samples, n_samples)
    n_fvd = min(fvd_samples, n_samples) if fvd_scorer is not None else 0
    scores = {"psnr": [], "ssim": [], "lpips": []}  # each a list of (B, N, n_future)
    fvd_logits = {form: [] for form in fvd_module.FORMS} if n_fvd else {}  # each a list of (B, N_fvd, 400)
    copy_psnr, copy_ssim, copy_lpips, pixel_std, pairwise, kept, offset = [], [], [], [], [], {}, 0
    for frames, conds in loader:
        B = frames.shape[0]
        frames = frames[:, :T].to(device)  # (B, T, C, H, W)
        conds = conds[:, :T].to(device) if model.cond_dim else None  # (B, T, cond_dim)
        if cond_mode == "zero" and conds is not None:
            conds = model.cond_mean.expand_as(conds)  # the embedding sees zeros after standardisation
        gt, given = frames[:, n_past:], frames[:, :n_past]
        pred_feats, batch_scores = [], {k: [] for k in scores}
        batch_logits = {form: [] for form in fvd_logits}
        moments = torch.zeros(2, *gt.shape, dtype=torch.float64, device=device)  # sums of x and x^2 over samples
        kept_samples = {i - offset: [] for i in keep if offset <= i < offset + B}
        # LPIPS features of every image once: the ground truth's for all samples, each sample's for its
        # distance to the ground truth and to the other samples (SAVP's diversity).
        gt_feats = lpips.feature_maps(gt.flatten(0, 1)) if lpips is not None else None
        for k, pred in _sample_rollouts(model, given, conds, n_past, n_future, offset, seed, n_samples, amp,
                                        sample_rows):
            p, s = batch_metrics(gt, pred, compiled=compile_metrics)  # each (B, n_future)
            batch_scores["psnr"].append(p.cpu())
            batch_scores["ssim"].append(s.cpu())
            if lpips is not None:
                feats = lpips.feature_maps(pred.flatten(0, 1))  # each layer (B * n_future, c, h, w)
                batch_scores["lpips"].append(lpips.distance_from_features(gt_feats, feats).view(B, n_future).double().cpu())
                if n_samples > 1 and k < n_div:
                    pred_feats.append([f.view(B, n_future, *f.shape[1:]) for f in feats])
            if k < n_fvd:
                for form, clip in fvd_module.clip_forms(given, pred).items():
                    batch_logits[form].append(torch.from_numpy(fvd_scorer(clip)))  # (B, 400)
            if n_samples > 1:
                moments[0] += pred
                moments[1] += pred.double() ** 2
            for j, samples_j in kept_samples.items():
                samples_j.append(pred[j])
        for key, v in batch_scores.items():
            if v:
                scores[key].append(torch.stack(v, 1))  # (B, N, n_future)
        for form, v in batch_logits.items():
            fvd_logits[form].append(torch.stack(v, 1))  # (B, N_fvd, 400)
        copy = frames[:, n_past - 1: n_past].expand_as(gt)  # the copy-last-frame baseline
        cp, cs = batch_metrics(gt, copy, compiled=compile_metrics)
        copy_psnr.append(cp.cpu())
        copy_ssim.append(cs.cpu())
        if lpips is not None:
            last = [f.unsqueeze(1).expand(-1, n_future, *f.shape[1:]).flatten(0, 1)  # each (B * n_future, c, h, w)
                    for f in lpips.feature_maps(frames[:, n_past - 1])]
            copy_lpips.append(lpips.distance_from_features(gt_feats, last).view(B, n_future).double().cpu())
        if n_samples > 1:
            var = (moments[1] - moments[0] ** 2 / n_samples).clamp_min(0) / (n_samples - 1)  # unbiased, as torch.std
            pixel_std.append(var.sqrt().mean(dim=(1, 2, 3, 4)).cpu())  # (B,)
            if lpips is not None:
                pairwise.append(_pairwise_lpips(lpips, pred_feats).cpu())
        for j, samples_j in kept_samples.items():
            i = offset + j
            clip = {"gt": frames[j].cpu(), "pred": torch.cat([given[j], samples_j[0]]).cpu()}
            if n_samples > 1:
                clip["samples"] = torch.stack(samples_j).cpu()  # (N, n_future, C, H, W)
                recon = fast.predict(model, frames[j: j + 1], None if conds is None else conds[j: j + 1], n_past,
                                     n_future, sequence_noise([i], steps, model.z_dim, seed, device,
                                                              spatial=model.noise_shapes()[1:]), posterior=True)
                clip["posterior"] = recon[0].float().clamp(0, 1).cpu()
            kept[i] = clip
        offset += B
    chosen, trial_s = settle_algorithms(pending, min(batch_size, len(dataset)))
    psnr, ssim = torch.cat(scores["psnr"]), torch.cat(scores["ssim"])  # (n, N, n_future)
    assert psnr.shape[0] == len(dataset), "every sequence must be scored exactly once"
    graded_psnr, graded_ssim, copy_psnr = psnr[:, 0], ssim[:, 0], torch.cat(copy_psnr)  # (n, n_future)
    out = {
        "psnr": graded_psnr.mean().item(), "ssim": graded_ssim.mean().item(),
        "psnr_per_step": graded_psnr.mean(0).tolist(), "ssim_per_step": graded_ssim.mean(0).tolist(),
        "psnr_std": graded_psnr.mean(1).std(unbiased=False).item(), "n_sequences": psnr.shape[0],
        "copy_last_psnr": copy_psnr.mean().item(), "copy_last_psnr_per_step": copy_psnr.mean(0).tolist(),
        "copy_last_ssim": torch.cat(copy_ssim).mean().item(),
        "per_sequence_psnr": graded_psnr.mean(1).tolist(), "clips": kept, "inference_algorithms": chosen,
        "inference_algorithms_s": t_choose + trial_s,
    }
    if lpips is not None:
        out["lpips"] = torch.cat(scores["lpips"])[:, 0].mean().item()
        out["copy_last_lpips"] = torch.cat(copy_lpips).mean().item()
    if n_fvd:
        out["fvd"] = fvd_module.summarize(fvd_ref, {form: torch.cat(v).numpy() for form, v in fvd_logits.items()})
    if n_samples > 1:
        summary = {"n_samples": n_samples,
                   "psnr": summarize_samples(psnr, higher_is_better=True),
                   "ssim": summarize_samples(ssim, higher_is_better=True),
                   "diversity_pixel_std": torch.cat(pixel_std).mean().item()}
        if lpips is not None:
            summary["lpips"] = summarize_samples(torch.cat(scores["lpips"]), higher_is_better=False)
            summary["diversity_lpips"] = torch.cat(pairwise).mean().item()
            summary["diversity_samples"] = n_div
        out["samples"] = summary
    return out


_MEASURED = {}  # {algorithm_key: algorithm} measured in this process, at the first batch size that needed it
# Where measured choices are kept between processes, one entry per (CPU, threads, torch, batch): under
# $SVG_CVAE_CACHE, else ~/.cache/svg-cvae; "" keeps them in the process only. Delete the file to measure again.
ALGORITHM_CACHE = os.path.join(os.environ.get("SVG_CVAE_CACHE") or os.path.expanduser("~/.cache/svg-cvae"),
                               "conv_algorithms.json")


def choose_algorithms(model, dataset, n_past, batch_size, device, amp="off", how="auto"):
    """Set the 3x3 inference algorithms for evaluate (see its `algorithms`) and return them ({layer shape:
    algorithm}; {} where no choice applies: CUDA, reduced precision, models.fast.WINOGRAD off). "auto" takes
    the shapes measured before, in this process or (ALGORITHM_CACHE) on this machine at this batch size; the
    others are screened on random frames (the run's RNG untouched) and, where more than one algorithm is
    left, timed on the evaluation's own first calls (models.fast.OnlineChoice): settle_algorithms then stores
    what was decided."""
    if device.type != "cpu" or amp != "off" or not fast.WINOGRAD or how == "direct":
        fast.set_inference_algorithms({})  # a layer not in the choice runs direct
        return {}
    if how == "rule":
        fast.set_inference_algorithms(None)
        return {"rule": "models.fast._algorithm_rule"}
    B = min(batch_size, len(dataset))
    known = {**_read_algorithm_cache().get(_host_key(B), {}), **_MEASURED}
    frames = torch.rand(B, n_past, *dataset[0][0].shape[1:], device=device)  # (B, n_past, C, H, W)
    conds = torch.zeros(B, n_past + 1, model.cond_dim, device=device) if model.cond_dim else None
    with torch.random.fork_rng(devices=[]):
        new, _ = fast.choose_inference_algorithms(model, frames, conds, n_past, known=known, online=True)
    _MEASURED.update(known)
    _store({k: v for k, v in new.items() if isinstance(v, str)}, B)  # decided by the screen alone
    pending = {**_MEASURED, **new}
    fast.set_inference_algorithms(pending)
    return pending


def settle_algorithms(pending, batch_size):
    """After an evaluation that chose its algorithms with choose_algorithms: ({layer shape: algorithm} as
    evaluated from now on, seconds the online timing cost: its calls' excess over the chosen algorithm's best).
    The decided shapes are kept for this process and stored in ALGORITHM_CACHE; a shape whose calls were too
    few to decide (a tiny evaluation) runs direct in the result and is measured again next time."""
    trials = {k: v for k, v in pending.items() if isinstance(v, fast.OnlineChoice)}
    new = {k: v.result() for k, v in trials.items() if v.result() is not None}
    chosen = {**pending, **{k: v.result() or "direct" for k, v in trials.items()}}
    _store(new, batch_size)
    return chosen, sum(v.cost_s for v in trials.values())


def _store(decided, batch_size):
    """Keep decided layer shapes ({algorithm_key: algorithm}) for this process and in ALGORITHM_CACHE."""
    _MEASURED.update(decided)
    if decided and ALGORITHM_CACHE:
        stored, host = _read_algorithm_cache(), _host_key(batch_size)
        stored[host] = {**stored.get(host, {}), **decided}
        try:
            os.makedirs(os.path.dirname(ALGORITHM_CACHE), exist_ok=True)
            # A temporary file of its own: two evaluations at once (experiments.py --jobs 2) must not write
            # into one shared temporary file.
            checkpoints.atomic_write(ALGORITHM_CACHE, lambda f: f.write(json.dumps(stored, indent=1).encode()))
        except OSError:
            pass  # a read-only home: the choice holds for this process


def _host_key(batch_size):
    return f"{cpu_info()[0]} | {torch.get_num_threads()} threads | torch {torch.__version__} | batch {batch_size}"


def _read_algorithm_cache():
    try:
        with open(ALGORITHM_CACHE) as f:
            return json.load(f)
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}


def _sample_rollouts(model, given, conds, n_past, n_future, offset, seed, n_samples, amp, rows):
    """Yield (k, prediction of sample k) for k = 0..n_samples-1, each (B, n_future, C, H, W) float32 in [0, 1].

    Several samples go through one rollout, stacked along the batch (about `rows` rows per call): a small
    model is bound by the per-call overhead, not the arithmetic, and the batch composition does not change
    a prediction (BatchNorm is folded, each row's noise is its own), so the result is the same."""
    B = given.shape[0]
    steps, spatial = n_past + n_future - 1, model.noise_shapes()[1:]
    per_call = max(1, min(n_samples, rows // B))
    for k0 in range(0, n_samples, per_call):
        ks = range(k0, min(k0 + per_call, n_samples))
        noises = [sequence_noise(range(offset, offset + B), steps, model.z_dim, seed, given.device, sample=k,
                                 spatial=spatial) for k in ks]
        noise = [torch.cat(level) for level in zip(*noises)] if spatial else torch.cat(noises)  # (S * B, steps, ...)
        reps = (len(ks),) + (1,) * (given.dim() - 1)
        with autocast(given.device, amp):
            pred = fast.predict(model, given.repeat(reps), None if conds is None else conds.repeat(len(ks), 1, 1),
                                n_past, n_future, noise)
        for k, p in zip(ks, pred.float().clamp(0, 1).split(B)):  # (B, n_future, C, H, W) each
            yield k, p


def summarize_samples(values, higher_is_better=True):
    """values (n_sequences, N, n_future) of one metric -> best, mean and worst of N with per-step curves and
    95% confidence intervals over sequences. Best and worst pick, per sequence, the sample whose mean over
    the predicted frames is best or worst for this metric (SVG, SRVP); mean averages the N samples."""
    per_sample = values.mean(2)  # (n, N): each sample's mean over the predicted frames
    pick_best = per_sample.argmax(1) if higher_is_better else per_sample.argmin(1)
    pick_worst = per_sample.argmin(1) if higher_is_better else per_sample.argmax(1)
    rows = torch.arange(values.shape[0])
    out = {}
    for name, curves in (("best", values[rows, pick_best]), ("mean", values.mean(1)), ("worst", values[rows, pick_worst])):
        seq = curves.mean(1)  # (n,)
        out[name] = seq.mean().item()
        out[f"{name}_ci95"] = 1.96 * seq.std(unbiased=False).item() / math.sqrt(len(seq))
        out[f"{name}_per_step"] = curves.mean(0).tolist()
    return out


def _pairwise_lpips(lpips, feats):
    """Mean LPIPS over all pairs of samples and the predicted frames, per sequence: feats, per sample, the
    lpips.feature_maps of its frames, each layer (B, T, c, h, w) -> (B,)."""
    dists = [lpips.distance_from_features(feats[i], feats[j])  # (B, T)
             for i, j in itertools.combinations(range(len(feats)), 2)]
    return torch.stack(dists).mean(dim=(0, 2)).double()


ACTIVE_NATS = 0.01  # a latent dimension is active when its average KL exceeds this


@torch.no_grad()
def latent_stats(model, dataset, n_past, n_future, device, batch_size=32):
    """How much the latent carries, on the first `batch_size` sequences of `dataset`: the KL(q || p) per
    time step (summed over z, averaged over the batch; eval mode, teacher forcing, posterior z from the
    graded noise) and the number of active dimensions, those whose KL averaged over the batch and the
    steps exceeds 0.01 nats. This is the activity threshold of Burda et al. (2016, Sec. 5.2), applied to
    each dimension's KL rather than to the variance of its posterior mean. kld_levels: each latent level's
    KL per time step (global z first; one level without spatial latents), summed over its dimensions; kld
    is their sum; kld_per_step, kld_per_dim (averaged over the steps) and the active dimensions are the
    global z's."""
    frames, conds = next(iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)))
    T = n_past + n_future
    frames, conds = frames[:, :T].to(device), conds[:, :T].to(device) if model.cond_dim else None
    was_training = model.training
    model.eval()
    noise = sequence_noise(range(frames.shape[0]), T - 1, model.z_dim, 0, device, spatial=model.noise_shapes()[1:])
    out = model(frames, conds, n_past, noise=noise, batched=True)
    kl, levels = out["kl"], out["kl_levels"] / (T - 1)  # (T-1, z_dim); (levels,) per step
    model.train(was_training)
    return {"kld": levels.sum().item(), "kld_per_step": kl.sum(1).tolist(), "kld_levels": levels.tolist(),
            "kld_per_dim": kl.mean(0).tolist(), "active_dims": int((kl.mean(0) > ACTIVE_NATS).sum())}
