"""BatchNorm with statistics per time step, for modules that take a whole (B, T) clip in one call.

In training, BatchNorm normalises with the statistics of the batch it is given. SVG runs the encoder,
decoder and predictor one step at a time, so each step is normalised over its B frames; folding the
T steps into one (B*T) batch would normalise over all of them at once, which is another model (on
the demo configuration it ended 0.22 dB lower, in two seeds). These helpers keep SVG's statistics
in one call.

fold_batch_norm makes the eval-mode copy used for inference, where each BatchNorm is an affine map
that can be folded into the layer before it.

    python -c "from models.norm import batch_norm_per_step; help(batch_norm_per_step)"
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights


def batch_norm_per_step(bn, x, steps):
    """bn(x) as `steps` separate calls on consecutive time steps would compute it.

    x: (B * steps, C, ...) with batch-major rows (row b * steps + t is sequence b at step t), as a
    (B, T, ...) tensor flattened over its first two dimensions. In training, step t is normalised with
    the mean and variance of its own B rows, and the running averages receive the steps' updates in
    time order (r <- (1 - m) r + m s_t for t = 0..steps-1, summed in closed form). In eval mode, or
    for one step, this is bn(x).
    """
    if not bn.training or steps == 1:
        return bn(x)
    if bn.momentum is None or not bn.track_running_stats:
        raise ValueError("batch_norm_per_step needs a BatchNorm with running statistics and a numeric momentum")
    N, C = x.shape[:2]
    if N % steps:
        raise ValueError(f"{N} rows are not a whole number of {steps}-step sequences")
    # The steps folded into the channels: (B, steps * C, ...), channel t * C + c is channel c at step t.
    folded = x.reshape(N // steps, steps * C, *x.shape[2:])
    w = None if bn.weight is None else bn.weight.repeat(steps)
    b = None if bn.bias is None else bn.bias.repeat(steps)
    # With momentum 1 the "running" buffers receive exactly the steps' batch mean and unbiased variance.
    mean = torch.zeros(steps * C, device=x.device, dtype=bn.running_mean.dtype)
    var = torch.ones_like(mean)
    y = F.batch_norm(folded, mean, var, w, b, True, 1.0, bn.eps).reshape(x.shape)
    with torch.no_grad():
        mean, var = mean.view(steps, C), var.view(steps, C)  # (steps, C) each
        m = bn.momentum
        decay = m * (1 - m) ** torch.arange(steps - 1, -1, -1, device=mean.device, dtype=mean.dtype)  # (steps,)
        bn.running_mean.mul_((1 - m) ** steps).add_(decay @ mean)
        bn.running_var.mul_((1 - m) ** steps).add_(decay @ var)
        bn.num_batches_tracked.add_(steps)
    return y


def run_per_step(module, x, steps):
    """module(x) for a module or an nn.Sequential of them (nested too), with every BatchNorm's
    statistics taken per step (batch_norm_per_step). x: (B * steps, ...) with batch-major rows."""
    if isinstance(module, nn.Sequential):
        for m in module:
            x = run_per_step(m, x, steps)
        return x
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return batch_norm_per_step(module, x, steps)
    return module(x)


def fold_batch_norm(model):
    """A frozen eval-mode copy of `model` for inference, with every BatchNorm that follows a convolution
    or linear layer in an nn.Sequential folded into that layer and replaced by nn.Identity.

    In eval mode BatchNorm is y = gamma (x - mean) / sqrt(var + eps) + beta with fixed statistics, so
    W' = W gamma / sqrt(var + eps) and b' = (b - mean) gamma / sqrt(var + eps) + beta give the same map
    in one pass instead of two (Ioffe & Szegedy 2015, Sec. 3.1: the statistics are fixed at inference).
    The copy's parameters do not require grad, so its layers may keep weight-derived caches (Conv3x3);
    `model` itself is not modified. Same predictions up to rounding (tested).
    """
    model = copy.deepcopy(model).requires_grad_(False)
    for seq in model.modules():
        if getattr(seq, "_compiled_call_impl", None) is not None:  # a Module.compile()d layer would compile
            seq._compiled_call_impl = None  # again for every copy: run the copy eagerly
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(1, len(seq)):
            layer, bn = seq[i - 1], seq[i]
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats:
                continue
            stats = (bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                transpose = isinstance(layer, nn.ConvTranspose2d)  # its weight is (c_in, c_out, k, k)
                w, b = fuse_conv_bn_weights(layer.weight, layer.bias, *stats, transpose=transpose)
            elif isinstance(layer, nn.Linear):
                w, b = fuse_linear_bn_weights(layer.weight, layer.bias, *stats)
            else:
                continue
            layer.weight, layer.bias = w.requires_grad_(False), b.requires_grad_(False)
            seq[i] = nn.Identity()
    return model.eval()
