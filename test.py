"""Score a trained run with the graded protocol (README, "Evaluation") on every sequence of a split, and
optionally over many prior samples per sequence, as the field reports stochastic models.

    python test.py --model_dir logs/fp/<run>                       # -> test psnr: <value>
    python test.py --model_dir logs/fp/<run> --cond_mode shuffled  # ablation: conditions of other sequences
    python test.py --model_dir logs/fp/<run> --n_samples 20 --lpips  # best/mean/worst of 20, diversity

The model is rebuilt from the checkpoint (no architecture flags). Frames 0..n_past-1 are given, the
next n_future are predicted without teacher forcing with z from the prior; every sequence is scored
once, in sorted order; the result does not depend on --batch_size or --num_workers. Writes
<out>/metrics.json, a GIF (ground truth | prediction) and a per-step PNG strip; with --n_samples > 1
also the sample grid (samples.gif/png) and the per-step best/mean/worst curves (samples_curves.png).
"""
import runtime  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)

import argparse
import os
import sys
import time

import checkpoints
import evaluation
import plots
from dataset import DataError, bair_robot_pushing_dataset
from models import CVAE


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
    p.add_argument("--n_samples", type=int, default=1,
                   help="prior samples per sequence; 1 is the graded protocol, more adds best/mean/worst of N "
                        "(sample 0 stays the graded one)")
    p.add_argument("--lpips", action="store_true",
                   help="also LPIPS (AlexNet, v0.1) of each sample and, with --n_samples > 1, the mean pairwise "
                        "LPIPS between samples (needs: pip install --no-deps -r requirements-lpips.txt)")
    p.add_argument("--amp", default="off", choices=["off", "auto", "bf16", "fp16"],
                   help="mixed precision for inference; auto = bf16 where the device has native bf16, else off")
    p.add_argument("--compile_metrics", action="store_true",
                   help="score with torch.compile'd PSNR/SSIM: 3-4x faster metrics after 5-10 s of "
                        "compilation (needs a C++ compiler), so it pays off from a few thousand sequences")
    p.add_argument("--out", default="", help="output directory (default: <model_dir>/test, or test_<cond_mode>)")
    p.add_argument("--gif_index", type=int, default=0, help="sequence index shown in the GIF and the strip")
    p.add_argument("--no_cache", action="store_true", help="decode PNGs instead of the decoded cache")
    p.add_argument("--cache_dir", default="", help="where decoded caches live (default: <data_root>/.cache)")
    return p


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    runtime.keep_freed_memory()
    if args.batch_size < 1 or args.num_workers < 0 or args.n_samples < 1:
        parser.error("--batch_size and --n_samples must be >= 1 and --num_workers >= 0")
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
    lpips = None
    if args.lpips:
        import lpips_torch
        try:
            lpips = lpips_torch.load_lpips(device)
        except ModuleNotFoundError as e:
            sys.exit(f"error: --lpips: {e}")
    train_args = ckpt["args"]
    seed = train_args["seed"] if args.seed is None else args.seed
    data_args = argparse.Namespace(data_root=args.data_root or train_args["data_root"], n_past=train_args["n_past"],
                                   n_future=train_args["n_future"], n_eval=0, no_cache=args.no_cache,
                                   cond=train_args.get("cond", "action_pos"), cache_dir=args.cache_dir,
                                   num_workers=args.num_workers)
    try:
        ds = bair_robot_pushing_dataset(data_args, args.split)
    except DataError as e:
        sys.exit(f"error: {e}")
    if not 0 <= args.gif_index < len(ds):
        parser.error(f"--gif_index {args.gif_index}: the {args.split} split has {len(ds)} sequences")

    t0 = time.time()
    res = evaluation.evaluate(model, ds, data_args.n_past, data_args.n_future, device, args.batch_size,
                              args.num_workers, seed, args.amp, args.cond_mode, keep=(args.gif_index,),
                              compile_metrics=args.compile_metrics, n_samples=args.n_samples, lpips=lpips)
    seconds = time.time() - t0
    out = args.out or os.path.join(args.model_dir, "test" if args.cond_mode == "real" else f"test_{args.cond_mode}")
    os.makedirs(out, exist_ok=True)
    clip = res.pop("clips")[args.gif_index]
    n_past = data_args.n_past
    plots.save_gif(os.path.join(out, f"seq{args.gif_index}.gif"), clip["gt"], clip["pred"], n_past)
    plots.save_strip(os.path.join(out, f"seq{args.gif_index}.png"), clip["gt"], clip["pred"], n_past)
    if args.n_samples > 1:
        plots.save_sample_grid(os.path.join(out, "samples"), clip, n_past, seed=seed)
        plots.plot_sample_curves(res, os.path.join(out, "samples_curves.png"), n_past)
    res.pop("per_sequence_psnr")
    metrics = {**res, "checkpoint": os.path.abspath(path), "split": args.split, "seed": seed,
               "cond_mode": args.cond_mode, "data_root": os.path.abspath(data_args.data_root),
               "epoch": ckpt["epoch"], "step": ckpt["step"], "n_samples": args.n_samples,
               "seconds": round(seconds, 1)}
    checkpoints.write_json(os.path.join(out, "metrics.json"), metrics)
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
              + (f" | pairwise LPIPS {s['diversity_lpips']:.4f}" if "diversity_lpips" in s else ""))
    print(f"wrote {out}/metrics.json, {out}/seq{args.gif_index}.gif, {out}/seq{args.gif_index}.png"
          + (", samples.gif/png, samples_curves.png" if args.n_samples > 1 else ""))
    return metrics


if __name__ == "__main__":
    main()
