"""Score a trained run with the graded protocol (SPEC Sec. 4) on every sequence of a split.

    python test.py --model_dir logs/fp/<run>                       # -> test psnr: <value>
    python test.py --model_dir logs/fp/<run> --cond_mode shuffled  # ablation: conditions of other sequences

The model is rebuilt from the checkpoint (no architecture flags). Frames 0..n_past-1 are given, the
next n_future are predicted without teacher forcing with z from the prior; every sequence is scored
once, in sorted order; the result does not depend on --batch_size or --num_workers. Writes
<out>/metrics.json, a GIF (ground truth | prediction) and a per-step PNG strip.
"""
import os

# OpenMP threads that sleep instead of spinning while they wait: when anything else runs on the CPU,
# spinning threads slowed a training step about 5x here; on an idle CPU it costs nothing. Set before
# torch loads its OpenMP runtime; an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import sys

import torch

import utils
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
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], help="mixed precision for inference")
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
    utils.keep_freed_memory()
    if args.batch_size < 1 or args.num_workers < 0:
        parser.error("--batch_size must be >= 1 and --num_workers >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    path = os.path.join(args.model_dir, args.checkpoint)
    try:
        ckpt = utils.load_checkpoint(path)
        model = CVAE.from_config(ckpt["arch"]).to(device)
        utils.load_model_state(model, ckpt, path)
    except utils.CheckpointError as e:
        sys.exit(f"error: {e}")
    train_args = ckpt["args"]
    seed = train_args["seed"] if args.seed is None else args.seed
    data_args = argparse.Namespace(data_root=args.data_root or train_args["data_root"], n_past=train_args["n_past"],
                                   n_future=train_args["n_future"], n_eval=0, no_cache=args.no_cache,
                                   cache_dir=args.cache_dir, num_workers=args.num_workers)
    try:
        ds = bair_robot_pushing_dataset(data_args, args.split)
    except DataError as e:
        sys.exit(f"error: {e}")
    if not 0 <= args.gif_index < len(ds):
        parser.error(f"--gif_index {args.gif_index}: the {args.split} split has {len(ds)} sequences")

    res = utils.evaluate(model, ds, data_args.n_past, data_args.n_future, device, args.batch_size, args.num_workers,
                         seed, args.amp, args.cond_mode, keep=(args.gif_index,), compile_metrics=args.compile_metrics)
    out = args.out or os.path.join(args.model_dir, "test" if args.cond_mode == "real" else f"test_{args.cond_mode}")
    os.makedirs(out, exist_ok=True)
    gt, pred = res.pop("clips")[args.gif_index]
    utils.save_gif(os.path.join(out, f"seq{args.gif_index}.gif"), gt, pred, data_args.n_past)
    utils.save_strip(os.path.join(out, f"seq{args.gif_index}.png"), gt, pred, data_args.n_past)
    res.pop("per_sequence_psnr")
    metrics = {**res, "checkpoint": os.path.abspath(path), "split": args.split, "seed": seed,
               "cond_mode": args.cond_mode, "data_root": os.path.abspath(data_args.data_root),
               "epoch": ckpt["epoch"], "step": ckpt["step"]}
    utils.write_json(os.path.join(out, "metrics.json"), metrics)
    print(f"test psnr: {res['psnr']:.4f}")
    print(f"test ssim: {res['ssim']:.4f} | copy-last-frame psnr: {res['copy_last_psnr']:.4f} | "
          f"{res['n_sequences']} sequences of {args.split} | cond_mode {args.cond_mode}")
    print(f"wrote {out}/metrics.json, {out}/seq{args.gif_index}.gif, {out}/seq{args.gif_index}.png")
    return metrics


if __name__ == "__main__":
    main()
