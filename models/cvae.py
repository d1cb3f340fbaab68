"""The action-conditioned stochastic video predictor: SVG (Denton & Fergus 2018) with a fixed prior
N(0, I) (SVG-FP, the course's model) or a learned prior (SVG-LP, `prior="learned"`), plus a learned
embedding of the robot's condition (action + end-effector position), or no condition (`cond_dim=0`).
With `cond_conv` the condition embedding also modulates the decoder's convolutions (models/vgg_64.py:
FiLM or CondConv); with `latent_levels` 2 or 3, spatial latents at 8x8 (and 16x16) join the global z,
inferred top-down in the decoder (NVAE, Vahdat & Kautz 2020; Castrejon et al. 2019); with
`motion` "cdna" or "flow" each frame is a per-pixel mix of `motion_kernels` learned transformations of
the step's input frame and the decoder's image (Finn et al. 2016). The defaults ("none", 1, "none") are
the model above, parameter for parameter.

Two methods, both the recurrence of SVG Sec. 3 read one time step at a time:
  forward  -> training losses: teacher forcing (optional), z from the posterior q(z_t | x_{1:t});
  predict  -> frames: given frames, then each prediction fed back, z from the prior.
models/fast.py computes the same things faster (a batched teacher-forced rollout for training, and an
inference rollout); the training loop and the evaluation use those, tested equal to these.

    python -c "from models import CVAE; m = CVAE(); print(sum(p.numel() for p in m.parameters()))"
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .lstm import gaussian_lstm, kl_divergence, lstm, reparameterize
from .vgg_64 import COND_CONVS, CondConv2d, FiLM, vgg_decoder, vgg_encoder

# Constructor arguments that define the architecture; they are saved in every checkpoint so that
# test.py rebuilds the model without architecture flags.
ARCH_KEYS = ("g_dim", "z_dim", "rnn_size", "predictor_rnn_layers", "posterior_rnn_layers", "cond_dim",
             "cond_embed_dim", "base_channels", "last_frame_skip", "prior", "prior_rnn_layers", "cond_conv",
             "condconv_experts", "latent_levels", "z_spatial_dim", "motion", "motion_kernels", "bn_stats")
PRIORS = ("fixed", "learned")
# BatchNorm's training statistics: per time step over the batch's B frames (SVG: each step's encoder,
# frame-predictor and decoder call is its own batch), or over every frame of the clip at once (B * T),
# which trains teacher-forced only. Inference (running statistics) is the same function either way.
BN_STATS = ("step", "clip")
MOTIONS = ("none", "cdna", "flow")  # the frame as the decoder paints it, or a PixelMotion kind


def init_weights(m):
    """N(0, 0.02) weights for conv/linear layers and N(1, 0.02) BatchNorm scales, zero biases (as SVG).
    CondConv experts are N(0, 0.02) each (with routing weights near 1/2 their mix starts near the plain
    scale); FiLM's map starts at zero, so a new FiLM model computes the unmodulated decoder's function
    (apply visits a FiLM after its Linear)."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, CondConv2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, FiLM):
        nn.init.zeros_(m.proj.weight)
        nn.init.zeros_(m.proj.bias)


def check_track(model, track, frames):
    """CVAE.predict's track argument: None, or (B, M, H, W) maps for a pixel-motion model."""
    if track is None:
        return
    if model.motion is None:
        raise ValueError("track: only a pixel-motion model (--motion cdna or flow) moves maps with its frames")
    if track.dim() != 4 or track.shape[0] != frames.shape[0] or track.shape[-2:] != frames.shape[-2:]:
        raise ValueError(f"track: expected (B, M, H, W) = ({frames.shape[0]}, M, {frames.shape[-2]}, "
                         f"{frames.shape[-1]}), got {tuple(track.shape)}")


def normalise_maps(maps):
    """Maps (..., H, W) -> each divided by its sum (a map the decoder repainted entirely stays 0)."""
    return maps / maps.sum((-2, -1), keepdim=True).clamp_min(1e-12)


class PixelMotion(nn.Module):
    """A pixel-motion output: the step's input frame is moved K ways, and per-pixel masks (a softmax over
    K + 1 channels the decoder outputs) mix those K frames and the decoder's own image (Finn et al. 2016,
    Sec. 3). What moves (the arm, a pushed object) is copied from where it was instead of painted anew.

    kind "cdna": K normalised 5x5 kernels (a softmax over the taps) predicted from the step's code g, each
        applied to the whole frame (CDNA, Finn et al. 2016, Sec. 3.1): shifts of up to 2 pixels.
    kind "flow": K dense flow fields in pixels from the decoder (2K more output channels), each warping the
        frame by bilinear sampling, x'(p) = x(p + f(p)) (as SAVP's flow, Lee et al. 2018): any shift, at a
        cost that does not grow with it (the arm moves 3 pixels per frame in the median, up to 8).
    """
    def __init__(self, kind, g_dim, kernels, size=5, nc=3):
        super().__init__()
        if kind not in MOTIONS[1:] or kernels < 1:
            raise ValueError(f"PixelMotion(kind={kind!r}, kernels={kernels}): expected cdna or flow and kernels >= 1")
        self.kind, self.kernels, self.size, self.nc = kind, kernels, size, nc
        self.proj = nn.Linear(g_dim, kernels * size * size) if kind == "cdna" else None

    @staticmethod
    def extra_channels(kind, kernels):
        """Decoder output channels beyond the image: K + 1 mask logits, and 2K flow channels with "flow"."""
        return {"none": 0, "cdna": kernels + 1, "flow": 3 * kernels + 1}[kind]

    def reset_parameters(self):
        """CDNA: weights N(0, 0.02) and the centre tap's logit at 4, so every kernel starts near the
        identity (0.69 of its weight on the centre): a new model starts by copying its input frame. (A new
        flow is near zero already: the decoder's last layer is initialised N(0, 0.02).)"""
        if self.proj is None:
            return
        nn.init.normal_(self.proj.weight, 0.0, 0.02)
        bias = torch.zeros(self.kernels, self.size * self.size)
        bias[:, self.size * self.size // 2] = 4.0
        with torch.no_grad():
            self.proj.bias.copy_(bias.flatten())

    def forward(self, out, prev, g):
        """out: the decoder's output (N, nc + extra_channels, H, W): the image in [0, 1], K + 1 mask logits,
        then (flow) K flow fields (dx, dy) in pixels; prev: the step's input frame (N, nc, H, W) in [0, 1],
        optionally followed by M maps to move with it (N, nc + M, H, W); g: the step's code (N, g_dim).
        Returns the frame (N, nc, H, W) in [0, 1] (a convex mix), followed by the M maps moved and masked
        as the frame is.

        The maps are how a planner follows a designated pixel (Finn & Levine 2017; Ebert et al. 2017): a
        probability map of where a point of the input frame is goes where the model's motion takes it. The
        decoder's own image contributes nothing to a map (a painted pixel comes from no point of the input),
        so a map loses the mass the decoder repaints; renormalise it to read it as a distribution."""
        K = self.kernels
        moved = self.cdna(prev, g) if self.kind == "cdna" else self.flow(prev, out[:, self.nc + K + 1:])
        masks = torch.softmax(out[:, self.nc: self.nc + K + 1], 1)  # (N, K + 1, H, W) (Finn et al., Eq. 3)
        painted = out[:, None, : self.nc].to(moved.dtype)  # (N, 1, nc, H, W)
        if prev.shape[1] > self.nc:  # zero for the maps moved along
            painted = F.pad(painted, (0, 0, 0, 0, 0, prev.shape[1] - self.nc))
        candidates = torch.cat([moved, painted], 1)  # (N, K + 1, nc [+ M], H, W)
        return (masks[:, :, None] * candidates).sum(1)

    def cdna(self, prev, g):
        """prev (N, C, H, W), g (N, g_dim) -> the K moved frames (N, K, C, H, W)."""
        N, C, H, W = prev.shape
        K, k = self.kernels, self.size
        w = torch.softmax(self.proj(g).view(N, K, k * k), -1)  # (N, K, k*k), each kernel sums to 1 (Eq. 2)
        # Each sample's K kernels on each of its channels in one grouped convolution: the channels as the
        # batch, the samples as the groups. Replicated borders: what moves in from outside is the border.
        x = F.pad(prev.transpose(0, 1), (k // 2,) * 4, mode="replicate")  # (C, N, H + k - 1, W + k - 1)
        y = F.conv2d(x, w.reshape(N * K, 1, k, k).to(x.dtype), groups=N)  # (C, N * K, H, W)
        return y.view(C, N, K, H, W).permute(1, 2, 0, 3, 4)  # (N, K, C, H, W)

    def flow(self, prev, flow):
        """prev (N, C, H, W), flow (N, 2K, H, W) in pixels (dx, dy per field) -> (N, K, C, H, W)."""
        N, _, H, W = prev.shape
        K = self.kernels
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, H, device=prev.device),
                                torch.linspace(-1, 1, W, device=prev.device), indexing="ij")
        base = torch.stack([xs, ys], -1)  # (H, W, 2): grid_sample's (x, y) in [-1, 1], corners aligned
        scale = torch.tensor([2 / (W - 1), 2 / (H - 1)], device=prev.device)  # pixels -> grid units
        f = flow.float().view(N, K, 2, H, W).permute(0, 1, 3, 4, 2)  # (N, K, H, W, 2)
        grid = (base + f * scale).reshape(N * K, H, W, 2)
        src = prev.float()[:, None].expand(N, K, -1, H, W).reshape(N * K, -1, H, W)  # (N * K, C, H, W)
        y = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=True)
        return y.view(N, K, -1, H, W)


class CVAE(nn.Module):
    def __init__(self, g_dim=128, z_dim=64, rnn_size=256, predictor_rnn_layers=2, posterior_rnn_layers=1,
                 cond_dim=7, cond_embed_dim=32, base_channels=64, last_frame_skip=False, prior="fixed",
                 prior_rnn_layers=1, cond_conv="none", condconv_experts=4, latent_levels=1, z_spatial_dim=4,
                 motion="none", motion_kernels=4, bn_stats="step"):
        super().__init__()
        if bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats={bn_stats!r}: expected one of {BN_STATS}")
        if motion not in MOTIONS:
            raise ValueError(f"motion={motion!r}: expected one of {MOTIONS}")
        if prior not in PRIORS:
            raise ValueError(f"prior={prior!r}: expected one of {PRIORS}")
        if cond_conv not in COND_CONVS:
            raise ValueError(f"cond_conv={cond_conv!r}: expected one of {COND_CONVS}")
        if cond_conv != "none" and not cond_dim:
            raise ValueError(f"cond_conv={cond_conv!r} modulates the decoder by the condition, and there is none "
                             f"(cond_dim=0, --cond none): use cond_conv='none'")
        self.g_dim, self.z_dim, self.cond_dim, self.last_frame_skip = g_dim, z_dim, cond_dim, last_frame_skip
        self.bn_stats = bn_stats
        self.latent_levels = latent_levels
        e = cond_embed_dim if cond_dim else 0
        self.encoder = vgg_encoder(g_dim, base_channels)
        # The decoder of step t sees the same embed(cond_{t-1}) as the predictor when cond_conv is not "none",
        # and holds the spatial latent levels (their posteriors, priors and injection) when latent_levels > 1.
        self.decoder = vgg_decoder(g_dim, base_channels, cond_conv=cond_conv, cond_dim=e, experts=condconv_experts,
                                   levels=latent_levels, z_spatial_dim=z_spatial_dim, learned_prior=prior == "learned",
                                   extra_out=PixelMotion.extra_channels(motion, motion_kernels))
        # The pixel-motion output: the decoder then also gives the masks (and the flow fields).
        self.motion = PixelMotion(motion, g_dim, motion_kernels) if motion != "none" else None
        self.cond_embed = nn.Linear(cond_dim, cond_embed_dim) if cond_dim else None
        self.frame_predictor = lstm(g_dim + z_dim + e, g_dim, rnn_size, predictor_rnn_layers)
        self.posterior = gaussian_lstm(g_dim, z_dim, rnn_size, posterior_rnn_layers)
        # SVG-LP's prior p(z_t | x_{1:t-1}): a Gaussian LSTM on the code of the previous frame (Sec. 3.2).
        self.prior = gaussian_lstm(g_dim, z_dim, rnn_size, prior_rnn_layers) if prior == "learned" else None
        # Conditions are not normalised on disk (positions ~0.6, actions ~0.05, commands 0..4);
        # standardising with train-split statistics keeps the embedding well scaled. Saved with the weights.
        self.register_buffer("cond_mean", torch.zeros(cond_dim))
        self.register_buffer("cond_std", torch.ones(cond_dim))
        self.apply(init_weights)
        if self.motion is not None:
            self.motion.reset_parameters()

    @classmethod
    def from_config(cls, cfg):
        """Build from a dict or namespace holding ARCH_KEYS (e.g. the args saved in a checkpoint); keys
        missing from older checkpoints take the constructor's defaults."""
        cfg = cfg if isinstance(cfg, dict) else vars(cfg)
        return cls(**{k: cfg[k] for k in ARCH_KEYS if k in cfg})

    def set_cond_stats(self, mean, std):
        self.cond_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.cond_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6))

    def forward(self, frames, conds, n_past, teacher_forcing=True, noise=None, batched=False):
        """Training losses of a clip (SVG, Sec. 3 and Eq. 1), one time step at a time.

        frames: (B, T, C, H, W) in [0, 1]; conds: (B, T, cond_dim), cond_t = [action_t, endeffector_t]
            (ignored, and may be None, without conditions).
        n_past: frames 0..n_past-1 are given. With teacher_forcing every step's input is the true frame;
            without it, from frame n_past on the input is the previous prediction, re-encoded.
        noise: standard normal (B, T-1, z_dim) for the posterior samples, or a list of that and of each
            spatial level's (B, T-1, zs, r, r) (see noise_shapes); what is not given is drawn.
        batched: compute the same thing with models.fast (forward_batched under teacher forcing, which
            encodes and decodes the whole clip at once; forward_fed_back without): the training loop's
            default; the same losses and gradients, tested.

        Step t = 1..T-1 predicts frame t from [h_{t-1}, z_t, embed(cond_{t-1})]: the condition that acts
        between frames t-1 and t (with cond_conv the same embedding also modulates step t's decoder).
        Returns a dict: pred (B, T-1, C, H, W), frames 1..T-1; mse, the sum over steps of the pixel-mean
        squared error; kld, the sum over steps of KL(q || p) summed over z (and over the spatial levels)
        and averaged over the batch; mse_per_step (T-1,); kl (T-1, z_dim), the global z's KL per step and
        dimension, averaged over the batch; kl_levels (latent_levels,), each level's KL summed over steps
        and dimensions, averaged over the batch, global z first (kld is their sum).

        With bn_stats="clip" a model in training mode normalises over the whole clip (forward_clip).
        """
        clip = self.bn_stats == "clip" and self.training
        if clip and not teacher_forcing:
            raise ValueError("bn_stats='clip' normalises over every frame of the clip at once, which needs them all "
                             "in advance: it trains with teacher forcing only (--tfr 1)")
        if batched:
            from . import fast
            return (fast.forward_batched if teacher_forcing else fast.forward_fed_back)(self, frames, conds, n_past, noise)
        if clip:
            return self.forward_clip(frames, conds, n_past, noise)
        B, T = frames.shape[:2]
        noise, spatial = self.draw_noise(noise, B, T, frames.device)
        c = self.embed_conditions(conds, B, T)  # (B, T-1, E)
        h, skips = self.encoder(frames[:, 0])  # h_0 and the skips of frame 0
        x_in = frames[:, 0]  # the step's input frame, whose code is h
        state_q = state_p = state_f = None
        preds, kls, kls_spatial = [], [], []
        for t in range(1, T):
            h_t, skips_t = self.encoder(frames[:, t])  # the posterior sees the true frame t
            z, mu_q, logvar_q, state_q = self.posterior(h_t, state_q, noise[:, t - 1])  # z_t ~ q(z_t | x_{1:t})
            mu_p, logvar_p, state_p = self.prior_step(h, state_p)  # p(z_t | x_{1:t-1}); N(0, I) when fixed
            g, state_f = self.frame_predictor(torch.cat([h, z, c[:, t - 1]], 1), state_f)
            # (B, C, H, W); the spatial levels' z from their posteriors on the true frame t's features
            x_hat, stats = self.decode(g, skips, c[:, t - 1], skips_t, [n[:, t - 1] for n in spatial], x_in)
            preds.append(x_hat)
            kls.append(kl_divergence(mu_q, logvar_q, mu_p, logvar_p))  # (B, z_dim)
            kls_spatial.append([kl_divergence(*st).sum((1, 2, 3)) for st in stats])  # each level's (B,)
            if teacher_forcing or t < n_past:
                h, skips_in, x_in = h_t, skips_t, frames[:, t]
            else:
                (h, skips_in), x_in = self.encoder(x_hat), x_hat
            # Skips come from the last given frame (SVG), or from every input frame with last_frame_skip.
            if self.last_frame_skip or t < n_past:
                skips = skips_in
        kl_spatial = [torch.stack(k, 1) for k in zip(*kls_spatial)]  # each level's (B, T-1)
        return self.losses(frames, torch.stack(preds, 1), torch.stack(kls, 1), kl_spatial)

    def forward_clip(self, frames, conds, n_past, noise=None):
        """forward under teacher forcing with BatchNorm statistics over the clip (bn_stats="clip"): the
        encoder sees every frame of the clip in one call, and the frame predictor's head and the decoder every
        step in one call, so that each BatchNorm normalises over all B * T frames (B * (T-1) steps) instead of
        each step's B. The recurrent cells step as in forward. Same arguments and result."""
        B, T = frames.shape[:2]
        noise, spatial = self.draw_noise(noise, B, T, frames.device)
        c = self.embed_conditions(conds, B, T)  # (B, T-1, E)
        h, skips = self.encoder(frames.flatten(0, 1))  # (B*T, g), skips (B*T, c, r, r): rows b * T + t
        h, skips = h.view(B, T, -1), [s.view(B, T, *s.shape[1:]) for s in skips]
        state_q = state_p = state_f = None
        hids, kls = [], []
        predictor = self.frame_predictor
        for t in range(1, T):
            z, mu_q, logvar_q, state_q = self.posterior(h[:, t], state_q, noise[:, t - 1])  # q(z_t | x_{1:t})
            mu_p, logvar_p, state_p = self.prior_step(h[:, t - 1], state_p)  # p(z_t | x_{1:t-1})
            hid, state_f = predictor.cell_step(predictor.embed(torch.cat([h[:, t - 1], z, c[:, t - 1]], 1)), state_f)
            hids.append(hid)
            kls.append(kl_divergence(mu_q, logvar_q, mu_p, logvar_p))  # (B, z_dim)
        rows = lambda x: x.flatten(0, 1)  # (B, T-1, ...) -> (B*(T-1), ...), rows b * (T-1) + t - 1
        g = predictor.output(rows(torch.stack(hids, 1)))  # the frame predictor's head on every step at once
        # Step t's skips: from frame t-1 with last_frame_skip, else from the last given frame before it.
        src = [t - 1 if self.last_frame_skip else min(t - 1, n_past - 1) for t in range(1, T)]
        x_hat, stats = self.decode(g, [rows(s[:, src]) for s in skips], rows(c),
                                   [rows(s[:, 1:]) for s in skips], [rows(n) for n in spatial], rows(frames[:, :-1]))
        kl_spatial = [kl_divergence(*st).sum((1, 2, 3)).view(B, T - 1) for st in stats]  # each level's (B, T-1)
        return self.losses(frames, x_hat.view(B, T - 1, *x_hat.shape[1:]), torch.stack(kls, 1), kl_spatial)

    def predict(self, frames, conds, n_past, n_future, noise=None, posterior=False, track=None):
        """Predict frames n_past..n_past+n_future-1 from the given frames 0..n_past-1 (no teacher forcing).

        frames: (B, >= n_past, C, H, W) in [0, 1]; all n_past + n_future frames with posterior=True.
        conds: (B, n_past + n_future, cond_dim), or None without conditions.
        noise: standard normal (B, n_past + n_future - 1, z_dim), or a list of that and of each spatial
            level's (B, n_past + n_future - 1, zs, r, r); what is not given is drawn. Passing it makes a
            prediction reproducible per sequence, whatever the batch.
        posterior: take z_t from the posterior on the true frames at every step (a reconstruction that
            sees the future through z only); otherwise from the prior after the given frames.

        track: (B, M, H, W) maps on the last given frame, each a probability map of where a point is (a
            designated pixel, Finn & Levine 2017), moved with the predicted frames (pixel-motion models
            only, see PixelMotion.forward).

        Through the given frames z comes from the posterior and the learned prior is stepped along
        (SVG-LP's generation). Returns (B, n_future, C, H, W); with track, also the maps at each predicted
        frame (B, n_future, M, H, W), each renormalised to sum 1.
        """
        check_track(self, track, frames)
        B, T, C = frames.shape[0], n_past + n_future, frames.shape[2]
        noise, spatial = self.draw_noise(noise, B, T, frames.device)
        c = self.embed_conditions(conds, B, T)
        h, skips = self.encoder(frames[:, 0])
        x_in = frames[:, 0]
        state_q = state_p = state_f = None
        preds, maps = [], []
        for t in range(1, T):
            mu_p, logvar_p, state_p = self.prior_step(h, state_p)
            if t < n_past or posterior:
                h_t, skips_t = self.encoder(frames[:, t])
                z, _, _, state_q = self.posterior(h_t, state_q, noise[:, t - 1])
            else:
                z = self.sample_prior(mu_p, logvar_p, noise[:, t - 1])
            g, state_f = self.frame_predictor(torch.cat([h, z, c[:, t - 1]], 1), state_f)
            if t < n_past:  # a given frame: the next input is the true one
                h, skips, x_in = h_t, skips_t, frames[:, t]
                continue
            # the spatial levels' z from their posteriors with posterior=True, else from their priors
            targets = skips_t if posterior else None
            if t == n_past and track is not None:
                x_in = torch.cat([x_in, track.to(x_in)], 1)  # (B, C + M, H, W): the maps ride with the frame
            x_hat, _ = self.decode(g, skips, c[:, t - 1], targets, [n[:, t - 1] for n in spatial], x_in)
            preds.append(x_hat[:, :C])
            maps.append(x_hat[:, C:])
            (h, skips_in), x_in = self.encoder(x_hat[:, :C]), x_hat
            if self.last_frame_skip:
                skips = skips_in
        return torch.stack(preds, 1) if track is None else (torch.stack(preds, 1), normalise_maps(torch.stack(maps, 1)))

    def decode(self, g, skips, c, targets=None, noise=(), x_in=None):
        """The decoder of one step: frames (B, C, H, W) and the spatial levels' Gaussians (vgg_decoder.forward;
        an empty list with one level). targets: the true frame's skips (posterior z), or None (prior z);
        x_in: the step's input frame (B, C, H, W), which the pixel-motion output moves (see compose)."""
        if self.latent_levels == 1:
            out, stats = self.decoder(g, skips, c), []
        else:
            out, stats = self.decoder(g, skips, c, targets, noise)
        return self.compose(out, x_in, g), stats

    def compose(self, out, x_in, g):
        """The step's frame from the decoder's output: out itself (SVG), or with motion the mix of x_in, the
        step's input frame, moved by CDNA kernels from g or by flow fields, and the decoder's image (PixelMotion).
        out (..., C [+ K + 1], H, W), x_in (..., C, H, W), g (..., g_dim), any matching leading shape."""
        if self.motion is None:
            return out
        lead = out.shape[:-3]
        y = self.motion(out.reshape(-1, *out.shape[-3:]), x_in.reshape(-1, *x_in.shape[-3:]), g.reshape(-1, g.shape[-1]))
        return y.reshape(*lead, *y.shape[1:])  # (..., C, H, W)

    def noise_shapes(self):
        """One step's noise shape per latent level, global first: [(z_dim,), (zs, 8, 8), (zs, 16, 16)][:levels]."""
        return [(self.z_dim,)] + self.decoder.noise_shapes()

    def draw_noise(self, noise, B, T, device):
        """The noise argument of forward and predict -> the global noise (B, T-1, z_dim) and the list of the
        spatial levels' (B, T-1, zs, r, r). noise: None, the global tensor, or a list [global, level 2, ...];
        levels not given (or None) are drawn, in level order, after the global noise."""
        noise = list(noise) if isinstance(noise, (list, tuple)) else [noise]
        shapes = self.noise_shapes()
        noise += [None] * (len(shapes) - len(noise))
        out = [torch.randn(B, T - 1, *shape, device=device) if n is None else n for n, shape in zip(noise, shapes)]
        return out[0], out[1:]

    def prior_step(self, h_prev, state):
        """Mean and log-variance of p(z_t | x_{1:t-1}) from the previous frame's code, and the prior's new
        state; (None, None, None) for the fixed prior N(0, I)."""
        if self.prior is None:
            return None, None, None
        return self.prior.params(h_prev, state)

    @staticmethod
    def sample_prior(mu, logvar, eps):
        """z_t from the prior for standard normal eps: eps itself for N(0, I), else mu + eps sigma."""
        return eps if mu is None else reparameterize(mu, logvar, eps)

    def embed_conditions(self, conds, B, T):
        """conds (B, T, cond_dim) -> embeddings (B, T-1, E) of cond_0..cond_{T-2}, standardised first (step t
        uses cond_{t-1}); an empty (B, T-1, 0) tensor without conditions, so the predictor's input is [h, z]."""
        if self.cond_embed is None:
            return self.cond_mean.new_zeros(B, T - 1, 0)
        cond = (conds[:, : T - 1].float() - self.cond_mean) / self.cond_std  # (B, T-1, cond_dim)
        return self.cond_embed(cond)

    @staticmethod
    def losses(frames, pred, kl, kl_spatial=()):
        """pred (B, T-1, C, H, W) of frames 1..T-1, kl (B, T-1, z_dim) per sequence, kl_spatial each spatial
        level's KL (B, T-1) summed over its dimensions -> the loss dict of forward. KL = sum over levels."""
        mse_per_step = (pred.float() - frames[:, 1:].float()).pow(2).mean(dim=(0, 2, 3, 4))  # (T-1,)
        kl = kl.float().mean(0)  # (T-1, z_dim)
        levels = torch.stack([kl.sum()] + [k.float().mean(0).sum() for k in kl_spatial])  # (latent_levels,)
        return {"pred": pred, "mse": mse_per_step.sum(), "kld": levels.sum() if kl_spatial else kl.sum(),
                "mse_per_step": mse_per_step, "kl": kl, "kl_levels": levels}
