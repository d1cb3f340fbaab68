"""BatchNorm with statistics per time step, for modules that take a whole (B, T) clip in one call.

In training, BatchNorm normalises with the statistics of the batch it is given. SVG runs the encoder,
decoder and predictor one step at a time, so each step is normalised over its B frames; folding the
T steps into one (B*T) batch would normalise over all of them at once, which is another model (on
the demo configuration it ended 0.22 dB lower, in two seeds). These helpers keep SVG's statistics
in one call.

    python -c "from models.norm import batch_norm_per_step; help(batch_norm_per_step)"
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


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
