"""Schedules of the KL weight, the teacher-forcing ratio, the learning rate and the weight average's
decay, as pure functions of the counters.

Nothing here holds state: a resumed run gets the same values from the saved (epoch, step) alone,
whatever `--niter` it was started with.

    python kl_annealing.py --niter 300 --epoch_size 600 --kl_anneal_cyclical   # prints a few values
"""
import argparse
import math


def kl_weight(step, niter, epoch_size, beta_max=1.0, cyclical=False, n_cycles=3, ratio=0.5):
    """KL weight at global iteration `step` (0-based).

    Cyclical annealing (Fu et al. 2019, Eq. 6): the run's niter * epoch_size iterations are split into
    `n_cycles` equal cycles (one when monotonic); within each, the weight rises linearly from 0 to
    beta_max over the first `ratio` of the cycle and then stays at beta_max. Past the planned end the
    weight stays at beta_max.
    """
    total = niter * epoch_size
    cycles = n_cycles if cyclical else 1
    if step >= total or ratio <= 0:
        return float(beta_max)
    period = total / cycles
    tau = (step % period) / period  # position within the current cycle, in [0, 1)
    return float(beta_max) * min(1.0, tau / ratio)


def teacher_forcing_ratio(epoch, tfr=1.0, start_decay_epoch=0, decay_step=0.0, lower_bound=0.0):
    """Teacher-forcing ratio in effect during `epoch` (0-based).

    The sample decays the ratio after every finished epoch at or past `start_decay_epoch`:
    tfr <- max(tfr - decay_step, lower_bound). Epoch e has seen max(0, e - start_decay_epoch) decays.
    """
    n_decays = max(0, epoch - start_decay_epoch)
    return max(tfr - decay_step * n_decays, lower_bound) if n_decays else tfr


def learning_rate(step, total, lr, schedule="constant", warmup=0, min_ratio=0.0):
    """Learning rate at global iteration `step` (0-based) of a run of `total` iterations.

    constant (the course's): lr throughout. cosine: a linear warm-up from lr / warmup to lr over the first
    `warmup` iterations (Goyal et al. 2017), then half a cosine from lr down to min_ratio * lr at the last
    iteration (SGDR without restarts, Loshchilov & Hutter 2017, Eq. 5); past `total` it stays there.
    """
    if schedule == "constant":
        return float(lr)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))  # 0 after the warm-up, 1 at the last step
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def ema_decay(step, decay):
    """Decay of the weights' moving average after update `step` (0-based): at most `decay`, lower early on,
    (1 + step) / (10 + step), so that the random initialisation is forgotten quickly (the warm-up of
    TensorFlow's ExponentialMovingAverage with num_updates). 0 = no average."""
    return min(float(decay), (1 + step) / (10 + step)) if decay else 0.0


def learning_rate_from_args(step, args):
    return learning_rate(step, args.niter * args.epoch_size, args.lr, args.lr_schedule, args.warmup, args.min_lr_ratio)


def kl_weight_from_args(step, args):
    return kl_weight(step, args.niter, args.epoch_size, args.beta, args.kl_anneal_cyclical,
                     args.kl_anneal_cycle, args.kl_anneal_ratio)


def teacher_forcing_ratio_from_args(epoch, args):
    return teacher_forcing_ratio(epoch, args.tfr, args.tfr_start_decay_epoch, args.tfr_decay_step,
                                 args.tfr_lower_bound)


def get_args_parser():
    p = argparse.ArgumentParser("Print the KL-weight and teacher-forcing schedules",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--niter", type=int, default=300, help="epochs")
    p.add_argument("--epoch_size", type=int, default=600, help="iterations per epoch")
    p.add_argument("--beta", type=float, default=1.0, help="maximum KL weight")
    p.add_argument("--kl_anneal_cyclical", action="store_true", help="cyclical instead of monotonic")
    p.add_argument("--kl_anneal_cycle", type=int, default=3, help="number of cycles when cyclical")
    p.add_argument("--kl_anneal_ratio", type=float, default=0.5, help="fraction of a cycle spent rising")
    p.add_argument("--tfr", type=float, default=1.0, help="initial teacher-forcing ratio")
    p.add_argument("--tfr_start_decay_epoch", type=int, default=0, help="first epoch after which tfr decays")
    p.add_argument("--tfr_decay_step", type=float, default=0.0, help="tfr decrease per epoch")
    p.add_argument("--tfr_lower_bound", type=float, default=0.0, help="lowest tfr")
    p.add_argument("--lr", type=float, default=0.002, help="peak learning rate")
    p.add_argument("--lr_schedule", default="constant", choices=["constant", "cosine"], help="learning-rate schedule")
    p.add_argument("--warmup", type=int, default=0, help="warm-up iterations of the cosine schedule")
    p.add_argument("--min_lr_ratio", type=float, default=0.0, help="final learning rate of the cosine, as a fraction of --lr")
    return p


if __name__ == "__main__":
    a = get_args_parser().parse_args()
    for epoch in sorted({0, 1, a.niter // 6, a.niter // 3, a.niter // 2, a.niter - 1}):
        step = epoch * a.epoch_size
        print(f"epoch {epoch:4d}  step {step:7d}  beta {kl_weight_from_args(step, a):.4f}  "
              f"tfr {teacher_forcing_ratio_from_args(epoch, a):.3f}  lr {learning_rate_from_args(step, a):.3g}")
