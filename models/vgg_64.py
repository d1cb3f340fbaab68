"""VGG-style 64x64 frame encoder and decoder with skip connections (SVG, Denton & Fergus 2018, App. A).

The encoder maps one frame to a g_dim code plus four intermediate feature maps; the decoder mirrors it,
upsamples, and concatenates those maps (the "skips") at matching resolutions. This is the plain form,
one frame per sequence per call; models/fast.py computes the same maps for whole clips.

    python -c "from models.vgg_64 import vgg_encoder; print(vgg_encoder(128))"
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class vgg_layer(nn.Sequential):
    """Conv3x3 -> BatchNorm -> LeakyReLU(0.2), the unit every block is made of."""

    def __init__(self, nin, nout):
        super().__init__(nn.Conv2d(nin, nout, 3, 1, 1), nn.BatchNorm2d(nout), nn.LeakyReLU(0.2, inplace=True))


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
    def __init__(self, dim, base_channels=64, nc=3):
        super().__init__()
        b = base_channels
        self.dim = dim
        self.upc1 = nn.Sequential(nn.ConvTranspose2d(dim, 8 * b, 4, 1, 0), nn.BatchNorm2d(8 * b),
                                  nn.LeakyReLU(0.2, inplace=True))  # 1x1 -> 4x4
        self.upc2 = nn.Sequential(vgg_layer(16 * b, 8 * b), vgg_layer(8 * b, 8 * b), vgg_layer(8 * b, 4 * b))  # 8x8
        self.upc3 = nn.Sequential(vgg_layer(8 * b, 4 * b), vgg_layer(4 * b, 4 * b), vgg_layer(4 * b, 2 * b))  # 16x16
        self.upc4 = nn.Sequential(vgg_layer(4 * b, 2 * b), vgg_layer(2 * b, b))  # 32x32
        self.upc5 = nn.Sequential(vgg_layer(2 * b, b), nn.ConvTranspose2d(b, nc, 3, 1, 1), nn.Sigmoid())  # 64x64

    def blocks(self):
        """The four upsampling blocks, coarsest first; block i takes cat([upsampled, skips[-1 - i]])."""
        return self.upc2, self.upc3, self.upc4, self.upc5

    def forward(self, g, skips):
        """g: codes (B, dim); skips: the encoder's four maps of the skip frame (finest first).

        Returns frames (B, C, 64, 64) in [0, 1].
        """
        d = self.upc1(g[:, :, None, None])  # (B, 8b, 4, 4)
        for block, skip in zip(self.blocks(), reversed(skips)):  # 8x8, 16x16, 32x32, 64x64
            d = block(torch.cat([F.interpolate(d, scale_factor=2, mode="nearest"), skip], 1))
        return d
