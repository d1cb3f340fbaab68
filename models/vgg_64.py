"""VGG-style 64x64 frame encoder and decoder with skip connections (SVG, Denton & Fergus 2018).

The encoder maps a frame to a g_dim code plus four intermediate feature maps; the decoder mirrors it
and concatenates those maps (the "skips") at matching resolutions. Both accept any number of leading
dimensions, so one call can encode a whole (B, T) clip: that is what makes the batched rollout cheap.

    python -c "from models.vgg_64 import vgg_encoder; print(vgg_encoder(128))"
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .norm import batch_norm_per_step, run_per_step


# Inference convolutions through NNPACK's Winograd algorithm where that is faster (see conv3x3).
# Set to False for the direct algorithm everywhere.
WINOGRAD = True


def conv3x3(x, weight, bias=None):
    """F.conv2d(x, weight, bias, padding=1) for 3x3 kernels, with a faster algorithm for CPU inference.

    Without autograd, on fp32 CPU tensors in NCHW layout and outside autocast, the layers where it pays
    (_winograd_pays) run through NNPACK's Winograd convolution (Lavin & Gray 2016), which needs several
    times fewer multiplications than the direct algorithm for 3x3 kernels: 1.2-2.2x per layer at the
    full width, 1.25-1.3x for a whole evaluation. Its rounding differs from the direct algorithm's
    (~1e-5 relative per layer, tested). Everything else (training, CUDA, channels-last, reduced
    precision, the narrow demo widths) is F.conv2d unchanged.
    """
    if (WINOGRAD and not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and x.dim() == 4 and not x.is_contiguous(memory_format=torch.channels_last)
            and not torch.is_autocast_enabled("cpu") and _winograd_pays(x.shape[1], x.shape[-1]) and _nnpack_available()):
        return torch._nnpack_spatial_convolution(x.contiguous(), weight.contiguous(), bias, [1, 1])
    return F.conv2d(x, weight, bias, padding=1)


class Conv3x3(nn.Conv2d):
    """nn.Conv2d(nin, nout, 3, 1, 1) computed by conv3x3."""

    def __init__(self, nin, nout):
        super().__init__(nin, nout, 3, 1, 1)

    def forward(self, x):
        return conv3x3(x, self.weight, self.bias)


def _winograd_pays(c_in, size):
    """Where NNPACK beat the direct convolution on a 2-core AVX2 CPU at evaluation batch sizes (square
    maps of side `size`): at least 64 input channels on 32x32 maps and larger, 128 on 16x16, 256 on
    8x8, whose 6x6-output tiles are mostly wasted (four cover one map). The choice depends on the layer
    only, never on the batch, so a sequence's prediction does not depend on the batch it is in."""
    return (c_in >= 64 and size >= 32) or (c_in >= 128 and size >= 16) or (c_in >= 256 and size >= 8)


@functools.cache
def _nnpack_available():
    # is_available() also initialises NNPACK, which its convolution needs before the first call.
    return hasattr(torch, "_nnpack_spatial_convolution") and torch.backends.nnpack.is_available()


class vgg_layer(nn.Sequential):
    """Conv3x3 -> BatchNorm -> LeakyReLU(0.2), the unit every block is made of."""

    def __init__(self, nin, nout):
        super().__init__(Conv3x3(nin, nout), nn.BatchNorm2d(nout), nn.LeakyReLU(0.2, inplace=True))


def _flatten(x, trailing):
    """(..., *trailing) -> (N, *trailing), returning the leading shape to restore later."""
    lead = x.shape[: x.dim() - trailing]
    return x.reshape(-1, *x.shape[x.dim() - trailing:]), lead


def _steps(lead):
    """Time steps per sequence of a (B, T, ...) leading shape: BatchNorm statistics are taken over B
    separately for each of them, as when the steps run one call at a time (models/norm.py)."""
    return math.prod(lead[1:])


class vgg_encoder(nn.Module):
    def __init__(self, dim, base_channels=64, nc=3):
        super().__init__()
        b = base_channels  # b=64 gives the sample's 64/128/256/512 widths
        self.dim = dim
        self.c1 = nn.Sequential(vgg_layer(nc, b), vgg_layer(b, b))  # 64x64
        self.c2 = nn.Sequential(vgg_layer(b, 2 * b), vgg_layer(2 * b, 2 * b))  # 32x32
        self.c3 = nn.Sequential(vgg_layer(2 * b, 4 * b), vgg_layer(4 * b, 4 * b), vgg_layer(4 * b, 4 * b))  # 16x16
        self.c4 = nn.Sequential(vgg_layer(4 * b, 8 * b), vgg_layer(8 * b, 8 * b), vgg_layer(8 * b, 8 * b))  # 8x8
        self.c5 = nn.Sequential(nn.Conv2d(8 * b, dim, 4, 1, 0), nn.BatchNorm2d(dim), nn.Tanh())  # 4x4 -> 1x1
        self.mp = nn.MaxPool2d(2)

    def forward(self, x):
        """x: frames (..., C, H, W) in [0, 1], e.g. (B, T, 3, 64, 64).

        In training, BatchNorm statistics are taken over the first dimension (the batch) separately for
        each index of the others (the time steps), as when each step is encoded in its own call.
        Returns h (..., dim) and the skips [(..., b, 64, 64), (..., 2b, 32, 32), (..., 4b, 16, 16),
        (..., 8b, 8, 8)].
        """
        x, lead = _flatten(x, 3)  # (N, C, H, W), N = prod(lead)
        n = _steps(lead)
        h1 = run_per_step(self.c1, x, n)
        h2 = run_per_step(self.c2, self.mp(h1), n)
        h3 = run_per_step(self.c3, self.mp(h2), n)
        h4 = run_per_step(self.c4, self.mp(h3), n)
        h5 = run_per_step(self.c5, self.mp(h4), n)  # (N, dim, 1, 1)
        skips = [s.reshape(*lead, *s.shape[1:]) for s in (h1, h2, h3, h4)]
        return h5.reshape(*lead, self.dim), skips


# Which rows (or columns) of a 3x3 kernel fall on each input pixel once the input is upsampled 2x by
# nearest neighbour: an even output row reads input rows (r-1, r) through kernel rows (0, 1+2), an odd
# one reads (r, r+1) through (0+1, 2). Indexed (output phase, tap, kernel row).
_PHASE_TAPS = torch.tensor([[[1., 0., 0.], [0., 1., 1.]], [[1., 1., 0.], [0., 0., 1.]]])


def upsampled_conv(d, weight, bias):
    """conv3x3(upsample_nearest_2x(d), weight, bias, padding=1), computed at d's resolution.

    Each of the four output phases (even/odd row, even/odd column) is a 2x2 convolution of d with
    sums of the 3x3 kernel's taps (the sub-pixel view of Shi et al. 2016), so four 2x2 convolutions
    of d replace the 3x3 one on the 4x larger upsampled map: 16 instead of 36 multiply-adds per input
    pixel and channel pair, with the same parameters and the same result up to rounding (tested
    against the upsample-then-convolve form).

    d: (N, c_in, H, W); weight: (c_out, c_in, 3, 3). Returns (N, c_out, 2H, 2W).
    """
    N, _, H, W = d.shape
    c_out = weight.shape[0]
    taps = _PHASE_TAPS.to(weight)
    k = torch.einsum("asu,oiuv,btv->aboist", taps, weight, taps)  # (2, 2, c_out, c_in, 2, 2): phase (a, b)
    # Phase 0 reads (p-1, p), so d is padded before; phase 1 reads (p, p+1), padded after.
    phases = [[F.conv2d(F.pad(d, (1 - b, b, 1 - a, a)), k[a, b], bias) for b in (0, 1)] for a in (0, 1)]
    rows = [torch.stack(row, -1) for row in phases]  # each (N, c_out, H, W, 2)
    return torch.stack(rows, 3).view(N, c_out, 2 * H, 2 * W)  # (N, c_out, H, 2, W, 2) -> (N, c_out, 2H, 2W)


class vgg_decoder(nn.Module):
    def __init__(self, dim, base_channels=64, nc=3):
        super().__init__()
        b = base_channels
        self.dim = dim
        self.upc1 = nn.Sequential(nn.ConvTranspose2d(dim, 8 * b, 4, 1, 0), nn.BatchNorm2d(8 * b), nn.LeakyReLU(0.2, inplace=True))  # 1 -> 4
        self.upc2 = nn.Sequential(vgg_layer(16 * b, 8 * b), vgg_layer(8 * b, 8 * b), vgg_layer(8 * b, 4 * b))  # 8x8
        self.upc3 = nn.Sequential(vgg_layer(8 * b, 4 * b), vgg_layer(4 * b, 4 * b), vgg_layer(4 * b, 2 * b))  # 16x16
        self.upc4 = nn.Sequential(vgg_layer(4 * b, 2 * b), vgg_layer(2 * b, b))  # 32x32
        self.upc5 = nn.Sequential(vgg_layer(2 * b, b), nn.ConvTranspose2d(b, nc, 3, 1, 1), nn.Sigmoid())  # 64x64
        self.up = nn.UpsamplingNearest2d(scale_factor=2)

    def skip_terms(self, skips):
        """The skips' share of each block's first convolution.

        That convolution sees cat([upsampled, skip]) and is linear, so W * [u; s] + b = W_u * u + b + W_s * s.
        The skip half depends only on the skip frame, which is the same for every predicted step after the
        given frames (SVG, Sec. 3): computing it once per distinct skip frame rather than once per step
        removes about a sixth of a training step's FLOPs, with the same parameters and the same result.

        skips: the encoder's four maps, (..., c_i, r_i, r_i). Returns four maps (..., c_out_i, r_i, r_i).
        """
        terms = []
        for block, s in zip((self.upc2, self.upc3, self.upc4, self.upc5), reversed(skips)):
            conv = block[0][0]
            flat, lead = _flatten(s, 3)  # (N, c, r, r)
            t = conv3x3(flat, conv.weight[:, conv.in_channels - flat.shape[1]:])  # (N, c_out, r, r)
            terms.append(t.reshape(*lead, *t.shape[1:]))
        return terms[::-1]  # finest first, as the skips

    def forward(self, h, terms):
        """h: codes (..., dim); terms: skip_terms() of the skips, with h's leading shape.

        BatchNorm statistics per time step in training, as in the encoder. Returns frames (..., C, 64, 64)
        in [0, 1].
        """
        h, lead = _flatten(h, 1)  # (N, dim)
        n = _steps(lead)
        t1, t2, t3, t4 = (t.reshape(-1, *t.shape[len(lead):]) for t in terms)  # each (N, c_out, r, r)
        d = run_per_step(self.upc1, h[:, :, None, None], n)  # (N, 8b, 4, 4)
        for block, t in zip((self.upc2, self.upc3, self.upc4, self.upc5), (t4, t3, t2, t1)):
            conv, bn, act = block[0]
            x = upsampled_conv(d, conv.weight[:, : d.shape[1]], conv.bias) + t  # conv of cat([up(d), skip])
            d = run_per_step(block[1:], act(batch_norm_per_step(bn, x, n)), n)  # 8x8 -> 16x16 -> 32x32 -> 64x64
        return d.reshape(*lead, *d.shape[1:])  # (..., nc, 64, 64)
