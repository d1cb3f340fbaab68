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


# Inference convolutions through Winograd algorithms where that is faster (see conv3x3).
# Set to False for the direct algorithm everywhere.
WINOGRAD = True


def conv3x3(x, weight, bias=None, transformed=None):
    """F.conv2d(x, weight, bias, padding=1) for 3x3 kernels, with faster algorithms for CPU inference.

    Without autograd, on fp32 CPU tensors in NCHW layout and outside autocast, the layers where it pays
    (_algorithm) use a Winograd convolution (Lavin & Gray 2016), which needs several times fewer
    multiplications than the direct algorithm for 3x3 kernels: NNPACK's F(6x6, 3x3) on maps of 16x16
    and larger, our F(4x4, 3x3) (winograd_f4) on 8x8 maps, where NNPACK's 8x8 tiles would cover a
    12x12 area. 1.2-2.2x per layer at the full width. The rounding differs from the direct algorithm's
    (~1e-5 relative per layer, tested). Everything else (training, CUDA, channels-last, reduced
    precision, the narrow demo widths) is F.conv2d unchanged.

    transformed: optional callable returning winograd_f4_weight(weight), for callers that keep it.
    """
    if (WINOGRAD and not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and x.dim() == 4 and not x.is_contiguous(memory_format=torch.channels_last)
            and not torch.is_autocast_enabled("cpu")):
        algorithm = _algorithm(x.shape[1], *x.shape[-2:])
        if algorithm == "f4":
            return winograd_f4(x, transformed() if transformed else winograd_f4_weight(weight), bias)
        if algorithm == "nnpack":
            return torch._nnpack_spatial_convolution(x.contiguous(), weight.contiguous(), bias, [1, 1])
    return F.conv2d(x, weight, bias, padding=1)


class Conv3x3(nn.Conv2d):
    """nn.Conv2d(nin, nout, 3, 1, 1) computed by conv3x3.

    A frozen layer (weight.requires_grad False, as in models.norm.fold_batch_norm's inference copies)
    keeps the Winograd transform of its weight between calls, recomputed if the weight is replaced or
    modified in place (identity and version counter); a trainable one recomputes it at each call.
    """

    def __init__(self, nin, nout):
        super().__init__(nin, nout, 3, 1, 1)
        self._f4 = None  # (weight, weight._version, winograd_f4_weight(weight))

    def forward(self, x):
        return conv3x3(x, self.weight, self.bias, self._f4_weight)

    def _f4_weight(self):
        w = self.weight
        if w.requires_grad:
            return winograd_f4_weight(w)
        if self._f4 is None or self._f4[0] is not w or self._f4[1] != w._version:
            self._f4 = (w, w._version, winograd_f4_weight(w))
        return self._f4[2]


def _algorithm(c_in, h, w):
    """The 3x3 convolution algorithm measured fastest on a 2-core AVX2 CPU at evaluation batch sizes:
    "f4" for at least 256 input channels on 8x8 maps (1.7-1.8x faster than NNPACK there), "nnpack" for
    at least 64 on 32x32 maps and larger or 128 on 16x16 (our F(4x4) loses there: its transforms are
    memory-bound torch ops), "direct" otherwise. The choice depends on the layer only, never on the
    batch, so a sequence's prediction does not depend on the batch it is in."""
    if c_in >= 256 and h == w == 8:
        return "f4"
    size = min(h, w)
    if ((c_in >= 64 and size >= 32) or (c_in >= 128 and size >= 16)) and _nnpack_available():
        return "nnpack"
    return "direct"


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
        h2 = run_per_step(self.c2, max_pool2x2(h1), n)
        h3 = run_per_step(self.c3, max_pool2x2(h2), n)
        h4 = run_per_step(self.c4, max_pool2x2(h3), n)
        h5 = run_per_step(self.c5, max_pool2x2(h4), n)  # (N, dim, 1, 1)
        skips = [s.reshape(*lead, *s.shape[1:]) for s in (h1, h2, h3, h4)]
        return h5.reshape(*lead, self.dim), skips


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
    kernel's taps (_UP_TAPS), so it costs 16 instead of 36 multiply-adds per input pixel and channel pair
    and writes the interleaved output directly; same parameters, same result up to rounding (tested
    against the upsample-then-convolve form).

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
            x = upsampled_conv(d, conv.weight[:, : d.shape[1]], conv.bias).add_(t)  # conv of cat([up(d), skip])
            d = run_per_step(block[1:], act(batch_norm_per_step(bn, x, n)), n)  # 8x8 -> 16x16 -> 32x32 -> 64x64
        return d.reshape(*lead, *d.shape[1:])  # (..., nc, 64, 64)
