"""Train the action-conditioned SVG model (Denton & Fergus 2018) on BAIR-layout data: the course's fixed
prior by default, SVG-LP's learned prior with --prior learned, the action-free model with --cond none.

    python train_fixed_prior.py --data_root ./data/processed_data        # the course's configuration
    python train_fixed_prior.py --model_dir logs/fp/<run>                 # resume: same command + run dir
    torchrun --nproc_per_node=2 train_fixed_prior.py --data_root ...      # data-parallel (DDP)

Flags and defaults follow the course sample (run with --help). Loss per iteration (README, "Training"):
sum over steps of pixel-mean MSE + beta * sum over steps of KL(q || p) summed over z dims and averaged
over the batch; beta follows the (cyclical) annealing schedule of kl_annealing.py.
"""
import runtime  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)

import argparse
import copy
import functools
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler, Subset

import checkpoints
import evaluation
import fvd
from dataset import CONDITIONS, DataError, bair_robot_pushing_dataset
from kl_annealing import ema_decay, kl_weight_from_args, learning_rate_from_args, teacher_forcing_ratio_from_args
from models import ARCH_KEYS, BN_STATS, COND_CONVS, CVAE, MOTIONS, PRIORS, fast
from run_log import RunLog, run_name


def get_args_parser():
    p = argparse.ArgumentParser("Conditional VAE video prediction (SVG) training",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # The course sample's flags, with its defaults (grouped by concern; names unchanged).
    g = p.add_argument_group("optimisation").add_argument
    g("--lr", type=float, default=0.002, help="learning rate")
    g("--beta1", type=float, default=0.9, help="Adam beta1 (betas = (beta1, 0.999))")
    g("--batch_size", type=int, default=12, help="sequences per iteration per process")
    g("--optimizer", default="adam", choices=["adam", "rmsprop", "sgd"], help="optimizer")
    g("--niter", type=int, default=300, help="number of epochs of the whole run")
    g("--epoch_size", type=int, default=600, help="iterations per epoch")
    g("--seed", type=int, default=1, help="random seed")
    g("--grad_clip", type=float, default=0.0, help="clip the gradient norm to this value (0: off, as the sample)")
    g("--ema", type=float, default=0.0,
      help="decay of an exponential moving average of the weights (Polyak & Juditsky 1992), e.g. 0.995: validation, "
           "model.pth and everything that loads it (test.py, plan.py) use the average; 0: off, as the sample")
    g = p.add_argument_group("schedules: learning rate, teacher forcing and KL annealing (kl_annealing.py)").add_argument
    g("--lr_schedule", default="constant", choices=["constant", "cosine"],
      help="constant --lr (the sample's), or a linear warm-up then a cosine decay over the run's niter * epoch_size "
           "iterations")
    g("--warmup", type=int, default=0, help="warm-up iterations of --lr_schedule cosine")
    g("--min_lr_ratio", type=float, default=0.0, help="learning rate at the end of the cosine, as a fraction of --lr")
    g("--tfr", type=float, default=1.0, help="teacher-forcing ratio at the start")
    g("--tfr_start_decay_epoch", type=int, default=0, help="epoch from which the ratio decays")
    g("--tfr_decay_step", type=float, default=0.0, help="decrease of the ratio after each epoch")
    g("--tfr_lower_bound", type=float, default=0.0, help="lowest teacher-forcing ratio")
    g("--kl_anneal_cyclical", action="store_true", help="cyclical KL annealing (Fu et al. 2019) instead of monotonic")
    g("--kl_anneal_ratio", type=float, default=0.5, help="fraction of each cycle in which the KL weight rises")
    g("--kl_anneal_cycle", type=int, default=3, help="number of cycles over the run when cyclical")
    g("--beta", type=float, default=1.0, help="maximum KL weight reached by the annealing (SVG used 1e-4)")
    g("--free_bits", type=float, default=0.0,
      help="free bits (Kingma et al. 2016): each z dimension's KL, per step and averaged over the batch, "
           "counts at least this many nats in the loss (0: off)")
    g = p.add_argument_group("model (saved in the checkpoint; test.py rebuilds it)").add_argument
    g("--n_past", type=int, default=2, help="frames given to the model")
    g("--n_future", type=int, default=10, help="frames predicted")
    g("--n_eval", type=int, default=30, help="frames loaded per validation sequence (at least n_past + n_future; "
                                             "training loads n_past + n_future)")
    g("--rnn_size", type=int, default=256, help="LSTM hidden units")
    g("--posterior_rnn_layers", type=int, default=1, help="posterior LSTM layers")
    g("--predictor_rnn_layers", type=int, default=2, help="frame-predictor LSTM layers")
    g("--z_dim", type=int, default=64, help="latent z dimension")
    g("--g_dim", type=int, default=128, help="frame code dimension of the encoder output")
    g("--last_frame_skip", action="store_true", help="skip features from the previous frame, not the last given one")
    g("--prior", default="fixed", choices=list(PRIORS),
      help="fixed: N(0, I) (SVG-FP, the course's); learned: SVG-LP's prior LSTM p(z_t | x_{1:t-1})")
    g("--prior_rnn_layers", type=int, default=1, help="learned prior LSTM layers")
    g("--cond", default="action_pos", choices=list(CONDITIONS),
      help="condition per frame: action (4) + end-effector position (3), the action only, or none (action-free, as SVG)")
    g("--cond_embed_dim", type=int, default=32, help="size of the learned linear embedding of the condition")
    g("--base_channels", type=int, default=64, help="VGG width; 64 gives the sample's 64/128/256/512")
    g("--cond_conv", default="none", choices=list(COND_CONVS),
      help="the condition embedding of step t (the predictor's cond_{t-1}) also modulates the decoder's "
           "convolutions: film = per-channel scale and shift after each BatchNorm (Perez et al. 2018), condconv = "
           "per-example kernels mixed from --condconv_experts experts (Yang et al. 2019); needs a condition")
    g("--condconv_experts", type=int, default=4, help="expert kernels per convolution with --cond_conv condconv")
    g("--latent_levels", type=int, default=1, choices=[1, 2, 3],
      help="1: the global z alone (SVG); 2: also a spatial latent at 8x8; 3: also at 16x16. Each spatial level has "
           "its own top-down posterior and prior (N(0, I), or a conv head with --prior learned); KL = sum over levels")
    g("--z_spatial_dim", type=int, default=4, help="channels of each spatial latent level (with --latent_levels > 1)")
    g("--bn_stats", default="step", choices=list(BN_STATS),
      help="BatchNorm statistics of the encoder and decoder in training: step = per time step over the batch (SVG: "
           "each step's call is its own batch); clip = over every frame of the batch's clips at once (B x T), which "
           "needs teacher forcing (--tfr 1) and lets a batch of 2 train (docs/performance.md, time to quality)")
    g("--motion", default="none", choices=list(MOTIONS),
      help="none: the decoder paints each frame (SVG); cdna / flow: each frame mixes, with per-pixel masks, the "
           "decoder's image and the step's input frame moved by --motion_kernels 5x5 kernels (CDNA, Finn et al. "
           "2016; shifts up to 2 px) or dense flow fields (bilinear warps, any shift)")
    g("--motion_kernels", type=int, default=4, help="kernels (cdna) or flow fields (flow) with --motion")
    g = p.add_argument_group("data and logs").add_argument
    g("--data_root", default="./data/processed_data", help="root holding train/ validate/ test/ in the lab layout")
    g("--log_dir", default="./logs/fp", help="base directory; each run gets a sub-directory named by its settings")
    g("--model_dir", default="", help="run directory to resume from (its last.pth); --niter counts all epochs")
    g("--num_workers", type=int, default=4, help="data loading processes")
    g("--no_cache", action="store_true", help="decode PNGs on every access instead of the decoded cache")
    g("--cache_dir", default="", help="where decoded caches live (default: <data_root>/.cache)")
    g("--skip_bad_sequences", action="store_true", help="list unreadable sequences once and train on the rest")
    g("--eval_every", type=int, default=5, help="validate on the whole validation split every N epochs")
    g("--plot_every", type=int, default=20, help="write a validation GIF and strip every N epochs")
    g("--fvd_every", type=int, default=0,
      help="also FVD (fvd.py: predicted frames and whole clip) of the validation split every N epochs, logged to "
           "metrics.csv and TensorBoard; 0: off (each costs an I3D pass; needs requirements-lpips.txt)")
    g("--eval_batch_size", type=int, default=32, help="batch size of validation (does not change the scores)")
    g("--save_every", type=int, default=0, help="also save last.pth every N iterations (0: only every epoch)")
    g("--max_bad_steps", type=int, default=20, help="stop after this many consecutive non-finite steps")
    g("--no_progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("device and speed").add_argument
    g("--cuda", action="store_true", help="require CUDA (same as --device cuda)")
    g("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present, else CPU")
    g("--amp", default="off", choices=["off", "auto", "bf16", "fp16"],
      help="mixed precision: auto = bf16 on a CUDA GPU that has it; on a CPU with bf16 units (AVX-512-BF16, AMX) "
           "bf16 where one timed training rollout in each precision finds it faster, else off; printed and saved "
           "resolved in the run's args (fp16 only on CUDA)")
    g("--channels_last", action="store_true", help="channels-last memory format for the convolutions")
    g("--rollout", default="batched", choices=["batched", "per_step"],
      help="under teacher forcing, models.fast.forward_batched (batched) or the plain CVAE.forward (per_step)")
    g("--compile", action="store_true", help="torch.compile the clip encoder and decoder for training, and the validation metrics")
    g("--conv_layouts", default="auto", choices=["auto", "off"],
      help="auto: each convolution and max pooling of the batched training rollout in NCHW or channels-last, whichever a short "
           "measurement at the start (a few seconds) finds faster on this machine; printed, saved in every checkpoint "
           "(conv_layouts) and reused on resume. The same function, rounded per kernel: for two runs that must "
           "agree bit for bit use off (every convolution NCHW, or all channels-last with --channels_last)")
    g("--sync_every", type=int, default=0,
      help="read the loss and the non-finite-step count on the host every N iterations (logging, skipped-step "
           "report, --max_bad_steps; the skipping itself happens on the device every step); 0: every iteration "
           "on a CPU, where it costs nothing, every 10 on a GPU")
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
                 "rnn_size", "g_dim", "z_dim", "base_channels", "cond_embed_dim",
                 "predictor_rnn_layers", "posterior_rnn_layers", "prior_rnn_layers", "max_bad_steps",
                 "condconv_experts", "z_spatial_dim", "motion_kernels"):
        if getattr(args, name) < 1:
            e(f"--{name} {getattr(args, name)}: must be a positive integer")
    if args.batch_size < 2:
        e(f"--batch_size {args.batch_size}: BatchNorm needs at least 2 sequences per batch in training")
    if args.sync_every < 0:
        e(f"--sync_every {args.sync_every}: must be >= 0 (0: automatic)")
    if args.fvd_every < 0:
        e(f"--fvd_every {args.fvd_every}: must be >= 0 (0: off)")
    if not args.lr > 0 or not math.isfinite(args.lr):
        e(f"--lr {args.lr}: must be a positive number")
    if not 0 <= args.ema < 1:
        e(f"--ema {args.ema}: must be in [0, 1) (0: no moving average)")
    if args.warmup < 0 or not 0 <= args.min_lr_ratio <= 1:
        e(f"--warmup {args.warmup} must be >= 0 and --min_lr_ratio {args.min_lr_ratio} in [0, 1]")
    if args.beta < 0 or args.free_bits < 0 or args.grad_clip < 0 or args.save_every < 0 or args.num_workers < 0 or args.tfr_start_decay_epoch < 0:
        e("--beta, --free_bits, --grad_clip, --save_every, --num_workers and --tfr_start_decay_epoch must be >= 0")
    if args.bn_stats == "clip" and (args.tfr < 1 or (args.tfr_decay_step > 0 and args.tfr_lower_bound < 1)):
        e(f"--bn_stats clip normalises over every frame of the clip at once, which needs them all in advance: it "
          f"trains with teacher forcing only (--tfr 1 and no decay; given --tfr {args.tfr}, --tfr_decay_step "
          f"{args.tfr_decay_step}, --tfr_lower_bound {args.tfr_lower_bound})")
    if args.cond_conv != "none" and args.cond == "none":
        e(f"--cond_conv {args.cond_conv} modulates the decoder by the condition, and --cond none gives it none: "
          f"use --cond_conv none, or a condition (--cond action_pos or action)")
    if args.cond_dim != sum(n for _, n in CONDITIONS[args.cond]):
        e(f"--cond {args.cond}: the run's saved condition size {args.cond_dim} does not match")
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


def with_defaults(parser, saved):
    """A run's saved flags (dict), completed with this version's defaults for the flags the run predates."""
    return {**vars(parser.parse_args([])), **saved}


def resolve_args(parser, argv):
    """Parse flags; when resuming, take the run's saved flags and apply only those given explicitly.

    Architecture flags that contradict the checkpoint are refused; other given flags override the
    saved ones and are reported."""
    args = parser.parse_args(argv)
    if not args.model_dir:
        args.cond_dim = sum(n for _, n in CONDITIONS[args.cond])
        return args, None, []
    if not os.path.isdir(args.model_dir):
        parser.error(f"--model_dir {args.model_dir}: no such run directory")
    path = os.path.join(args.model_dir, "last.pth")
    if not os.path.isfile(path):
        path = os.path.join(args.model_dir, "model.pth")
    try:
        ckpt = checkpoints.load_checkpoint(path)
    except checkpoints.CheckpointError as e:
        parser.error(f"--model_dir {args.model_dir}: {e}")
    given = explicit_flags(parser, argv) - {"model_dir"}
    saved = with_defaults(parser, ckpt["args"])
    clash = [k for k in ARCH_KEYS + ("n_past", "n_future", "cond") if k in given and getattr(args, k) != saved.get(k)]
    if clash:
        parser.error(f"--model_dir {args.model_dir}: {', '.join('--' + k for k in clash)} contradict the checkpoint "
                     f"({', '.join(f'{k}={saved.get(k)}' for k in clash)}); drop them to resume")
    merged = {**vars(args), **{k: v for k, v in saved.items() if k not in given and k != "model_dir"}}
    overrides = [f"{k}: {saved.get(k)} -> {getattr(args, k)}" for k in sorted(given) if saved.get(k) != getattr(args, k)]
    return argparse.Namespace(**merged), (path, ckpt), overrides


def kl_loss(out, free_bits):
    """The KL term of the loss: out["kld"], or with free bits (Kingma et al. 2016, Eq. 15) every global z
    dimension's KL, per step and averaged over the batch, counted as at least `free_bits` nats; the spatial
    latent levels' KL (out["kl_levels"][1:]) counts in full."""
    return out["kl"].clamp_min(free_bits).sum() + out["kl_levels"][1:].sum() if free_bits > 0 else out["kld"]


def choose_amp(model, args, device, main_proc, world=1, min_gain=0.1, layouts=None):
    """--amp auto: the precision of this run, decided on this machine. A CPU with bf16 units (AVX-512-BF16,
    AMX) times a training rollout of the run's shapes in fp32 and under bf16 autocast, interleaved, best of up to 5
    (models.fast.time_training_rollouts), each with the convolution layouts --conv_layouts auto picks for that
    precision (they differ: bf16's small transposed convolutions gain most from channels-last), and takes
    bf16 where it is faster by min_gain: at small widths, or on a CPU busy with other work, bf16's casts can
    cost more than its kernels save. The layouts measured go into `layouts` ({precision: choice}) for
    choose_conv_layouts to reuse. Elsewhere the rule of runtime.resolve_amp (bf16 on a CUDA GPU that has
    it; off on a CPU that would emulate bf16, 7-19x slower). Printed; the caller saves it in the run's args.
    Other values are returned unchanged."""
    if args.amp != "auto":
        return args.amp
    amp, how = runtime.resolve_amp("auto", device), "by the device's bf16 support"
    if amp == "bf16" and device.type == "cpu":
        T = args.n_past + args.n_future
        frames = torch.rand(args.batch_size, T, 3, 64, 64, device=device)
        conds = torch.randn(args.batch_size, T, model.cond_dim, device=device)
        runs, layouts = {}, {} if layouts is None else layouts
        with torch.random.fork_rng(devices=[]):  # the run's RNG untouched
            for a in ("off", "bf16"):
                context, probe = (lambda a=a: runtime.autocast(device, a)), model
                if layouts_apply(args):
                    layouts[a], _ = fast.choose_conv_layouts(model, frames, conds, args.n_past, context)
                    probe = copy.deepcopy(model)
                    fast.set_conv_layouts(probe, layouts[a])
                runs[a] = probe, context
            sec = fast.time_training_rollouts(runs, frames, conds, args.n_past)
        amp = "bf16" if sec["bf16"] < (1 - min_gain) * sec["off"] else "off"
        how = f"measured: a training rollout {sec['off']:.3f} s in fp32, {sec['bf16']:.3f} s in bf16"
        if world > 1:  # every rank takes rank 0's choice
            box = [amp]
            dist.broadcast_object_list(box, src=0)
            amp = box[0]
    if main_proc:
        print(f"[amp] auto -> {amp} on {device} ({how})")
    return amp


def layouts_apply(args):
    """Whether --conv_layouts auto measures anything in this run's configuration."""
    return args.conv_layouts == "auto" and not args.channels_last and args.rollout == "batched"


def choose_conv_layouts(model, args, device, main_proc, world=1, resume=None, measured=None):
    """--conv_layouts auto: mark the convolutions and max poolings that run faster in channels-last on this machine
    (models.fast.choose_conv_layouts, measured on the run's batch shape and precision, or `measured` there,
    as choose_amp measured it), or reuse the choice a resumed run saved, so that a resume computes what the
    interrupted run did. Returns the choice, which every checkpoint saves beside the run's args
    ("conv_layouts"; not among the args, which compare.py groups runs by: two seeds' measurements may
    differ)."""
    if not layouts_apply(args):
        return []
    chosen = resume[1].get("conv_layouts") if resume is not None else None
    how = "saved by the run"
    if chosen is None and measured is not None:
        chosen, how = measured, "measured with --amp auto, forward + backward"
        if world > 1:  # every rank takes rank 0's choice
            box = [chosen]
            dist.broadcast_object_list(box, src=0)
            chosen = box[0]
    if chosen is None:
        T = args.n_past + args.n_future
        frames = torch.rand(args.batch_size, T, 3, 64, 64, device=device)
        conds = torch.randn(args.batch_size, T, args.cond_dim, device=device)
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the run's RNG untouched
            chosen, _ = fast.choose_conv_layouts(model, frames, conds, args.n_past,
                                                 lambda: runtime.autocast(device, args.amp))
        how = f"measured in {time.perf_counter() - t0:.1f} s, forward + backward"
        if world > 1:  # every rank takes rank 0's choice
            box = [chosen]
            dist.broadcast_object_list(box, src=0)
            chosen = box[0]
    fast.set_conv_layouts(model, chosen)
    if main_proc:
        print(f"[conv layouts] channels-last for {len(chosen)} convolution(s) and pooling(s) on this {device.type} ({how}): "
              f"{', '.join(chosen) or 'none'}")
    return list(chosen)


def load_data(args, world, main_proc):
    """The train and validate splits; rank 0 builds the decoded caches first."""
    data_args = argparse.Namespace(**{**vars(args), "quiet": not main_proc})
    try:
        if world > 1 and not main_proc:
            dist.barrier()
        # Training reads the rollout's n_past + n_future frames only (n_eval = 0); validation its n_eval.
        train_ds = bair_robot_pushing_dataset(argparse.Namespace(**{**vars(data_args), "n_eval": 0}), "train")
        val_ds = bair_robot_pushing_dataset(data_args, "validate")
        if world > 1 and main_proc:
            dist.barrier()
    except DataError as e:
        sys.exit(f"error: {e}")
    return train_ds, val_ds


def ema_tensors(ema, model):
    """update_ema's pairs, listed once: (average, trained) parameters, floating-point buffers (BatchNorm's
    running statistics) and integer buffers (batches seen), each a pair of lists in module order."""
    pair = lambda a, b: (list(a), list(b))
    fb = [(a, b) for a, b in zip(ema.buffers(), model.buffers()) if a.is_floating_point()]
    ib = [(a, b) for a, b in zip(ema.buffers(), model.buffers()) if not a.is_floating_point()]
    return pair(ema.parameters(), model.parameters()), pair(*zip(*fb)) if fb else ([], []), \
        pair(*zip(*ib)) if ib else ([], [])


def update_ema(ema, model, decay, skip=None, tensors=None):
    """ema <- decay * ema + (1 - decay) * model, parameters and float buffers (BatchNorm's running
    statistics) alike; integer buffers (batches seen) are copied. One foreach lerp over the parameters
    instead of one op per tensor of a fresh state_dict each step.

    skip: a 0-dim bool tensor on the device, true for a step the optimizer skipped: the average is left as
    it is, without reading the flag on the host (the parameters are lerped with weight 0, which leaves them
    bit for bit since the skipped step left the trained ones finite; the buffers, which a non-finite forward
    may have spoilt, are selected). tensors: ema_tensors(ema, model), to list them once per run."""
    (pa, pb), (fa, fb), (ia, ib) = tensors or ema_tensors(ema, model)
    with torch.no_grad():
        if skip is None:
            torch._foreach_lerp_(pa + fa, pb + fb, 1 - decay)
            if ia:
                torch._foreach_copy_(ia, ib)
            return
        w = (~skip).to(pa[0].dtype) * (1 - decay)  # 0 on a skipped step
        torch._foreach_lerp_(pa, pb, w)
        if fa:
            torch._foreach_lerp_(fa, [torch.where(skip, a, b) for a, b in zip(fa, fb)], w)
        for a, b in zip(ia, ib):
            a.copy_(torch.where(skip, a, b))


def restore(resume, model, optimizer, scaler, args, ema=None):
    """The run's counters: fresh, or from the checkpoint along with the weights (and their average),
    optimizer and scaler."""
    run = argparse.Namespace(step=0, epoch=0, epoch_it=0, best_psnr=-math.inf, epoch_sums=None, skipped=0, bad_run=0,
                             tfr=args.tfr)
    if resume is None:
        return run
    path, ckpt = resume
    checkpoints.load_model_state(model, {"model": ckpt.get("train_model") or ckpt["model"]}, path)
    if ema is not None:  # a run that had no average starts one from its weights
        ema.load_state_dict(ckpt["model"] if ckpt.get("train_model") else model.state_dict())
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    run.step, run.epoch, run.epoch_it = ckpt["step"], ckpt["epoch"], ckpt["epoch_it"]
    run.best_psnr, run.epoch_sums, run.skipped = ckpt["best_psnr"], ckpt["epoch_sums"], ckpt["skipped_steps"]
    return run


def save_checkpoint(path, model, optimizer, scaler, args, run, world, collective=True, ema=None):
    """Save on rank 0: state dicts, args, counters and RNG states. Collective calls gather every rank's RNG
    state (and a parameter checksum) for an exact resume; all ranks must make them. With --ema, "model" holds
    the average (what test.py and plan.py load) and "train_model" the trained weights."""
    rngs = [checkpoints.rng_state()]
    checksums = [sum(p.double().sum().item() for p in model.parameters())]
    if world > 1 and collective:
        gathered = [None] * world
        dist.all_gather_object(gathered, (rngs[0], checksums[0]))
        rngs, checksums = [g[0] for g in gathered], [g[1] for g in gathered]
    if world > 1 and dist.get_rank() != 0:
        return
    checkpoints.save_checkpoint(path, {
        "model": (ema or model).state_dict(), "train_model": model.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "args": vars(args), "arch": {k: getattr(args, k) for k in ARCH_KEYS},
        "epoch": run.epoch, "epoch_it": run.epoch_it, "step": run.step, "tfr": run.tfr, "best_psnr": run.best_psnr,
        "epoch_sums": run.epoch_sums, "skipped_steps": run.skipped, "world_size": world, "rng": rngs,
        "conv_layouts": getattr(run, "conv_layouts", []), "openmp_wait": runtime.OPENMP_WAIT,
        "rank_param_checksums": checksums})


def agree(values, device, world):
    """Boolean decisions every rank takes the same way: each is true when it is true on any rank."""
    flags = torch.tensor([float(v) for v in values], device=device)
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [bool(f) for f in flags]


class StopRequest:
    """SIGINT/SIGTERM ask for a checkpoint after the current iteration; a second signal stops at once."""

    def __init__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n[signal {signum}] saving last.pth after this iteration, then stopping", flush=True)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def train_loader(train_ds, args, step, world, rank, device):
    """This rank's batches of one global stream, from `step` on: the data order is a function of (seed, step)."""
    sampler = StreamBatchSampler(len(train_ds), args.batch_size, args.seed, step, world, rank)
    return DataLoader(train_ds, batch_sampler=sampler, num_workers=args.num_workers, pin_memory=device.type == "cuda",
                      persistent_workers=args.num_workers > 0,
                      generator=torch.Generator().manual_seed(args.seed))  # keeps the global RNG untouched


class EpochSums:
    """The epoch's sums of finite steps (run.epoch_sums: loss, mse, kld and each latent level's KL, per frame
    as the sample logs them, and the step count), kept on the device so that adding a step needs no host
    synchronisation; read() brings them to the host (at the logging cadence, before a save, at the epoch's
    end). float64, added in the same order as Python floats would be: the same sums as item() per step."""

    def __init__(self, sums, levels, device):
        self.sums, self.levels = sums, levels
        kl = sums.get("kld_levels") or [0.0] * levels
        self.acc = torch.tensor([sums["loss"], sums["mse"], sums["kld"], *kl, sums["n"]], dtype=torch.float64,
                                device=device)

    def add(self, loss, out, bad, T):
        """Add one step (bad: a 0-dim bool tensor, true for a non-finite step, which is not counted)."""
        v = torch.cat([torch.stack([loss.detach(), out["mse"].detach(), out["kld"].detach()]).double(),
                       out["kl_levels"].detach().double()]) / T
        self.acc.add_(torch.cat([v, v.new_ones(1)]).masked_fill_(bad, 0))

    def read(self):
        """Update and return the host dict (a host synchronisation)."""
        v = self.acc.tolist()
        self.sums.update(loss=v[0], mse=v[1], kld=v[2], kld_levels=v[3:-1], n=int(v[-1]))
        return self.sums


def optimizer_step(optimizer, scaler, bad):
    """The optimizer's step unless bad (a 0-dim bool tensor: a non-finite loss or gradient). Fused Adam and SGD
    skip on the device flag itself (their found_inf attribute, as torch.amp.GradScaler passes it: the step
    counts are restored too), so the host does not read it; other optimizers read it. With the fp16 scaler,
    the scaler decides (it skips steps with non-finite gradients). Returns bad, or None when the scaler decided."""
    if scaler.is_enabled():
        scaler.step(optimizer)
        return None
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf, optimizer.grad_scale = bad.float(), None
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
    elif not bad:  # a host read
        optimizer.step()
    return bad


def validate(model, val_ds, args, device, epoch, trained=None):
    """Every --eval_every epochs: the graded protocol on the whole validation split and the latent's KL
    statistics; every --plot_every epochs, the first validation sequence's prediction. (None, None) otherwise.
    With --ema, model is the average and `trained` the trained weights, whose PSNR is logged beside it."""
    last = epoch + 1 == args.niter
    val = clip = None
    if (epoch + 1) % args.eval_every == 0 or last:
        fvd_args = {}
        if args.fvd_every and ((epoch + 1) % args.fvd_every == 0 or last):
            scorer = fvd_scorer(device)
            fvd_args = dict(fvd_scorer=scorer, fvd_ref=fvd.reference(val_ds, args.n_past, args.n_future, scorer,
                                                                     args.cache_dir, args.eval_batch_size))
        val = evaluation.evaluate(model, val_ds, args.n_past, args.n_future, device, args.eval_batch_size, 0,
                                  args.seed, args.amp, compile_metrics=args.compile, **fvd_args)
        val.update(evaluation.latent_stats(model, val_ds, args.n_past, args.n_future, device, args.eval_batch_size))
        if trained is not None:
            val["psnr_trained"] = evaluation.evaluate(trained, val_ds, args.n_past, args.n_future, device,
                                                      args.eval_batch_size, 0, args.seed, args.amp)["psnr"]
    if (epoch + 1) % args.plot_every == 0 or last:
        clip = evaluation.evaluate(model, Subset(val_ds, [0]), args.n_past, args.n_future, device, 1, 0,
                                   args.seed, args.amp, keep=(0,))["clips"][0]
    return val, clip


@functools.cache
def fvd_scorer(device):
    """The I3D network for --fvd_every, loaded at the first FVD validation and kept."""
    return fvd.Scorer(device)


def epoch_row(run, args, optimizer, val):
    """The metrics.csv row of the epoch that just ended: per-step averages as the sample logs them."""
    sums, n = run.epoch_sums, max(run.epoch_sums["n"], 1)
    row = {"epoch": run.epoch, "step": run.step, "loss": sums["loss"] / n, "mse": sums["mse"] / n,
           "kld": sums["kld"] / n, "beta": kl_weight_from_args(max(run.step - 1, 0), args), "tfr": run.tfr,
           "lr": optimizer.param_groups[0]["lr"], "seconds": sums["seconds"],
           "kld_levels": [v / n for v in sums.get("kld_levels", [])]}
    if val is not None:
        row.update(val_psnr=val["psnr"], val_psnr_trained=val.get("psnr_trained"), val_kld=val["kld"], active_dims=val["active_dims"],
                   val_kld_per_step=val["kld_per_step"], val_kld_levels=val["kld_levels"],
                   val_kld_per_dim=val["kld_per_dim"])
        if "fvd" in val:
            row.update({f"val_fvd_{form}": f["fvd"] for form, f in val["fvd"].items()})
    return row


def main(argv=None):
    parser = get_args_parser()
    args, resume, overrides = resolve_args(parser, argv)
    runtime.keep_freed_memory()
    check_args(args, parser)
    world, rank, local_rank = setup_distributed()
    main_proc = rank == 0
    device = runtime.choose_device("cuda" if args.cuda else args.device, local_rank)
    if device.type == "cuda" and not torch.backends.cudnn.deterministic:
        torch.backends.cudnn.benchmark = True  # every step has the same shapes: pick each convolution's fastest kernel once
    if args.fvd_every and main_proc:
        try:
            fvd_scorer(device)  # fails now, not at the first FVD validation
        except ModuleNotFoundError as e:
            parser.error(f"--fvd_every: {e}")
    # Python's RNG draws the teacher-forcing coin (same on every rank); torch's draws z noise (per rank).
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed + rank)
    train_ds, val_ds = load_data(args, world, main_proc)

    model = CVAE.from_config(args).to(device)
    if resume is None:
        model.set_cond_stats(*train_ds.cond_stats())
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(args, model.parameters())
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    # Polyak averaging: a copy of the model whose weights trail the trained ones (update_ema after each step)
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema else None
    run = restore(resume, model, optimizer, scaler, args, ema)
    layouts = {}  # per precision, where --amp auto measured them
    if main_proc and device.type == "cpu":
        print(f"[openmp] threads wait: {runtime.OPENMP_WAIT}")
    args.amp = choose_amp(model, args, device, main_proc, world, layouts=layouts)  # saved resolved: a resume keeps it
    run.conv_layouts = choose_conv_layouts(model, args, device, main_proc, world, resume, layouts.get(args.amp))
    if args.compile:
        fast.compile_rollout()
    ddp = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else model
    run_dir = args.model_dir or os.path.join(args.log_dir, run_name(args))
    if resume is None and os.path.isfile(os.path.join(run_dir, "last.pth")):
        parser.error(f"{run_dir} already holds a run: resume it with --model_dir {run_dir}, or choose another "
                     f"--log_dir (nothing was overwritten)")
    log = RunLog(run_dir, args, run.epoch, run.step, resume and resume[0], overrides) if main_proc else None
    batches = iter(train_loader(train_ds, args, run.step, world, rank, device))
    if resume is not None:
        checkpoints.set_rng_state(resume[1]["rng"][rank] if rank < len(resume[1]["rng"]) else resume[1]["rng"][0])
    save = lambda path, collective=True: save_checkpoint(path, model, optimizer, scaler, args, run, world, collective, ema)
    last_path, best_path = os.path.join(run_dir, "last.pth"), os.path.join(run_dir, "model.pth")
    T, stop, active_dims = args.n_past + args.n_future, StopRequest(), "-"
    # Host reads of device values (loss, skipped steps) happen every sync_every steps; on a CPU every step,
    # where the ops have already run when the host reads a value, so it costs nothing.
    sync_every = args.sync_every or (1 if device.type == "cpu" else 10)
    bad_since = torch.zeros((), dtype=torch.long, device=device)  # non-finite steps since the last sync point
    bad_run = torch.full((), run.bad_run, dtype=torch.long, device=device)
    ema_pairs = ema_tensors(ema, model) if ema is not None else None
    try:
        while run.epoch < args.niter:
            run.tfr = teacher_forcing_ratio_from_args(run.epoch, args)
            sums = run.epoch_sums = run.epoch_sums or {"loss": 0.0, "mse": 0.0, "kld": 0.0, "n": 0, "seconds": 0.0,
                                                        "kld_levels": []}
            t_start, bar = time.time(), range(run.epoch_it, args.epoch_size)
            if main_proc and not args.no_progress:
                from tqdm import tqdm
                bar = tqdm(bar, desc=f"epoch {run.epoch}", total=args.epoch_size, initial=run.epoch_it, dynamic_ncols=True)
            acc = EpochSums(sums, args.latent_levels, device)
            for it in bar:
                # schedule -> forward -> backward -> clip -> step -> log. Nothing here reads a device value on
                # the host except at the sync points (every sync_every steps, before a save, at the epoch's
                # end): on a GPU the host then queues iterations ahead of the kernels instead of waiting for each.
                beta = kl_weight_from_args(run.step, args)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate_from_args(run.step, args)
                use_tf = random.random() < run.tfr  # one coin per batch, as the sample
                # the whole pinned batch copied asynchronously, then sliced on the device (a slice of the pinned
                # batch would be a non-contiguous, synchronous copy)
                frames, conds = (x.to(device, non_blocking=True)[:, :T] for x in next(batches))  # (B, T, C, H, W), (B, T, D)
                with runtime.autocast(device, args.amp):
                    out = ddp(frames, conds, args.n_past, teacher_forcing=use_tf, batched=args.rollout == "batched")
                loss = out["mse"] + beta * kl_loss(out, args.free_bits)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                if args.grad_clip:
                    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                else:  # the norm alone (logged, and checked for finiteness): no multiplication of every gradient by 1
                    gnorm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
                bad = ~(torch.isfinite(loss) & torch.isfinite(gnorm))  # on the device
                stopping = stop.signal is not None
                if world > 1:  # every rank takes both decisions alike: the one per-step synchronisation under DDP
                    bad_any, stopping = agree([bad, stopping], device, world)
                    bad = torch.tensor(bad_any, device=device)
                skip = optimizer_step(optimizer, scaler, bad)
                if skip is not None:
                    bad_since.add_(bad)
                    bad_run.add_(1).mul_(bad)  # consecutive non-finite steps, 0 after a good one
                if ema is not None:
                    update_ema(ema, model, ema_decay(run.step, args.ema), skip, ema_pairs)
                scaler.update()
                acc.add(loss, out, bad, T)
                run.step, run.epoch_it = run.step + 1, it + 1
                save_now = stopping or (args.save_every and run.step % args.save_every == 0)
                if run.step % sync_every and run.step % 10 and not save_now and run.epoch_it < args.epoch_size:
                    continue
                # a sync point (every sync_every steps, and at the logging cadence of every 10)
                n_bad, run.bad_run = (int(v) for v in torch.stack([bad_since, bad_run]).tolist())
                if n_bad:
                    run.skipped += n_bad
                    bad_since.zero_()
                    if main_proc:
                        print(f"\n[step {run.step - 1}] non-finite loss or gradient (loss {loss.item():.4g}, grad norm "
                              f"{gnorm.item():.4g}): {n_bad} step(s) skipped since the last check ({run.bad_run} in a "
                              f"row, {run.skipped} in all)", flush=True)
                if run.bad_run >= args.max_bad_steps:
                    acc.read()
                    save(last_path)
                    sys.exit(f"error: {run.bad_run} consecutive non-finite steps (--max_bad_steps); the last good "
                             f"weights are in {last_path}. Try a lower --lr, --grad_clip or --amp off.")
                if main_proc and run.step % 10 == 0:  # the logging cadence, for the progress bar too
                    vals = torch.stack([loss.detach().float(), out["mse"].detach().float(), out["kld"].detach().float(),
                                        gnorm.float(), *out["kl_levels"].detach().float()]).tolist()
                    log.scalars(run.step, "train", {"loss": vals[0], "mse": vals[1], "kld": vals[2], "grad_norm": vals[3],
                                                    "beta": beta, "tfr": run.tfr,
                                                    **{f"kld_level{i + 1}": v for i, v in enumerate(vals[4:])}})
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(loss=f"{vals[0]:.4f}", mse=f"{vals[1]:.4f}", kld=f"{vals[2]:.3g}",
                                        active=active_dims, beta=f"{beta:.3g}", tfr=f"{run.tfr:.2f}")
                if save_now:
                    acc.read()
                    sums["seconds"], t_start = sums["seconds"] + time.time() - t_start, time.time()
                    save(last_path)
                    if stopping:
                        if main_proc:
                            print(f"stopped at epoch {run.epoch}, step {run.step}; resume with --model_dir {run_dir}")
                        return
            acc.read()
            if hasattr(bar, "close"):
                bar.close()
            sums["seconds"] += time.time() - t_start

            # validate -> checkpoint
            if main_proc:
                val, clip = validate(ema or model, val_ds, args, device, run.epoch, model if ema is not None else None)
                if val is not None:
                    active_dims = val["active_dims"]
                    if val["psnr"] > run.best_psnr:
                        run.best_psnr = val["psnr"]
                        save(best_path, collective=False)
                log.epoch(epoch_row(run, args, optimizer, val), val, clip)
            run.epoch, run.epoch_it, run.epoch_sums = run.epoch + 1, 0, None
            save(last_path)
            if world > 1:
                dist.barrier()  # the other ranks wait while rank 0 validates
    except OSError as e:
        sys.exit(f"error: {e}. The previous checkpoint {last_path} is intact; free space and resume with "
                 f"--model_dir {run_dir}")
    finally:
        stop.restore()
        if log is not None:
            log.close()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if main_proc:
        print(f"done: best validation psnr {run.best_psnr:.3f} dB; checkpoints in {run_dir}")
    return run_dir


if __name__ == "__main__":
    main()
