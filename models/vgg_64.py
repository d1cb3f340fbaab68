"""VGG-style 64x64 frame encoder and decoder with skip connections (SVG, Denton & Fergus 2018, App. A).

The encoder maps one frame to a g_dim code plus four intermediate feature maps; the decoder mirrors it,
upsamples, and concatenates those maps (the "skips") at matching resolutions. This is the plain form,
one frame per sequence per call; models/fast.py computes the same maps for whole clips.

Two optional additions to the decoder, both off by default (the decoder is then SVG's, parameter for
parameter):
  cond_conv   the condition embedding of the step modulates the decoder's convolutions: "film" scales
              and shifts every vgg_layer's normalised channels (FiLM, Perez et al. 2018), "condconv" gives
              every vgg_layer per-example kernels mixed from K experts (CondConv, Yang et al. 2019).
  levels      spatial latents at 8x8 (and 16x16) below the global z, inferred top-down (NVAE, Vahdat &
              Kautz 2020, Sec. 3; Castrejon et al. 2019): each level has a posterior head on the true
              frame's encoder features and the decoder's top-down features at that resolution, a prior
              (N(0, I), or a head on the top-down features alone) and enters the decoder there.
  extra_out   extra output channels, returned unsquashed after the image's nc channels (the image alone
              stays in [0, 1]): the mask logits (and flow fields) of models/cvae.py's pixel-motion output.
"""
import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F


from .lstm import reparameterize

COND_CONVS = ("none", "film", "condconv")


class vgg_layer(nn.Sequential):
    """Conv3x3 -> BatchNorm -> LeakyReLU(0.2), the unit every block is made of; with experts > 0 the
    convolution is a CondConv2d over cond_dim-sized condition embeddings."""

    def __init__(self, nin, nout, experts=0, cond_dim=0):
        conv = CondConv2d(nin, nout, experts, cond_dim) if experts else nn.Conv2d(nin, nout, 3, 1, 1)
        super().__init__(conv, nn.BatchNorm2d(nout), nn.LeakyReLU(0.2, inplace=True))

    def forward(self, x, c=None, film=None, add=None):
        """x: (N, nin, H, W); c: condition embeddings (N, cond_dim) for CondConv2d and film, else unused;
        film: a FiLM applied after the BatchNorm, or None; add: a map (N, nout, H, W) added to the
        convolution's output (a spatial latent's share, see vgg_decoder), or None. Returns (N, nout, H, W)."""
        conv, bn, act = self
        x = conv(x, c) if isinstance(conv, CondConv2d) else conv(x)
        x = bn(x if add is None else x + add)
        return act(x if film is None else film(x, c))


class FiLM(nn.Module):
    """Feature-wise linear modulation (Perez et al. 2018, Eq. 1-2): x -> x * (1 + gamma(c)) + beta(c), per
    channel, gamma and beta a linear map of the condition embedding c. The map starts at zero (see
    models.cvae.init_weights), so a new model computes what the unmodulated one does."""

    def __init__(self, cond_dim, channels):
        super().__init__()
        self.proj = nn.Linear(cond_dim, 2 * channels)

    def forward(self, x, c):
        """x: (N, C, H, W); c: (N, cond_dim) -> (N, C, H, W)."""
        gamma, beta = self.proj(c)[:, :, None, None].chunk(2, 1)  # each (N, C, 1, 1)
        return x * (1 + gamma) + beta  # "1 +": the residual form, so gamma = 0 is the identity


class CondConv2d(nn.Module):
    """A 3x3 convolution (padding 1) whose kernel is a per-example mix of K expert kernels (CondConv, Yang et
    al. 2019, Eq. 1-2): W(c) = sum_k r_k(c) W_k with routing weights r(c) = sigmoid(Linear(c)). The bias is
    shared. weight: (K, nout, nin, 3, 3)."""

    def __init__(self, nin, nout, experts, cond_dim):
        super().__init__()
        self.in_channels, self.out_channels, self.experts = nin, nout, experts
        self.weight = nn.Parameter(torch.empty(experts, nout, nin, 3, 3))
        self.bias = nn.Parameter(torch.zeros(nout))
        self.route = nn.Linear(cond_dim, experts)

    def routing(self, c):
        """c: (N, cond_dim) -> routing weights r (N, K) in (0, 1) (Yang et al. 2019, Eq. 2, with c for the
        pooled input)."""
        return torch.sigmoid(self.route(c))

    def forward(self, x, c):
        """x: (N, nin, H, W); c: (N, cond_dim) -> (N, nout, H, W)."""
        return condconv2d(x, self.weight, self.bias, self.routing(c))


def condconv2d(x, weight, bias, r):
    """F.conv2d(x[n], sum_k r[n, k] weight[k], bias, padding=1) for every example n, as one grouped
    convolution: the batch is folded into the channels, (1, N * nin, H, W), and example n's mixed kernel
    is group n. x: (N, nin, H, W); weight: (K, nout, nin, 3, 3); r: (N, K). Returns (N, nout, H, W)."""
    N, nin, H, W = x.shape
    nout = weight.shape[1]
    kernels = (r @ weight.flatten(1)).view(N * nout, nin, 3, 3)  # W(c_n) = sum_k r_nk W_k, one GEMM
    y = F.conv2d(x.reshape(1, N * nin, H, W), kernels, None, padding=1, groups=N).view(N, nout, H, W)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


class SigmoidFirst(nn.Module):
    """Sigmoid on the first n channels of (N, C, H, W), the others passed through."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def forward(self, x):
        return torch.cat([torch.sigmoid(x[:, : self.n]), x[:, self.n:]], 1)


def level_resolutions(levels):
    """Resolutions of the spatial latent levels below the global z, coarsest first: () for 1 level, (8,)
    for 2, (8, 16) for 3. Level i sits at decoder block i."""
    return (8, 16)[: levels - 1]


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
        """x: one frame per sequence, (B, C, 64, 64) in [0, 1] (e.g. frames[:, t]).

        Returns the code h (B, dim) in (-1, 1) and the skips [(B, b, 64, 64), (B, 2b, 32, 32),
        (B, 4b, 16, 16), (B, 8b, 8, 8)].
        """
        h1 = self.c1(x)
        h2 = self.c2(F.max_pool2d(h1, 2))
        h3 = self.c3(F.max_pool2d(h2, 2))
        h4 = self.c4(F.max_pool2d(h3, 2))
        h5 = self.c5(F.max_pool2d(h4, 2))  # (B, dim, 1, 1)
        return h5.flatten(1), [h1, h2, h3, h4]


class vgg_decoder(nn.Module):
    def __init__(self, dim, base_channels=64, nc=3, cond_conv="none", cond_dim=0, experts=4, levels=1,
                 z_spatial_dim=4, learned_prior=False, extra_out=0):
        super().__init__()
        if cond_conv not in COND_CONVS:
            raise ValueError(f"cond_conv={cond_conv!r}: expected one of {COND_CONVS}")
        if cond_conv != "none" and not cond_dim:
            raise ValueError(f"cond_conv={cond_conv!r} modulates the decoder by the condition: it needs cond_dim > 0")
        if levels not in (1, 2, 3):
            raise ValueError(f"levels={levels}: expected 1, 2 or 3")
        b = base_channels
        self.dim, self.cond_conv, self.levels, self.z_spatial_dim = dim, cond_conv, levels, z_spatial_dim
        layer = lambda nin, nout: vgg_layer(nin, nout, experts if cond_conv == "condconv" else 0, cond_dim)
        self.upc1 = nn.Sequential(nn.ConvTranspose2d(dim, 8 * b, 4, 1, 0), nn.BatchNorm2d(8 * b),
                                  nn.LeakyReLU(0.2, inplace=True))  # 1x1 -> 4x4
        self.upc2 = nn.Sequential(layer(16 * b, 8 * b), layer(8 * b, 8 * b), layer(8 * b, 4 * b))  # 8x8
        self.upc3 = nn.Sequential(layer(8 * b, 4 * b), layer(4 * b, 4 * b), layer(4 * b, 2 * b))  # 16x16
        self.upc4 = nn.Sequential(layer(4 * b, 2 * b), layer(2 * b, b))  # 32x32
        # 64x64; with extra_out the sigmoid covers the image's channels only (masks and flows stay unsquashed)
        self.upc5 = nn.Sequential(layer(2 * b, b), nn.ConvTranspose2d(b, nc + extra_out, 3, 1, 1),
                                  SigmoidFirst(nc) if extra_out else nn.Sigmoid())
        # FiLM on the decoder only: the encoder also encodes the posterior's target frames, whose code must
        # not depend on the action; and the decoder is where the condition should show in the picture.
        self.film = nn.ModuleList(
            nn.ModuleList(FiLM(cond_dim, m[0].out_channels) for m in block if isinstance(m, vgg_layer))
            for block in self.blocks()) if cond_conv == "film" else None
        if levels > 1:
            # Level i (resolution r_i) of the top-down hierarchy sits at decoder block i; its top-down
            # features are the block's upsampled input u_i (8b channels at 8x8, 4b at 16x16), which depend
            # on the past, the global z and the levels above only; the true frame's encoder skip at r_i has
            # as many channels (Castrejon et al. 2019, Sec. 3; NVAE's top-down inference, Sec. 3).
            ch = [8 * b, 4 * b][: levels - 1]
            head = lambda cin, cmid: nn.Sequential(nn.Conv2d(cin, cmid, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
                                                   nn.Conv2d(cmid, 2 * z_spatial_dim, 3, 1, 1))  # -> mu, logvar
            self.posterior_heads = nn.ModuleList(head(2 * c, c) for c in ch)  # q(z_i | x_t, u_i)
            self.prior_heads = nn.ModuleList(head(c, c) for c in ch) if learned_prior else None  # p(z_i | u_i)
            # z_i enters block i's first convolution as extra input channels: conv(cat([u, skip, z])) =
            # conv_u(u) + conv_skip(skip) + conv_z(z), so conv_z is a separate 3x3 convolution added to the
            # block's (unchanged) first convolution, before its BatchNorm.
            self.z_inject = nn.ModuleList(nn.Conv2d(z_spatial_dim, blk[0][0].out_channels, 3, 1, 1, bias=False)
                                          for blk in self.blocks()[: levels - 1])

    def blocks(self):
        """The four upsampling blocks, coarsest first; block i takes cat([upsampled, skips[-1 - i]])."""
        return self.upc2, self.upc3, self.upc4, self.upc5

    def noise_shapes(self):
        """Shapes of one step's standard normal noise for each spatial level, coarsest first: [(zs, 8, 8), ...]."""
        return [(self.z_spatial_dim, r, r) for r in level_resolutions(self.levels)]

    def latent(self, i, u, target=None, eps=None):
        """Level i's z from the top-down features u (N, c, r, r): from the posterior when target (the true
        frame's encoder skip at r, (N, c, r, r)) is given, else from the prior, for standard normal eps
        (N, zs, r, r). Returns z and (mu_q, logvar_q, mu_p, logvar_p), the posterior's None without a
        target, the prior's None for N(0, I)."""
        mu_p = logvar_p = mu_q = logvar_q = None
        if self.prior_heads is not None:
            mu_p, logvar_p = self.prior_heads[i](u).chunk(2, 1)
        if target is not None:
            mu_q, logvar_q = self.posterior_heads[i](torch.cat([target, u], 1)).chunk(2, 1)
            z = reparameterize(mu_q, logvar_q, eps)
        else:
            z = eps if mu_p is None else reparameterize(mu_p, logvar_p, eps)
        return z, (mu_q, logvar_q, mu_p, logvar_p)

    def forward(self, g, skips, c=None, targets=None, noise=None):
        """g: codes (B, dim); skips: the encoder's four maps of the skip frame (finest first); c: the step's
        condition embedding (B, cond_dim), used with cond_conv. With levels > 1: targets, the encoder's
        four maps of the true frame (z from the posterior) or None (z from the prior), and noise, standard
        normal [(B, zs, r, r) per spatial level], coarsest first.

        Returns frames (B, C, 64, 64) in [0, 1] (with extra_out, (B, C + extra_out, 64, 64): the extra
        channels unsquashed); with levels > 1 also a list of each spatial level's
        (mu_q, logvar_q, mu_p, logvar_p), each (B, zs, r, r) or None (see latent).
        """
        d = self.upc1(g[:, :, None, None])  # (B, 8b, 4, 4)
        stats = []
        for i, (block, skip) in enumerate(zip(self.blocks(), reversed(skips))):  # 8x8, 16x16, 32x32, 64x64
            u = F.interpolate(d, scale_factor=2, mode="nearest")  # the top-down features at this resolution
            add = None
            if i < self.levels - 1:  # level i's z, sampled top-down, enters the block's first convolution
                z, st = self.latent(i, u, None if targets is None else targets[-1 - i], noise[i])
                stats.append(st)
                add = self.z_inject[i](z)
            d = torch.cat([u, skip], 1)
            films = iter(self.film[i]) if self.film is not None else itertools.repeat(None)
            for j, layer in enumerate(block):
                d = layer(d, c, next(films), add if j == 0 else None) if isinstance(layer, vgg_layer) else layer(d)
        return (d, stats) if self.levels > 1 else d
