"""Exact-equivalent speed paths for models/cvae.py. A reader may skip this file: the model is in
vgg_64.py, lstm.py and cvae.py, and every function here is tested against that plain form
(tests/test_models.py). Nothing here owns a parameter, so checkpoints do not depend on it.

What each trick replaces, and what it bought (docs/performance.md has the measurements):
  forward_batched    CVAE.forward under teacher forcing: every input frame is known in advance, so the
                     encoder runs once on the whole (B, T) clip and the decoder once on all steps, and
                     the LSTMs run as one torch.lstm call each (_cells). ~1.8x a training step at full width.
  forward_fed_back   CVAE.forward without teacher forcing: the true frames encoded in one call, the
                     fed-back predictions one at a time, with the decoder tricks below.
  run_per_step       BatchNorm in those batched calls with statistics per time step, as the per-step
                     calls compute them (folding T steps into one batch would be another model).
  choose_conv_layouts  each convolution and max pooling of those calls in NCHW or channels-last, whichever
                     a short measurement on this host found faster (small-channel 64x64 layers gain most).
  skip_terms         the skips' half of each decoder block's first convolution, computed once per
                     distinct skip frame instead of once per step (~1/6 of a step's FLOPs).
  upsampled_conv     nearest 2x upsampling + 3x3 convolution as one stride-2 transposed convolution with
                     a 4x4 kernel: 16 instead of 36 multiply-adds per input pixel and channel pair.
  conv3x3            3x3 convolutions in CPU inference by Winograd F(6x6,3x3) (NNPACK) or F(4x4,3x3)
                     (ours) where measured faster: 1.2-2.2x per layer at full width. OnlineChoice times
                     the candidates on the evaluation's own calls, so that measuring costs little.
  inference_copy     a frozen eval copy with every BatchNorm folded into the layer before it.
  max_pool2x2        index-free max pooling in inference (~3x faster than the kernel that keeps argmax).
  predict            CVAE.predict with the given frames encoded in one call, skip terms once, and the
                     above; used by the evaluation, the GIFs and the planner.

With cond_conv="condconv" the decoder's convolutions have per-example kernels (vgg_64.condconv2d, one
grouped convolution); skip_terms, upsampled_conv and the Winograd paths do not apply to them, so those
layers run in their plain form (the upsampled input concatenated with the skip), in every rollout here.
Their BatchNorm still folds into the experts (inference_copy). FiLM follows the BatchNorm, so it changes
none of the tricks. The spatial latent levels (latent_levels > 1) have no BatchNorm in their heads and
enter through a convolution added to a block's first one, so decode computes them on its (B*T) rows with
every trick kept. The pixel-motion output (motion "cdna" or "flow") follows the decoder: every rollout here
passes decode's output through model.compose with the step's input frame, as the plain form does.

    python -c "import models.fast as f; help(f.forward_batched)"
"""
import contextlib
import copy
import functools
import itertools
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from .cvae import check_track, normalise_maps
from .lstm import kl_divergence, reparameterize
from .vgg_64 import CondConv2d, vgg_layer

# Inference convolutions through Winograd algorithms where that is faster (see conv3x3).
# Set to False for the direct algorithm everywhere.
WINOGRAD = True
# Each 3x3 layer shape's algorithm as measured on this host (set_inference_algorithms), or None for the rule.
ALGORITHMS = None
_RECORD_3X3 = None  # while choose_inference_algorithms records: {algorithm_key: (input, weight, bias)}


# ----------------------------------------------------------------------------------------------------
# Rollouts
def forward_batched(model, frames, conds, n_past, noise=None):
    """CVAE.forward(frames, conds, n_past, teacher_forcing=True, noise): the same losses, gradients and
    BatchNorm running statistics, with the encoder and decoder called once per clip (with bn_stats="clip",
    CVAE.forward_clip's, whose BatchNorm statistics are the whole clip's)."""
    B, T = frames.shape[:2]
    steps = T - 1
    per_step = not (model.bn_stats == "clip" and model.training)
    noise, spatial = model.draw_noise(noise, B, T, frames.device)
    h, skips = encode(model.encoder, frames, per_step)  # (B, T, g), skips (B, T, c, r, r)
    mu_q, logvar_q = gaussian_lstm_sequence(model.posterior, h[:, 1:])  # q(z_t | x_{1:t}), t = 1..T-1
    z = reparameterize(mu_q, logvar_q, noise)
    mu_p = logvar_p = None
    if model.prior is not None:
        mu_p, logvar_p = gaussian_lstm_sequence(model.prior, h[:, :-1])  # p(z_t | x_{1:t-1})
    c = model.embed_conditions(conds, B, T)
    g = lstm_sequence(model.frame_predictor, torch.cat([h[:, :-1], z, c], -1), per_step=per_step)  # (B, T-1, g)
    # Step t's skips come from frame min(t-1, n_past-1): skip terms once per distinct skip frame, the
    # later steps reuse the last one (an expand, whose gradient is a sum, not a gather).
    n_skip = steps if model.last_frame_skip else min(n_past, steps)
    terms = skip_terms(model.decoder, [s[:, :n_skip] for s in skips])  # each (B, n_skip, c, r, r)
    terms = [torch.cat([t, t[:, -1:].expand(-1, steps - n_skip, -1, -1, -1)], 1) for t in terms]
    # The spatial levels' posteriors see the true frames 1..T-1: step t's targets are frame t's skips.
    pred, stats = decode(model.decoder, g, terms, c, [s[:, 1:] for s in skips], spatial, per_step)  # (B, T-1, C, H, W)
    pred = model.compose(pred, frames[:, :-1], g)  # step t's input frame is frame t-1
    return model.losses(frames, pred, kl_divergence(mu_q, logvar_q, mu_p, logvar_p), _spatial_kl(stats))


def _spatial_kl(stats):
    """Each spatial level's KL(q || p) summed over its dimensions, (B, T) from decode's (B, T, ...) Gaussians."""
    return [kl_divergence(*st).sum((2, 3, 4)) for st in stats]


def forward_fed_back(model, frames, conds, n_past, noise=None):
    """CVAE.forward(frames, conds, n_past, teacher_forcing=False, noise): the same losses and gradients, with
    the true frames (the given inputs and the posterior's targets) encoded in one call and only the fed-back
    predictions one at a time, skip terms once per skip frame, and the fast decoder. BatchNorm's running
    averages receive the same per-step updates, in another order (the true frames' first)."""
    B, T = frames.shape[:2]
    noise, spatial = model.draw_noise(noise, B, T, frames.device)
    h_gt, skips_gt = encode(model.encoder, frames)  # (B, T, g)
    mu_q, logvar_q = gaussian_lstm_sequence(model.posterior, h_gt[:, 1:])  # q(z_t | x_{1:t})
    z = reparameterize(mu_q, logvar_q, noise)
    c = model.embed_conditions(conds, B, T)
    h, skip_frame, terms, x_in = h_gt[:, 0], [s[:, 0] for s in skips_gt], None, frames[:, 0]
    state_p = state_f = None
    preds, mus_p, logvars_p, kls_spatial = [], [], [], []
    for t in range(1, T):
        mu_p, logvar_p, state_p = model.prior_step(h, state_p)
        mus_p.append(mu_p)
        logvars_p.append(logvar_p)
        g, state_f = model.frame_predictor(torch.cat([h, z[:, t - 1], c[:, t - 1]], 1), state_f)
        if terms is None or model.last_frame_skip or t - 1 < n_past:
            terms = skip_terms(model.decoder, skip_frame)  # each (B, c, r, r)
        x_hat, stats = decode(model.decoder, g[:, None], [s[:, None] for s in terms], c[:, t - 1: t],
                              [s[:, t: t + 1] for s in skips_gt], [n[:, t - 1: t] for n in spatial])
        x_hat = model.compose(x_hat[:, 0], x_in, g)  # (B, C, H, W)
        preds.append(x_hat)
        kls_spatial.append(_spatial_kl(stats))  # each level's (B, 1)
        if t < n_past:
            h, skip_frame, x_in = h_gt[:, t], [s[:, t] for s in skips_gt], frames[:, t]
        elif t < T - 1:
            h, skip_frame = encode(model.encoder, x_hat[:, None])
            h, skip_frame, x_in = h[:, 0], [s[:, 0] for s in skip_frame], x_hat
    mu_p = logvar_p = None
    if model.prior is not None:
        mu_p, logvar_p = torch.stack(mus_p, 1), torch.stack(logvars_p, 1)  # (B, T-1, z)
    kl_spatial = [torch.cat(k, 1) for k in zip(*kls_spatial)]  # each level's (B, T-1)
    return model.losses(frames, torch.stack(preds, 1), kl_divergence(mu_q, logvar_q, mu_p, logvar_p), kl_spatial)


def predict(model, frames, conds, n_past, n_future, noise=None, posterior=False, track=None):
    """CVAE.predict with the same arguments and result, faster: the given frames (all frames with
    posterior=True) are encoded in one call and the skip terms computed once per skip frame. Run it on
    inference_copy(model) under torch.no_grad() for the Winograd convolutions and folded BatchNorm."""
    check_track(model, track, frames)
    B, T, C = frames.shape[0], n_past + n_future, frames.shape[2]
    noise, spatial = model.draw_noise(noise, B, T, frames.device)
    h_gt, skips_gt = encode(model.encoder, frames[:, : T if posterior else n_past])  # (B, n, g)
    c = model.embed_conditions(conds, B, T)
    h, skip_frame, terms, x_in = h_gt[:, 0], [s[:, 0] for s in skips_gt], None, frames[:, 0]
    state_q = state_p = state_f = None
    preds, maps = [], []
    for t in range(1, T):
        mu_p, logvar_p, state_p = model.prior_step(h, state_p)
        if t < n_past or posterior:
            z, _, _, state_q = model.posterior(h_gt[:, t], state_q, noise[:, t - 1])
        else:
            z = model.sample_prior(mu_p, logvar_p, noise[:, t - 1])
        g, state_f = model.frame_predictor(torch.cat([h, z, c[:, t - 1]], 1), state_f)
        if t < n_past:
            h, skip_frame, x_in = h_gt[:, t], [s[:, t] for s in skips_gt], frames[:, t]
            continue
        if terms is None or model.last_frame_skip:
            terms = skip_terms(model.decoder, skip_frame)  # each (B, c, r, r)
        targets = [s[:, t: t + 1] for s in skips_gt] if posterior else None  # the spatial levels' posterior or prior
        x_hat = decode(model.decoder, g[:, None], [s[:, None] for s in terms], c[:, t - 1: t], targets,
                       [n[:, t - 1: t] for n in spatial])[0][:, 0]
        if t == n_past and track is not None:
            x_in = torch.cat([x_in, track.to(x_in)], 1)  # (B, C + M, H, W): the maps ride with the frame
        x_hat = model.compose(x_hat, x_in, g)  # (B, C [+ M], H, W)
        preds.append(x_hat[:, :C])
        maps.append(x_hat[:, C:])
        if t < T - 1:  # the last prediction is not fed back
            h, skip_frame = encode(model.encoder, x_hat[:, None, :C])
            h, skip_frame, x_in = h[:, 0], [s[:, 0] for s in skip_frame], x_hat
    return torch.stack(preds, 1) if track is None else (torch.stack(preds, 1), normalise_maps(torch.stack(maps, 1)))


def lstm_sequence(net, x, state=None, per_step=True):
    """models.lstm.lstm over a sequence x (B, T, D) -> (B, T, out): the embedding and the head run once
    on all B*T rows, the head's BatchNorm with statistics per step (per_step=False: over all rows); the cells
    step through T."""
    B, T = x.shape[:2]
    hid = _cells(net, x, state)
    return run_per_step(net.output, hid.reshape(B * T, -1), T if per_step else 1).reshape(B, T, -1)  # BatchNorm1d wants (N, C)


def gaussian_lstm_sequence(net, x, state=None):
    """models.lstm.gaussian_lstm.params over a sequence x (B, T, D) -> mu, logvar, each (B, T, z)."""
    hid = _cells(net, x, state)
    return net.mu_net(hid), net.logvar_net(hid)


def _cells(net, x, state):
    """The top cell's outputs (B, T, hidden) of net's embedding and stacked LSTMCells over a sequence x (B, T, D)
    whose every input is known in advance (teacher forcing), as T calls of net.cell_step compute them.

    One torch.lstm call instead of T x n_layers cell calls: the same equations (gates i, f, g, o; the
    LSTMCells' own weights, passed as the multi-layer LSTM's parameters), run layer by layer, each layer's input
    projection one matrix product over all T steps, the time loop in C++ (cuDNN on a GPU). About 3.5x faster
    forward + backward than the cell loop on a 2-core CPU at the demo and full widths; the same outputs up to
    rounding (tested in float64 to 1e-12)."""
    e = net.embed(x)  # (B, T, hidden)
    if state is None:
        h0 = c0 = e.new_zeros(net.n_layers, e.shape[0], net.hidden_size)
    else:
        h0, c0 = (torch.stack(s) for s in zip(*state))  # each (n_layers, B, hidden)
    weights = [w for cell in net.cells for w in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)]
    with warnings.catch_warnings():  # cuDNN copies weights that are not one flat buffer: they are the cells' own
        warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous")
        out, _, _ = torch.lstm(e, (h0.to(e.dtype), c0.to(e.dtype)), weights, True, net.n_layers, 0.0, net.training,
                               False, True)
    return out  # (B, T, hidden)


def _cells_per_step(net, x, state):
    """_cells as the plain form computes it: net.cell_step one time step at a time (the reference)."""
    e = net.embed(x)  # (B, T, hidden)
    outs = []
    for t in range(x.shape[1]):
        o, state = net.cell_step(e[:, t], state)
        outs.append(o)
    return torch.stack(outs, 1)  # (B, T, hidden)


# ----------------------------------------------------------------------------------------------------
# Encoder and decoder on whole clips
def encode(encoder, frames, per_step=True):
    """vgg_encoder on every frame of a clip: frames (B, T, C, H, W) -> h (B, T, g) and the skips, each
    (B, T, c, r, r); BatchNorm statistics per time step in training (per_step=False: over the clip)."""
    B, T = frames.shape[:2]
    S = T if per_step else 1  # the steps batch_norm_per_step normalises apart
    x = frames.reshape(B * T, *frames.shape[2:])  # batch-major rows: b * T + t
    h1 = run_per_step(encoder.c1, x, S)
    pool = lambda block, x: in_layout(block, "pool", max_pool2x2, x)  # the pooling before block, in its layout
    h2 = run_per_step(encoder.c2, pool(encoder.c2, h1), S)
    h3 = run_per_step(encoder.c3, pool(encoder.c3, h2), S)
    h4 = run_per_step(encoder.c4, pool(encoder.c4, h3), S)
    h5 = run_per_step(encoder.c5, pool(encoder.c5, h4), S)  # (B*T, g, 1, 1)
    return h5.reshape(B, T, -1), [s.reshape(B, T, *s.shape[1:]) for s in (h1, h2, h3, h4)]


def skip_terms(decoder, skips):
    """The skips' share of each decoder block's first convolution.

    That convolution sees cat([upsampled, skip]) and is linear, so W * [u; s] + b = W_u * u + b + W_s * s.
    The skip half depends only on the skip frame, which is the same for every predicted step (SVG,
    Sec. 3), so it is computed once per skip frame rather than once per step.

    skips: the encoder's four maps with any leading shape, (..., c_i, r_i, r_i). Returns four maps
    (..., c_out_i, r_i, r_i), finest first. A CondConv2d's kernel depends on the step's condition, so for
    its blocks the "term" is the skip itself, which decode concatenates as the plain form does.
    """
    terms = []
    for block, s in zip(decoder.blocks(), reversed(skips)):
        conv = block[0][0]
        if isinstance(conv, CondConv2d):
            terms.append(s)
            continue
        flat = s.reshape(-1, *s.shape[-3:])  # (N, c, r, r)
        t = conv3x3(flat, conv.weight[:, conv.in_channels - flat.shape[1]:])  # (N, c_out, r, r)
        terms.append(t.reshape(*s.shape[:-3], *t.shape[1:]))
    return terms[::-1]


def decode(decoder, g, terms, c=None, targets=None, noise=(), per_step=True):
    """vgg_decoder on every step of a clip: g (B, T, dim), terms = skip_terms() of each step's skips
    (B, T, ...), c the steps' condition embeddings (B, T, E) (used with cond_conv); with spatial latent
    levels, targets the true frames' skips (B, T, ...) for posterior z or None for prior z, and noise
    [(B, T, zs, r, r) per level]. Returns frames (B, T, C, H, W) and the levels' (mu_q, logvar_q, mu_p,
    logvar_p), each (B, T, zs, r, r) or None; BatchNorm statistics per time step in training (per_step=False:
    over all B * T rows)."""
    B, T = g.shape[:2]
    S = T if per_step else 1  # the steps batch_norm_per_step normalises apart
    rows = lambda x: None if x is None else x.reshape(B * T, *x.shape[2:])  # batch-major rows, as g's
    c = rows(c)
    d = run_per_step(decoder.upc1, g.reshape(B * T, -1, 1, 1), S)  # (B*T, 8b, 4, 4)
    stats = []
    for i, (block, t) in enumerate(zip(decoder.blocks(), reversed(terms))):  # 8x8, 16x16, 32x32, 64x64
        films = iter(decoder.film[i]) if decoder.film is not None else itertools.repeat(None)
        conv = block[0][0]
        t = rows(t)
        if isinstance(conv, CondConv2d):  # per-example kernels: the plain concatenation (module docstring)
            x = conv(torch.cat([F.interpolate(d, scale_factor=2, mode="nearest"), t], 1), c)
        else:
            up = lambda d, conv=conv: upsampled_conv(d, conv.weight[:, : d.shape[1]], conv.bias)
            x = in_layout(conv, "up", up, d)  # the upsampled half of the conv
            x = x.add_(t)  # + the skip half: conv of cat([up(d), skip])
        if i < decoder.levels - 1:  # level i's z on the top-down features u = up(d), as vgg_decoder.forward
            u = F.interpolate(d, scale_factor=2, mode="nearest")
            z, st = decoder.latent(i, u, None if targets is None else rows(targets[-1 - i]), rows(noise[i]))
            stats.append([None if s is None else s.reshape(B, T, *s.shape[1:]) for s in st])
            x = x + decoder.z_inject[i](z)
        d = _vgg_layer_rest(block[0], x, S, c, next(films))
        for layer in block[1:]:
            if isinstance(layer, vgg_layer):
                d = _vgg_layer_rest(layer, _conv(layer[0], d, S, c), S, c, next(films))
            else:
                d = run_per_step(layer, d, S)
    return d.reshape(B, T, *d.shape[1:]), stats


def _conv(conv, x, steps, c):
    """A vgg_layer's convolution on rows x (B * steps, ...): a CondConv2d with the rows' conditions c, else
    as run_per_step runs it."""
    return conv(x, c) if isinstance(conv, CondConv2d) else run_per_step(conv, x, steps)


def _vgg_layer_rest(layer, x, steps, c, film):
    """The rest of a vgg_layer after its convolution's output x: BatchNorm per step, FiLM, LeakyReLU."""
    _, bn, act = layer
    x = run_per_step(bn, x, steps)
    return act(x if film is None else film(x, c))


# ----------------------------------------------------------------------------------------------------
# BatchNorm per time step, and folded for inference
def run_per_step(module, x, steps):
    """module(x) for x (B * steps, ...) with batch-major rows, as `steps` separate calls on consecutive time
    steps compute it: every BatchNorm (nested nn.Sequential too) normalises each step over its own B rows
    (batch_norm_per_step), and 3x3 convolutions go through conv3x3."""
    if isinstance(module, nn.Sequential):
        for m in module:
            x = run_per_step(m, x, steps)
        return x
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return batch_norm_per_step(module, x, steps)
    if type(module) is nn.Conv2d and module.kernel_size == (3, 3) and module.padding == (1, 1) \
            and module.stride == (1, 1) and module.groups == 1:
        return in_layout(module, "conv", lambda x: conv3x3(x, module.weight, module.bias,
                                                          functools.partial(_f4_weight, module)), x)
    if type(module) in (nn.Conv2d, nn.ConvTranspose2d):
        return in_layout(module, "conv", module, x)
    return module(x)


# ----------------------------------------------------------------------------------------------------
# Memory format per convolution, measured on this host
_RECORD = None  # while choose_conv_layouts records: {(module, role): (fn, input shape, dtype)}


_ROLES = ("conv", "up", "pool")  # a convolution, a decoder block's upsampled half, the max pooling before a block


class _ToChannelsLast(torch.autograd.Function):
    """x.contiguous(memory_format=channels_last), whose backward hands the gradient back in NCHW.

    Autograd's own backward of the conversion would pass the channels-last kernel's input gradient on as it
    is, and the BatchNorm and LeakyReLU backward kernels before it would then read it against their NCHW
    saved tensors with mismatched strides, several times slower than either layout alone at 8 channels."""

    @staticmethod
    def forward(ctx, x):
        return x.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _FromChannelsLast(torch.autograd.Function):
    """y.contiguous() (NCHW), whose backward hands the gradient to the channels-last kernel in its layout."""

    @staticmethod
    def forward(ctx, y):
        return y.contiguous()

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=torch.channels_last)


def in_layout(module, role, fn, x):
    """fn(x), a convolution of `module` (role "conv", "up" for a decoder block's upsampled half, or "pool" for
    the max pooling before an encoder block), in the memory format chosen for it on this host
    (choose_conv_layouts): channels-last when marked, with x converted before and the result converted back to
    NCHW, so that BatchNorm per step and everything after see what they always see, forward and backward. In
    training only (the choice was measured forward + backward); the same function, rounded as the
    channels-last kernels round (tested)."""
    if _RECORD is not None:
        _RECORD.setdefault((module, role), (fn, tuple(x.shape), x.dtype))
    if torch.is_grad_enabled() and module.__dict__.get("_channels_last_" + role):
        return _FromChannelsLast.apply(fn(_ToChannelsLast.apply(x)))
    return fn(x)


def set_conv_layouts(model, names):
    """Mark the convolutions and poolings named "<module name>:<role>" (as choose_conv_layouts returns them)
    channels-last, and every other one NCHW."""
    names = set(names)
    for name, m in model.named_modules():
        for role in _ROLES:
            if f"{name}:{role}" in names:
                m.__dict__["_channels_last_" + role] = True
            else:
                m.__dict__.pop("_channels_last_" + role, None)


def choose_conv_layouts(model, frames, conds, n_past, amp_context=contextlib.nullcontext, repeats=3, min_gain=0.1):
    """Which convolutions and max poolings of the batched training rollout run faster in channels-last here.

    One forward_batched of a copy of `model` on (frames, conds) records every convolution's and pooling's input
    shape; each is then timed alone, forward + backward (under amp_context, e.g. the run's autocast), in NCHW
    and in channels-last with the two conversions counted, best of `repeats` after a warm-up (one timed call for
    a layer whose warm-up took over 50 ms: the full width's 64x64 layers on a CPU). A layer is marked
    channels-last where that is faster by min_gain (a margin, so that timing noise does not flip a tie). `model`
    is not changed (the caller applies the choice with set_conv_layouts). Returns
    (names marked channels-last, {name: (NCHW seconds, channels-last seconds)})."""
    global _RECORD
    probe = copy.deepcopy(model).train()
    set_conv_layouts(probe, ())
    names = {m: n for n, m in probe.named_modules()}
    _RECORD = {}
    try:
        with amp_context():
            forward_batched(probe, frames, conds, n_past)
        recorded = _RECORD
    finally:
        _RECORD = None
    times, chosen = {}, []
    for (module, role), (fn, shape, dtype) in recorded.items():
        x = torch.randn(shape, device=frames.device, dtype=dtype)
        runs = []
        for cl in (False, True):
            xin = x.requires_grad_()

            def step():
                with amp_context():
                    y = _FromChannelsLast.apply(fn(_ToChannelsLast.apply(xin))) if cl else fn(xin)  # as in_layout
                y.backward(torch.ones_like(y))
            runs.append(best_time(step, frames.device, repeats))
        name = f"{names[module]}:{role}"
        times[name] = tuple(runs)
        if runs[1] < (1 - min_gain) * runs[0]:
            chosen.append(name)
    return chosen, times


def time_training_rollouts(runs, frames, conds, n_past, rounds=5, budget_s=3.0):
    """{name: seconds of one training rollout (forward_batched and the backward of its losses)} for each
    (model, amp_context) in `runs` ({name: (model, amp_context)}), on (frames, conds): what --amp auto compares
    between precisions. Each is the best of `rounds` calls after a warm-up, the candidates interleaved call by
    call, so that a burst of load on the machine hits them alike (timed one after the other, best of 2 each,
    bf16 against fp32 at the demo width ranged 0.58-0.86x in one process of an idle 2-core AVX-512-BF16 host,
    and came out 1.08x at one run's start; interleaved, best of 5: 0.72-0.82x). Rounds after the second stop
    once the timing has taken budget_s, so that a full-width model (seconds per rollout) pays what one
    warm-up and two calls each cost. Copies are timed: the models and their BatchNorm statistics are not
    changed."""
    steps = {}
    for name, (model, amp_context) in runs.items():
        probe = copy.deepcopy(model).train()

        def step(probe=probe, amp_context=amp_context):
            with amp_context():
                out = forward_batched(probe, frames, conds, n_past)
            (out["mse"] + out["kld"]).backward()
            probe.zero_grad(set_to_none=True)
        step()  # warm-up: kernel selection, primitive creation
        steps[name] = step
    best, t0 = dict.fromkeys(steps, float("inf")), time.perf_counter()
    for i in range(rounds):
        if i >= 2 and time.perf_counter() - t0 > budget_s:
            break
        for name, step in steps.items():
            best[name] = min(best[name], best_time(step, frames.device, 0))
    return best


def batch_norm_per_step(bn, x, steps):
    """bn(x) as `steps` separate calls on consecutive time steps would compute it.

    x: (B * steps, C, ...) with batch-major rows (row b * steps + t is sequence b at step t). In training,
    step t is normalised with the mean and variance of its own B rows, and the running averages receive
    the steps' updates in time order (r <- (1 - m) r + m s_t for t = 0..steps-1, summed in closed form).
    In eval mode, or for one step, this is bn(x).
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
    y = F.batch_norm(folded, mean, var, w, b, True, 1.0, bn.eps)
    with torch.no_grad():
        mean, var = mean.view(steps, C), var.view(steps, C)  # (steps, C) each
        m = bn.momentum
        decay = m * (1 - m) ** torch.arange(steps - 1, -1, -1, device=mean.device, dtype=mean.dtype)  # (steps,)
        bn.running_mean.mul_((1 - m) ** steps).add_(decay @ mean)
        bn.running_var.mul_((1 - m) ** steps).add_(decay @ var)
        bn.num_batches_tracked.add_(steps)
    # Back to x's shape, but not as an autograd view of y: the in-place LeakyReLU that follows would make a
    # view's backward a CopySlices, which clones the whole gradient and copies it back. Nothing else holds y.
    return torch.ops.aten._unsafe_view(y, x.shape)


def inference_copy(model):
    """A frozen eval-mode copy of `model` for inference, with every BatchNorm that follows a convolution or
    linear layer in an nn.Sequential folded into that layer and replaced by nn.Identity (and into the
    spatial latents' injection convolutions, added before a decoder block's first BatchNorm).

    In eval mode BatchNorm is y = gamma (x - mean) / sqrt(var + eps) + beta with fixed statistics, so
    W' = W gamma / sqrt(var + eps) and b' = (b - mean) gamma / sqrt(var + eps) + beta give the same map
    in one pass instead of two (Ioffe & Szegedy 2015, Sec. 3.1). The copy's parameters do not require
    grad, so its 3x3 convolutions keep their Winograd weight transforms between calls. `model` itself is
    not modified. Same predictions up to rounding (tested).
    """
    model = copy.deepcopy(model).requires_grad_(False)
    decoder = model.decoder
    for i, inject in enumerate(decoder.z_inject if decoder.levels > 1 else ()):
        # A spatial latent's share is added before block i's first BatchNorm: it is scaled alike.
        bn = decoder.blocks()[i][0][1]
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):  # folded already (a copy of a copy)
            continue
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (c_out,)
        inject.weight = nn.Parameter(inject.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
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
            elif isinstance(layer, CondConv2d):  # the mix is linear in the experts: scale each expert alike
                K, c_out = layer.weight.shape[:2]
                w, b = fuse_conv_bn_weights(layer.weight.transpose(0, 1).reshape(c_out, -1, 3, 3), layer.bias, *stats)
                w = nn.Parameter(w.view(c_out, K, -1, 3, 3).transpose(0, 1).contiguous())
            elif isinstance(layer, nn.Linear):
                w, b = fuse_linear_bn_weights(layer.weight, layer.bias, *stats)
            else:
                continue
            layer.weight, layer.bias = w.requires_grad_(False), b.requires_grad_(False)
            seq[i] = nn.Identity()
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# Convolution and pooling kernels
def conv3x3(x, weight, bias=None, transformed=None):
    """F.conv2d(x, weight, bias, padding=1) for 3x3 kernels, with faster algorithms for CPU inference.

    Without autograd, on fp32 CPU tensors in NCHW layout and outside autocast, the layers where it pays
    (_algorithm: measured per host, or a rule) use a Winograd convolution (Lavin & Gray 2016), which needs several times fewer
    multiplications than the direct algorithm for 3x3 kernels: NNPACK's F(6x6, 3x3) on maps of 16x16
    and larger, our F(4x4, 3x3) (winograd_f4) on 8x8 maps, where NNPACK's 8x8 tiles would cover a
    12x12 area. The rounding differs from the direct algorithm's (~1e-5 relative per layer, tested).
    Everything else (training, CUDA, channels-last, reduced precision) is F.conv2d unchanged.

    transformed: optional callable returning winograd_f4_weight(weight), for callers that keep it.
    """
    if (WINOGRAD and not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and x.dim() == 4 and not x.is_contiguous(memory_format=torch.channels_last)
            and not torch.is_autocast_enabled("cpu")):
        if _RECORD_3X3 is not None:
            _RECORD_3X3.setdefault(algorithm_key(x.shape[1], weight.shape[0], *x.shape[-2:]), (x, weight, bias))
        algorithm = _algorithm(x.shape[1], weight.shape[0], *x.shape[-2:])
        if isinstance(algorithm, OnlineChoice):
            return algorithm(lambda name: _run_3x3(name, x, weight, bias, transformed), x.shape[0])
        return _run_3x3(algorithm, x, weight, bias, transformed)
    return F.conv2d(x, weight, bias, padding=1)


def _run_3x3(algorithm, x, weight, bias=None, transformed=None):
    """The 3x3 convolution (padding 1) of x by `algorithm`: "direct", "nnpack" or "f4" (see conv3x3)."""
    if algorithm == "f4":
        return winograd_f4(x, transformed() if transformed else winograd_f4_weight(weight), bias)
    if algorithm == "nnpack":
        return torch._nnpack_spatial_convolution(x.contiguous(), weight.contiguous(), bias, [1, 1])
    return F.conv2d(x, weight, bias, padding=1)


class OnlineChoice:
    """A 3x3 layer shape whose inference algorithm is chosen by timing the evaluation's own calls.

    Its calls take the candidate algorithms in turn (the one with the fewest calls at the call's number of
    rows first, in the order given), each call timed on its real input; once every candidate has had one
    warm-up and `repeats` timed calls at one number of rows, the fastest (by its best call) runs every later
    call, a Winograd one only where it beats "direct" by min_gain, as choose_inference_algorithms decides.
    What the measurement costs is then only the slower candidates' excess on those few calls, where timing
    each candidate on inputs of its own costs their whole calls (the first evaluation on a machine paid 0.89x
    the fastest path for that). The calls before the decision mix the candidates' rounding (~1e-5 relative
    per layer), so only the first evaluation that measures a shape rounds a few of its layer calls apart."""

    def __init__(self, candidates, repeats=2, min_gain=0.1):
        self.candidates, self.repeats, self.min_gain = tuple(candidates), repeats, min_gain
        self.samples = {}  # {rows: {candidate: [seconds of each call]}}
        self.choice, self.cost_s = None, 0.0  # cost_s: the trial calls' excess over the chosen candidate's best

    def __call__(self, run, rows):
        """run(name) -> the convolution by that candidate; rows: the number of rows of its input."""
        if self.choice is not None:
            return run(self.choice)
        times = self.samples.setdefault(rows, {name: [] for name in self.candidates})
        name = min(self.candidates, key=lambda n: len(times[n]))
        t0 = time.perf_counter()
        y = run(name)
        times[name].append(time.perf_counter() - t0)
        if all(len(t) > self.repeats for t in times.values()):
            best = {n: min(t[1:]) for n, t in times.items()}  # each candidate's first call is its warm-up
            fastest = min(best, key=best.get)
            self.choice = fastest if best[fastest] < (1 - self.min_gain) * best["direct"] else "direct"
            self.cost_s = sum(s - best[self.choice] for t in times.values() for s in t)
        return y

    def result(self):
        """The decision, or None while too few calls have been timed."""
        return self.choice


def _f4_weight(conv):
    """winograd_f4_weight(conv.weight), kept on a frozen layer (as in inference_copy) and recomputed when
    the weight is replaced or modified in place (identity and version counter)."""
    w = conv.weight
    if w.requires_grad:
        return winograd_f4_weight(w)
    cached = conv.__dict__.get("_f4")
    if cached is None or cached[0] is not w or cached[1] != w._version:
        cached = conv.__dict__["_f4"] = (w, w._version, winograd_f4_weight(w))
    return cached[2]


def _algorithm(c_in, c_out, h, w):
    """The 3x3 inference algorithm of a layer: the one choose_inference_algorithms measured fastest on this
    host where set_inference_algorithms was given its choice (an OnlineChoice while it is being timed), else
    _algorithm_rule. The choice depends on the
    layer only, never on the batch, so a sequence's prediction does not depend on the batch it is in."""
    if ALGORITHMS is not None:
        return ALGORITHMS.get(algorithm_key(c_in, c_out, h, w), "direct")
    return _algorithm_rule(c_in, h, w)


def algorithm_key(c_in, c_out, h, w):
    return f"{c_in}->{c_out}@{h}x{w}"


def _algorithm_rule(c_in, h, w):
    """The rule measured fastest on a 2-core AVX2 CPU at evaluation batch sizes, for callers that do not
    measure: "f4" for at least 256 input channels on 8x8 maps (1.7-1.8x faster than NNPACK there), "nnpack"
    for at least 64 on 32x32 maps and larger or 128 on 16x16 (our F(4x4) loses there: its transforms are
    memory-bound torch ops), "direct" otherwise. Other CPUs differ (on an AMX host the direct kernels won
    everywhere), which is why evaluation.evaluate measures instead."""
    if c_in >= 256 and h == w == 8:
        return "f4"
    size = min(h, w)
    if ((c_in >= 64 and size >= 32) or (c_in >= 128 and size >= 16)) and _nnpack_available():
        return "nnpack"
    return "direct"


def set_inference_algorithms(choice):
    """Use `choice` ({algorithm_key: "direct" | "nnpack" | "f4" | an OnlineChoice}, as
    choose_inference_algorithms returns it; a layer not in it runs direct) for every CPU inference
    convolution from now on; None: back to the rule."""
    global ALGORITHMS
    ALGORITHMS = None if choice is None else dict(choice)


def keeps_inference_algorithms(fn):
    """Decorator: whatever set_inference_algorithms setting fn makes lasts only for the call."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = ALGORITHMS
        try:
            return fn(*args, **kwargs)
        finally:
            set_inference_algorithms(previous)
    return wrapper


def choose_inference_algorithms(model, frames, conds, n_past, n_future=1, repeats=2, min_gain=0.1, known=(),
                                screen_rows=4, screen_loss=1.5, online=False):
    """Which algorithm computes each 3x3 convolution of CPU inference fastest on this host.

    One predict of inference_copy(model) on a row of (frames, conds) records every distinct 3x3 layer shape
    (c_in, c_out, H, W) and how many rows its first input has per sequence (one predicted frame already runs
    every layer); each is timed on random inputs of that many rows per sequence at this batch. Each shape is
    timed alone in every algorithm that applies: "direct" F.conv2d; "nnpack", NNPACK's Winograd F(6x6, 3x3),
    where PyTorch has it; "f4", our Winograd F(4x4, 3x3), on maps whose sides are multiples of 4, its weight
    transform precomputed as a frozen layer keeps it. The timing is in two rounds so that it costs a few
    seconds, not tens: a screen on `screen_rows` rows drops our F(4x4) where it is more than `screen_loss`
    times slower than the fastest there (on large maps it is memory-bound and can lose 5x; NNPACK is not
    screened, since a few rows misjudge it), then the rest run on the full batch, interleaved so that a
    burst of load on the machine hits them all alike, best of `repeats` after a warm-up. A Winograd algorithm
    is chosen only where it beats the direct one by min_gain, so that timing noise does not trade
    exact-as-possible rounding for nothing.
    `model` is not changed; apply the result with set_inference_algorithms. Layer shapes in `known` are not
    timed again. Returns ({algorithm_key: algorithm}, {algorithm_key: {algorithm: seconds}}) for the shapes
    timed (a screened-out algorithm's entry is its screen time scaled to the batch).

    online: after the screen, the shapes with more than one candidate left are not timed here: their entry is
    an OnlineChoice, which times the candidates on the caller's own calls (evaluation.evaluate's first
    batch) and decides there, and their times are the screen's."""
    probe = inference_copy(model)
    # The layer shapes from a predict of one row (cheap); each layer's first input at the batch has its rows
    # times the batch (the given frames are encoded together), which random values stand in for: the
    # kernels' speed does not depend on the values.
    recorded = _record_3x3(probe, frames[:1], None if conds is None else conds[:1], n_past, n_future)
    choice, times = {}, {}
    with torch.no_grad():
        for key, (x1, weight, bias) in recorded.items():
            if key in known:
                continue
            rows = x1.shape[0] * frames.shape[0]
            x = torch.rand(screen_rows if online else rows, *x1.shape[1:], dtype=x1.dtype, device=x1.device)
            weight = weight.contiguous()
            u = winograd_f4_weight(weight) if x.shape[-2] % 4 == 0 and x.shape[-1] % 4 == 0 else None
            names = ["direct"] + ["nnpack"] * _nnpack_available() + ["f4"] * (u is not None)

            def runs(x):
                return {name: functools.partial(_run_3x3, name, x, weight, bias, lambda: u) for name in names}
            small = x[:screen_rows].contiguous()
            screen = {name: best_time(fn, x.device, 1) for name, fn in runs(small).items()}
            # Only F(4x4) is screened: NNPACK's time on a few rows is mostly a per-call cost that does not
            # grow with the rows (on a 2-core AVX2 host, 64->128 at 32x32: 1.6x direct on 4 rows, 0.72x on 32).
            keep = {name: fn for name, fn in runs(x).items()
                    if name != "f4" or screen[name] <= screen_loss * min(screen.values())}
            scale = rows / small.shape[0]
            if online:
                times[key] = {name: t * scale for name, t in screen.items()}
                choice[key] = OnlineChoice(keep, repeats, min_gain) if len(keep) > 1 else "direct"
                continue
            best = dict.fromkeys(keep, float("inf"))
            for name, fn in keep.items():
                fn()  # warm-up
            for _ in range(repeats):
                for name, fn in keep.items():
                    best[name] = min(best[name], best_time(fn, x.device, 0))
            times[key] = {name: best.get(name, screen[name] * scale) for name in screen}
            fastest = min(best, key=best.get)
            choice[key] = fastest if best[fastest] < (1 - min_gain) * best["direct"] else "direct"
    return choice, times


def _record_3x3(model, frames, conds, n_past, n_future):
    """{algorithm_key: (input, weight, bias)} of the first call of each 3x3 layer shape in a predict."""
    global _RECORD_3X3
    _RECORD_3X3 = {}
    try:
        with torch.no_grad():
            predict(model, frames, conds, n_past, n_future)
        return _RECORD_3X3
    finally:
        _RECORD_3X3 = None


def best_time(fn, device, repeats=3, slow=0.05):
    """The best of `repeats` timed calls of fn() after one warm-up (kernel selection, primitive creation),
    or one timed call where the warm-up took over `slow` seconds; repeats=0: a single call, no warm-up.
    Synchronised on CUDA."""
    def once():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0
    if repeats == 0:  # one timed call, no warm-up
        return once()
    first = once()
    return min(once() for _ in range(repeats if first < slow else 1))


@functools.cache
def _nnpack_available():
    # is_available() also initialises NNPACK, which its convolution needs before the first call.
    return hasattr(torch, "_nnpack_spatial_convolution") and torch.backends.nnpack.is_available()


# Winograd F(4x4, 3x3) (Lavin & Gray 2016, Sec. 4.2; interpolation points 0, +-1, +-2, infinity):
# Y = A^T [(G g G^T) * (B^T d B)] A for a 6x6 input tile d, 3x3 kernel g and 4x4 output tile Y.
# Kronecker products apply a transform to both axes of a flattened tile at once.
_F4_BT = torch.tensor([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                       [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=torch.float64)
_F4_G = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                      [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)
_F4_AT = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                       [0, 1, -1, 8, -8, 1]], dtype=torch.float64)
_F4_B36 = torch.kron(_F4_BT, _F4_BT)  # (36, 36): flattened d -> flattened B^T d B
_F4_G36 = torch.kron(_F4_G, _F4_G)  # (36, 9): flattened g -> flattened G g G^T
_F4_A36 = torch.kron(_F4_AT, _F4_AT)  # (16, 36): flattened M -> flattened A^T M A


def winograd_f4_weight(weight):
    """(c_out, c_in, 3, 3) kernels -> their F(4x4, 3x3) transforms, (36, c_in, c_out)."""
    c_out, c_in = weight.shape[:2]
    return (_F4_G36.to(weight) @ weight.permute(2, 3, 1, 0).reshape(9, c_in * c_out)).view(36, c_in, c_out)


def winograd_f4(x, u, bias=None):
    """F.conv2d(x, weight, bias, padding=1) by Winograd F(4x4, 3x3), given u = winograd_f4_weight(weight).

    x: (N, c_in, H, W) with H and W multiples of 4. The tiles are gathered from an (H, W, N, c_in)
    copy of x, so each copy moves contiguous runs of N * c_in values, and the 36 transformed products
    are one batched matrix multiplication over the channels: 36 instead of 9 * 16 = 144 multiply-adds
    per 4x4 output tile and channel pair.
    """
    N, c_in, H, W = x.shape
    c_out = u.shape[2]
    th, tw = H // 4, W // 4
    xp = x.new_zeros(H + 2, W + 2, N, c_in)  # zero padding of 1
    xp[1:-1, 1:-1] = x.permute(2, 3, 0, 1)
    s = xp.stride()
    # 6x6 tiles overlapping by 2: (6, 6, th, tw, N * c_in) -> (36, th * tw * N * c_in)
    d = xp.as_strided((6, 6, th, tw, N * c_in), (s[0], s[1], 4 * s[0], 4 * s[1], 1)).reshape(36, -1)
    v = (_F4_B36.to(x) @ d).view(36, th * tw * N, c_in)  # B^T d B, (36, tiles, c_in)
    m = torch.bmm(v, u)  # (36, tiles, c_out): the elementwise products summed over c_in
    y = (_F4_A36.to(x) @ m.view(36, -1)).view(4, 4, th, tw, N, c_out)  # A^T m A
    y = y.permute(4, 5, 2, 0, 3, 1).reshape(N, c_out, H, W)  # (N, c_out, th, 4, tw, 4) -> (N, c_out, H, W)
    return y if bias is None else y.add_(bias.view(-1, 1, 1))


# The sub-pixel view of a nearest-neighbour 2x upsampling followed by a 3x3 convolution (Shi et al.
# 2016): output row 2p + a reads input rows p - 1 + a + s (s = 0, 1) through the kernel rows that fall
# on them, (0 | 1+2) for a = 0 and (0+1 | 2) for a = 1. In a transposed convolution with stride 2,
# padding 1 and a 4x4 kernel, output row o = 2i - 1 + k, so input row i reaches output row 2p + a
# through kernel row k = 3 - a - 2s. Row k of _UP_TAPS says which 3x3 kernel rows sum into it; the same
# holds for columns, so _UP_TAPS2 = kron(_UP_TAPS, _UP_TAPS) maps a flattened 3x3 kernel to the 4x4 one.
_UP_TAPS = torch.tensor([[0., 0., 1.], [0., 1., 1.], [1., 1., 0.], [1., 0., 0.]])
_UP_TAPS2 = torch.kron(_UP_TAPS, _UP_TAPS)  # (16, 9)


def upsampled_conv(d, weight, bias):
    """conv3x3(upsample_nearest_2x(d), weight, bias, padding=1), computed at d's resolution.

    The same map is a stride-2 transposed convolution of d with a 4x4 kernel made of sums of the 3x3
    kernel's taps (_UP_TAPS); same parameters, same result up to rounding (tested).
    d: (N, c_in, H, W); weight: (c_out, c_in, 3, 3). Returns (N, c_out, 2H, 2W).
    """
    c_out, c_in = weight.shape[:2]
    k = (weight.reshape(-1, 9) @ _UP_TAPS2.to(weight).T).view(c_out, c_in, 4, 4)  # one GEMM, not c_out*c_in small ones
    return F.conv_transpose2d(d, k.transpose(0, 1), bias, stride=2, padding=1)  # weight (c_in, c_out, 4, 4)


def max_pool2x2(x):
    """F.max_pool2d(x, 2) for even-sized maps (N, C, H, W). Without autograd it is the maximum of the four
    strided sub-grids, about 3x faster on a CPU than the pooling kernel, which also computes the argmax
    indices that only its backward needs; the values are identical."""
    if torch.is_grad_enabled():
        return F.max_pool2d(x, 2)
    return torch.maximum(torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2]),
                         torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))


def compile_rollout():
    """torch.compile the clip encoder and decoder used by forward_batched and predict (train --compile)."""
    global encode, decode
    encode, decode = torch.compile(encode), torch.compile(decode)
