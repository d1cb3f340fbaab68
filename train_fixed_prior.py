"""Train the action-conditioned SVG model with a fixed prior (Denton & Fergus 2018) on BAIR-layout data.

    python train_fixed_prior.py --data_root ./data/processed_data        # the course's configuration
    python train_fixed_prior.py --model_dir logs/fp/<run>                 # resume: same command + run dir
    torchrun --nproc_per_node=2 train_fixed_prior.py --data_root ...      # data-parallel (DDP)

Flags and defaults follow the course sample (run with --help). Loss per iteration (SPEC Sec. 3):
sum over steps of pixel-mean MSE + beta * sum over steps of KL(q || N(0, I)) summed over z dims and
averaged over the batch; beta follows the (cyclical) annealing schedule of kl_annealing.py.
"""
import os

# OpenMP threads that sleep instead of spinning while they wait: when anything else runs on the CPU,
# spinning threads slowed a training step about 5x here; on an idle CPU it costs nothing. Set before
# torch loads its OpenMP runtime; an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import math
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler, Subset

import utils
from dataset import DataError, bair_robot_pushing_dataset
from kl_annealing import kl_weight_from_args, teacher_forcing_ratio_from_args
from models import ARCH_KEYS, CVAE


def get_args_parser():
    p = argparse.ArgumentParser("Conditional VAE video prediction (SVG fixed prior) training",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # The course sample's flags, with its defaults.
    a("--lr", type=float, default=0.002, help="learning rate")
    a("--beta1", type=float, default=0.9, help="Adam beta1 (betas = (beta1, 0.999))")
    a("--batch_size", type=int, default=12, help="sequences per iteration per process")
    a("--log_dir", default="./logs/fp", help="base directory; each run gets a sub-directory named by its settings")
    a("--model_dir", default="", help="run directory to resume from (its last.pth); --niter counts all epochs")
    a("--data_root", default="./data/processed_data", help="root holding train/ validate/ test/ in the lab layout")
    a("--optimizer", default="adam", choices=["adam", "rmsprop", "sgd"], help="optimizer")
    a("--niter", type=int, default=300, help="number of epochs of the whole run")
    a("--epoch_size", type=int, default=600, help="iterations per epoch")
    a("--tfr", type=float, default=1.0, help="teacher-forcing ratio at the start")
    a("--tfr_start_decay_epoch", type=int, default=0, help="epoch from which the ratio decays")
    a("--tfr_decay_step", type=float, default=0.0, help="decrease of the ratio after each epoch")
    a("--tfr_lower_bound", type=float, default=0.0, help="lowest teacher-forcing ratio")
    a("--kl_anneal_cyclical", action="store_true", help="cyclical KL annealing (Fu et al. 2019) instead of monotonic")
    a("--kl_anneal_ratio", type=float, default=0.5, help="fraction of each cycle in which the KL weight rises")
    a("--kl_anneal_cycle", type=int, default=3, help="number of cycles over the run when cyclical")
    a("--seed", type=int, default=1, help="random seed")
    a("--n_past", type=int, default=2, help="frames given to the model")
    a("--n_future", type=int, default=10, help="frames predicted")
    a("--n_eval", type=int, default=30, help="frames loaded per sequence (at least n_past + n_future)")
    a("--rnn_size", type=int, default=256, help="LSTM hidden units")
    a("--posterior_rnn_layers", type=int, default=1, help="posterior LSTM layers")
    a("--predictor_rnn_layers", type=int, default=2, help="frame-predictor LSTM layers")
    a("--z_dim", type=int, default=64, help="latent z dimension")
    a("--g_dim", type=int, default=128, help="frame code dimension of the encoder output")
    a("--beta", type=float, default=1.0, help="maximum KL weight reached by the annealing (SVG used 1e-4)")
    a("--num_workers", type=int, default=4, help="data loading processes")
    a("--last_frame_skip", action="store_true", help="skip features from the previous frame, not the last given one")
    a("--cuda", action="store_true", help="require CUDA (same as --device cuda)")
    # Additions.
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present, else CPU")
    a("--cond_dim", type=int, default=7, help="condition size: action (4) + end-effector position (3)")
    a("--cond_embed_dim", type=int, default=32, help="size of the learned linear embedding of the condition")
    a("--base_channels", type=int, default=64, help="VGG width; 64 gives the sample's 64/128/256/512")
    a("--eval_every", type=int, default=5, help="validate on the whole validation split every N epochs")
    a("--plot_every", type=int, default=20, help="write a validation GIF and strip every N epochs")
    a("--eval_batch_size", type=int, default=32, help="batch size of validation (does not change the scores)")
    a("--amp", default="off", choices=["off", "bf16", "fp16"], help="mixed precision (fp16 only on CUDA)")
    a("--channels_last", action="store_true", help="channels-last memory format for the convolutions")
    a("--rollout", default="batched", choices=["batched", "per_step"],
      help="under teacher forcing, encode/decode all frames in one call (batched) or one frame at a time")
    a("--compile", action="store_true", help="torch.compile the encoder and decoder for training, and the validation metrics")
    a("--no_cache", action="store_true", help="decode PNGs on every access instead of the decoded cache")
    a("--cache_dir", default="", help="where decoded caches live (default: <data_root>/.cache)")
    a("--skip_bad_sequences", action="store_true", help="list unreadable sequences once and train on the rest")
    a("--save_every", type=int, default=0, help="also save last.pth every N iterations (0: only every epoch)")
    a("--grad_clip", type=float, default=0.0, help="clip the gradient norm to this value (0: off, as the sample)")
    a("--max_bad_steps", type=int, default=20, help="stop after this many consecutive non-finite steps")
    a("--no_progress", action="store_true", help="no progress bar")
    return p


def check_args(args, parser):
    """Validate every flag before anything runs; parser.error names the flag and what is expected."""
    e = parser.error
    if not 1 <= args.n_past or args.n_future < 1 or args.n_past + args.n_future > 30:
        e(f"--n_past {args.n_past} and --n_future {args.n_future}: need n_past >= 1, n_future >= 1, sum <= 30")
    if not 0 <= args.n_eval <= 30:
        e(f"--n_eval {args.n_eval}: must be in [0, 30]")
    for name in ("tfr", "tfr_decay_step", "tfr_lower_bound", "kl_anneal_ratio"):
        if not 0 <= getattr(args, name) <= 1:
            e(f"--{name} {getattr(args, name)}: must be in [0, 1]")
    for name in ("niter", "epoch_size", "kl_anneal_cycle", "eval_every", "plot_every", "eval_batch_size",
                 "rnn_size", "g_dim", "z_dim", "base_channels", "cond_dim", "cond_embed_dim",
                 "predictor_rnn_layers", "posterior_rnn_layers", "max_bad_steps"):
        if getattr(args, name) < 1:
            e(f"--{name} {getattr(args, name)}: must be a positive integer")
    if args.batch_size < 2:
        e(f"--batch_size {args.batch_size}: BatchNorm needs at least 2 sequences per batch in training")
    if not args.lr > 0 or not math.isfinite(args.lr):
        e(f"--lr {args.lr}: must be a positive number")
    if args.beta < 0 or args.grad_clip < 0 or args.save_every < 0 or args.num_workers < 0 or args.tfr_start_decay_epoch < 0:
        e("--beta, --grad_clip, --save_every, --num_workers and --tfr_start_decay_epoch must be >= 0")
    if (args.cuda or args.device == "cuda") and not torch.cuda.is_available():
        e("--cuda/--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    if args.amp == "fp16" and not (args.cuda or args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())):
        e("--amp fp16 needs CUDA; on the CPU use --amp bf16")
    if args.model_dir and not os.path.isdir(args.model_dir):
        e(f"--model_dir {args.model_dir}: no such run directory")
    for split in ("train", "validate"):
        if not os.path.isdir(os.path.join(args.data_root, split)):
            e(f"--data_root {args.data_root}: expected a '{split}' directory inside it (lab layout: "
              f"<data_root>/{{train,validate,test}}/traj_<a>_to_<b>.tfrecords/<k>/)")


def explicit_flags(parser, argv):
    """Names of the flags given on the command line (as opposed to defaults)."""
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


class StreamBatchSampler(Sampler):
    """An endless stream of batches; batch s is a pure function of (seed, s).

    The sample stream is the concatenation of permutations 0, 1, 2, ... of the dataset, permutation j
    drawn from seed (seed, j); global batch s takes stream items [s*B*W, (s+1)*B*W), and rank r its
    r-th slice of B. Resuming at step s needs nothing but s, and W ranks see disjoint data.
    """

    def __init__(self, n, batch_size, seed, start_step=0, world_size=1, rank=0):
        self.n, self.b, self.seed, self.start, self.w, self.r = n, batch_size, seed, start_step, world_size, rank

    def _perm(self, j):
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + j)).tolist()

    def __iter__(self):
        step = self.start
        cache = {}
        while True:
            first = (step * self.w + self.r) * self.b
            batch = []
            for pos in range(first, first + self.b):
                j = pos // self.n
                if j not in cache:
                    cache = {j: self._perm(j), **({j - 1: cache[j - 1]} if j - 1 in cache else {})}
                batch.append(cache[j][pos % self.n])
            yield batch
            step += 1


def setup_distributed():
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 1, 0, 0
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return world, dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))


def make_optimizer(args, params):
    if args.optimizer == "adam":  # fused: one kernel for all parameters instead of ~10 small ops each
        return torch.optim.Adam(params, lr=args.lr, betas=(args.beta1, 0.999), fused=True)
    if args.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=args.lr)
    return torch.optim.SGD(params, lr=args.lr)


def resolve_args(parser, argv):
    """Parse flags; when resuming, take the run's saved flags and apply only those given explicitly.

    Architecture flags that contradict the checkpoint are refused; other given flags override the
    saved ones and are reported."""
    args = parser.parse_args(argv)
    if not args.model_dir:
        return args, None, []
    if not os.path.isdir(args.model_dir):
        parser.error(f"--model_dir {args.model_dir}: no such run directory")
    path = os.path.join(args.model_dir, "last.pth")
    if not os.path.isfile(path):
        path = os.path.join(args.model_dir, "model.pth")
    try:
        ckpt = utils.load_checkpoint(path)
    except utils.CheckpointError as e:
        parser.error(f"--model_dir {args.model_dir}: {e}")
    given = explicit_flags(parser, argv) - {"model_dir"}
    saved = ckpt["args"]
    clash = [k for k in ARCH_KEYS + ("n_past", "n_future") if k in given and getattr(args, k) != saved.get(k)]
    if clash:
        parser.error(f"--model_dir {args.model_dir}: {', '.join('--' + k for k in clash)} contradict the checkpoint "
                     f"({', '.join(f'{k}={saved.get(k)}' for k in clash)}); drop them to resume")
    merged = {**vars(args), **{k: v for k, v in saved.items() if k not in given and k != "model_dir"}}
    overrides = [f"{k}: {saved.get(k)} -> {getattr(args, k)}" for k in sorted(given) if saved.get(k) != getattr(args, k)]
    return argparse.Namespace(**merged), (path, ckpt), overrides


def main(argv=None):
    parser = get_args_parser()
    args, resume, overrides = resolve_args(parser, argv)
    utils.keep_freed_memory()
    check_args(args, parser)
    world, rank, local_rank = setup_distributed()
    main_proc = rank == 0
    if args.cuda or args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    # Python's RNG draws the teacher-forcing coin (same on every rank); torch's draws z noise (per rank).
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed + rank)

    try:
        data_args = argparse.Namespace(**{**vars(args), "quiet": not main_proc})
        if world > 1 and not main_proc:
            dist.barrier()  # rank 0 builds the caches first
        train_ds = bair_robot_pushing_dataset(data_args, "train")
        val_ds = bair_robot_pushing_dataset(data_args, "validate")
        if world > 1 and main_proc:
            dist.barrier()
    except DataError as e:
        sys.exit(f"error: {e}")

    model = CVAE.from_config(args).to(device)
    if resume is None:
        model.set_cond_stats(*train_ds.cond_stats())
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(args, model.parameters())
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    step, epoch, epoch_it, best_psnr, epoch_sums, skipped = 0, 0, 0, -math.inf, None, 0
    if resume is not None:
        path, ckpt = resume
        utils.load_model_state(model, ckpt, path)
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step, epoch, epoch_it = ckpt["step"], ckpt["epoch"], ckpt["epoch_it"]
        best_psnr, epoch_sums, skipped = ckpt["best_psnr"], ckpt["epoch_sums"], ckpt["skipped_steps"]
        for g in optimizer.param_groups:  # a given --lr overrides the saved one
            g["lr"] = args.lr
    if args.compile:
        model.encoder.compile()
        model.decoder.compile()
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None) \
        if world > 1 else model

    run_dir = args.model_dir or os.path.join(args.log_dir, utils.run_name(args))
    if resume is None and os.path.isfile(os.path.join(run_dir, "last.pth")):
        parser.error(f"{run_dir} already holds a run: resume it with --model_dir {run_dir}, or choose another "
                     f"--log_dir (nothing was overwritten)")
    gen_dir = os.path.join(run_dir, "gen")
    record_path, metrics_path = os.path.join(run_dir, "train_record.txt"), os.path.join(run_dir, "metrics.csv")
    writer = None
    if main_proc:
        os.makedirs(gen_dir, exist_ok=True)
        rows = [r for r in utils.read_metrics(metrics_path) if r["epoch"] < epoch]  # drop rows of unfinished epochs
        with open(metrics_path, "w") as f:
            f.write(",".join(utils.METRIC_FIELDS) + "\n")
            for r in rows:
                f.write(",".join(_fmt(r[k]) for k in utils.METRIC_FIELDS) + "\n")
        with open(record_path, "a") as f:
            if resume is None:
                f.write(f"args: {vars(args)}\n")
            else:
                f.write(f"resumed from {resume[0]} at epoch {epoch}, step {step}\n")
                for o in overrides:
                    f.write(f"override {o}\n")
        for o in overrides:
            print(f"[resume] override {o}")
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=step if resume else None)

    sampler = StreamBatchSampler(len(train_ds), args.batch_size, args.seed, step, world, rank)
    loader = DataLoader(train_ds, batch_sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0,
                        generator=torch.Generator().manual_seed(args.seed))  # keeps the global RNG untouched
    batches = iter(loader)
    if resume is not None:
        utils.set_rng_state(resume[1]["rng"][rank] if rank < len(resume[1]["rng"]) else resume[1]["rng"][0])

    stop = {"signal": None}

    def request_stop(signum, frame):
        if stop["signal"] is not None:  # a second signal: leave at once
            raise KeyboardInterrupt
        stop["signal"] = signum
        print(f"\n[signal {signum}] saving last.pth after this iteration, then stopping", flush=True)

    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}

    def checkpoint(path, collective=True):
        """Save on rank 0; collective calls also gather every rank's RNG state for an exact resume."""
        rngs = [utils.rng_state()]
        checksums = [sum(p.double().sum().item() for p in model.parameters())]
        if world > 1 and collective:
            gathered = [None] * world
            dist.all_gather_object(gathered, (rngs[0], checksums[0]))
            rngs, checksums = [g[0] for g in gathered], [g[1] for g in gathered]
        if not main_proc:
            return
        utils.save_checkpoint(path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "args": vars(args), "arch": {k: getattr(args, k) for k in ARCH_KEYS},
            "epoch": epoch, "epoch_it": epoch_it, "step": step, "tfr": tfr, "best_psnr": best_psnr,
            "epoch_sums": epoch_sums, "skipped_steps": skipped, "world_size": world, "rng": rngs,
            "rank_param_checksums": checksums})

    T = args.n_past + args.n_future
    last_path, best_path = os.path.join(run_dir, "last.pth"), os.path.join(run_dir, "model.pth")
    bad_run = 0
    try:
        while epoch < args.niter:
            tfr = teacher_forcing_ratio_from_args(epoch, args)
            if epoch_sums is None:
                epoch_sums = {"loss": 0.0, "mse": 0.0, "kld": 0.0, "n": 0, "seconds": 0.0}
            t_start = time.time()
            bar = range(epoch_it, args.epoch_size)
            if main_proc and not args.no_progress:
                from tqdm import tqdm
                bar = tqdm(bar, desc=f"epoch {epoch}", total=args.epoch_size, initial=epoch_it, dynamic_ncols=True)
            for it in bar:
                # schedule -> forward -> backward -> clip -> step -> log
                beta = kl_weight_from_args(step, args)
                use_tf = random.random() < tfr  # one coin per batch, as the sample
                frames, conds = next(batches)
                frames = frames[:, :T].to(device, non_blocking=True)  # (B, T, C, H, W)
                conds = conds[:, :T].to(device, non_blocking=True)  # (B, T, 7)
                with utils.autocast(device, args.amp):
                    out = ddp(frames, conds, args.n_past, teacher_forcing=use_tf, batched=args.rollout == "batched")
                loss = out["mse"] + beta * out["kld"]
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or math.inf)
                flags = torch.tensor([float(not (torch.isfinite(loss) and torch.isfinite(gnorm))),
                                      float(stop["signal"] is not None)], device=device)
                if world > 1:
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # every rank takes the same decision
                nonfinite, stopping = bool(flags[0]), bool(flags[1])
                if nonfinite and not scaler.is_enabled():
                    skipped, bad_run = skipped + 1, bad_run + 1
                    optimizer.zero_grad(set_to_none=True)
                    if main_proc:
                        print(f"\n[step {step}] non-finite loss or gradient (loss {loss.item():.4g}, grad norm "
                              f"{gnorm.item():.4g}): step skipped ({bad_run} in a row, {skipped} in all)", flush=True)
                else:
                    scaler.step(optimizer)
                    bad_run = 0
                scaler.update()
                step, epoch_it = step + 1, it + 1
                if bad_run >= args.max_bad_steps:
                    checkpoint(last_path)
                    sys.exit(f"error: {bad_run} consecutive non-finite steps (--max_bad_steps); the last good "
                             f"weights are in {last_path}. Try a lower --lr, --grad_clip or --amp off.")
                if not nonfinite:
                    n_steps = args.n_past + args.n_future  # the sample logs per-step averages
                    epoch_sums["loss"] += loss.item() / n_steps
                    epoch_sums["mse"] += out["mse"].item() / n_steps
                    epoch_sums["kld"] += out["kld"].item() / n_steps
                    epoch_sums["n"] += 1
                if main_proc:
                    if step % 10 == 0:
                        for k, v in (("loss", loss), ("mse", out["mse"]), ("kld", out["kld"]), ("grad_norm", gnorm)):
                            writer.add_scalar(f"train/{k}", v.item(), step)
                        writer.add_scalar("train/beta", beta, step)
                        writer.add_scalar("train/tfr", tfr, step)
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(loss=f"{loss.item():.4f}", mse=f"{out['mse'].item():.4f}",
                                        kld=f"{out['kld'].item():.3f}", beta=f"{beta:.3g}", tfr=f"{tfr:.2f}")
                if stopping or (args.save_every and step % args.save_every == 0):
                    epoch_sums["seconds"] += time.time() - t_start
                    t_start = time.time()
                    checkpoint(last_path)
                    if stopping:
                        if main_proc:
                            print(f"stopped at epoch {epoch}, step {step}; resume with --model_dir {run_dir}")
                        return
            if hasattr(bar, "close"):
                bar.close()
            epoch_sums["seconds"] += time.time() - t_start

            # validate -> checkpoint
            val_psnr = math.nan
            n = max(epoch_sums["n"], 1)
            if main_proc:
                line = "[epoch: %02d] loss: %.5f | mse loss: %.5f | kld loss: %.5f" % (
                    epoch, epoch_sums["loss"] / n, epoch_sums["mse"] / n, epoch_sums["kld"] / n)
                if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.niter:
                    res = utils.evaluate(model, val_ds, args.n_past, args.n_future, device, args.eval_batch_size,
                                         0, args.seed, args.amp, compile_metrics=args.compile)
                    val_psnr = res["psnr"]
                    line += "\n" + "=" * 22 + " validate psnr = %.5f " % val_psnr + "=" * 24
                    writer.add_scalar("val/psnr", val_psnr, step)
                    writer.add_scalar("val/ssim", res["ssim"], step)
                    if val_psnr > best_psnr:
                        best_psnr = val_psnr
                        checkpoint(best_path, collective=False)
                if (epoch + 1) % args.plot_every == 0 or epoch + 1 == args.niter:
                    clip = utils.evaluate(model, Subset(val_ds, [0]), args.n_past, args.n_future, device, 1, 0,
                                          args.seed, args.amp, keep=(0,))["clips"][0]
                    utils.save_gif(os.path.join(gen_dir, f"epoch_{epoch:03d}.gif"), *clip, args.n_past)
                    utils.save_strip(os.path.join(gen_dir, f"epoch_{epoch:03d}.png"), *clip, args.n_past)
                print(line, flush=True)
                with open(record_path, "a") as f:
                    f.write(line + "\n")
                row = {"epoch": epoch, "step": step, "loss": epoch_sums["loss"] / n, "mse": epoch_sums["mse"] / n,
                       "kld": epoch_sums["kld"] / n, "beta": kl_weight_from_args(max(step - 1, 0), args), "tfr": tfr,
                       "lr": optimizer.param_groups[0]["lr"], "val_psnr": val_psnr, "seconds": epoch_sums["seconds"]}
                with open(metrics_path, "a") as f:
                    f.write(",".join(_fmt(row[k]) for k in utils.METRIC_FIELDS) + "\n")
                if not math.isnan(val_psnr):
                    utils.plot_curves(utils.read_metrics(metrics_path), os.path.join(run_dir, "curves.png"))
            epoch, epoch_it, epoch_sums = epoch + 1, 0, None
            checkpoint(last_path)
            if world > 1:
                dist.barrier()  # the other ranks wait while rank 0 validates
    except OSError as e:
        sys.exit(f"error: {e}. The previous checkpoint {last_path} is intact; free space and resume with "
                 f"--model_dir {run_dir}")
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        if writer is not None:
            writer.close()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if main_proc:
        print(f"done: best validation psnr {best_psnr:.3f} dB; checkpoints in {run_dir}")
    return run_dir


def _fmt(v):
    return "" if isinstance(v, float) and math.isnan(v) else (f"{v:.6g}" if isinstance(v, float) else str(v))


if __name__ == "__main__":
    main()
