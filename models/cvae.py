"""The action-conditioned stochastic video predictor: SVG (Denton & Fergus 2018) with a fixed prior
N(0, I) (SVG-FP, the course's model) or a learned prior (SVG-LP, `prior="learned"`), plus a learned
embedding of the robot's condition (action + end-effector position), or no condition (`cond_dim=0`).
With `cond_conv` the condition embedding also modulates the decoder's convolutions (models/vgg_64.py:
FiLM or CondConv); with `latent_levels` 2 or 3, spatial latents at 8x8 (and 16x16) join the global z,
inferred top-down in the decoder (NVAE, Vahdat & Kautz 2020; Castrejon et al. 2019). The defaults
("none", 1) are the model above, parameter for parameter.

Two methods, both the recurrence of SVG Sec. 3 read one time step at a time:
  forward  -> training losses: teacher forcing (optional), z from the posterior q(z_t | x_{1:t});
  predict  -> frames: given frames, then each prediction fed back, z from the prior.
models/fast.py computes the same things faster (a batched teacher-forced rollout for training, and an
inference rollout); the training loop and the evaluation use those, tested equal to these.

    python -c "from models import CVAE; m = CVAE(); print(sum(p.numel() for p in m.parameters()))"
"""
import torch
import torch.nn as nn

from .lstm import gaussian_lstm, kl_divergence, lstm, reparameterize
from .vgg_64 import COND_CONVS, CondConv2d, FiLM, vgg_decoder, vgg_encoder

# Constructor arguments that define the architecture; they are saved in every checkpoint so that
# test.py rebuilds the model without architecture flags.
ARCH_KEYS = ("g_dim", "z_dim", "rnn_size", "predictor_rnn_layers", "posterior_rnn_layers", "cond_dim",
             "cond_embed_dim", "base_channels", "last_frame_skip", "prior", "prior_rnn_layers", "cond_conv",
             "condconv_experts", "latent_levels", "z_spatial_dim")
PRIORS = ("fixed", "learned")


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


class CVAE(nn.Module):
    def __init__(self, g_dim=128, z_dim=64, rnn_size=256, predictor_rnn_layers=2, posterior_rnn_layers=1,
                 cond_dim=7, cond_embed_dim=32, base_channels=64, last_frame_skip=False, prior="fixed",
                 prior_rnn_layers=1, cond_conv="none", condconv_experts=4, latent_levels=1, z_spatial_dim=4):
        super().__init__()
        if prior not in PRIORS:
            raise ValueError(f"prior={prior!r}: expected one of {PRIORS}")
        if cond_conv not in COND_CONVS:
            raise ValueError(f"cond_conv={cond_conv!r}: expected one of {COND_CONVS}")
        if cond_conv != "none" and not cond_dim:
            raise ValueError(f"cond_conv={cond_conv!r} modulates the decoder by the condition, and there is none "
                             f"(cond_dim=0, --cond none): use cond_conv='none'")
        self.g_dim, self.z_dim, self.cond_dim, self.last_frame_skip = g_dim, z_dim, cond_dim, last_frame_skip
        self.latent_levels = latent_levels
        e = cond_embed_dim if cond_dim else 0
        self.encoder = vgg_encoder(g_dim, base_channels)
        # The decoder of step t sees the same embed(cond_{t-1}) as the predictor when cond_conv is not "none",
        # and holds the spatial latent levels (their posteriors, priors and injection) when latent_levels > 1.
        self.decoder = vgg_decoder(g_dim, base_channels, cond_conv=cond_conv, cond_dim=e, experts=condconv_experts,
                                   levels=latent_levels, z_spatial_dim=z_spatial_dim, learned_prior=prior == "learned")
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
        """
        if batched:
            from . import fast
            return (fast.forward_batched if teacher_forcing else fast.forward_fed_back)(self, frames, conds, n_past, noise)
        B, T = frames.shape[:2]
        noise, spatial = self.draw_noise(noise, B, T, frames.device)
        c = self.embed_conditions(conds, B, T)  # (B, T-1, E)
        h, skips = self.encoder(frames[:, 0])  # h_0 and the skips of frame 0
        state_q = state_p = state_f = None
        preds, kls, kls_spatial = [], [], []
        for t in range(1, T):
            h_t, skips_t = self.encoder(frames[:, t])  # the posterior sees the true frame t
            z, mu_q, logvar_q, state_q = self.posterior(h_t, state_q, noise[:, t - 1])  # z_t ~ q(z_t | x_{1:t})
            mu_p, logvar_p, state_p = self.prior_step(h, state_p)  # p(z_t | x_{1:t-1}); N(0, I) when fixed
            g, state_f = self.frame_predictor(torch.cat([h, z, c[:, t - 1]], 1), state_f)
            # (B, C, H, W); the spatial levels' z from their posteriors on the true frame t's features
            x_hat, stats = self.decode(g, skips, c[:, t - 1], skips_t, [n[:, t - 1] for n in spatial])
            preds.append(x_hat)
            kls.append(kl_divergence(mu_q, logvar_q, mu_p, logvar_p))  # (B, z_dim)
            kls_spatial.append([kl_divergence(*st).sum((1, 2, 3)) for st in stats])  # each level's (B,)
            if teacher_forcing or t < n_past:
                h, skips_in = h_t, skips_t
            else:
                h, skips_in = self.encoder(x_hat)
            # Skips come from the last given frame (SVG), or from every input frame with last_frame_skip.
            if self.last_frame_skip or t < n_past:
                skips = skips_in
        kl_spatial = [torch.stack(k, 1) for k in zip(*kls_spatial)]  # each level's (B, T-1)
        return self.losses(frames, torch.stack(preds, 1), torch.stack(kls, 1), kl_spatial)

    def predict(self, frames, conds, n_past, n_future, noise=None, posterior=False):
        """Predict frames n_past..n_past+n_future-1 from the given frames 0..n_past-1 (no teacher forcing).

        frames: (B, >= n_past, C, H, W) in [0, 1]; all n_past + n_future frames with posterior=True.
        conds: (B, n_past + n_future, cond_dim), or None without conditions.
        noise: standard normal (B, n_past + n_future - 1, z_dim), or a list of that and of each spatial
            level's (B, n_past + n_future - 1, zs, r, r); what is not given is drawn. Passing it makes a
            prediction reproducible per sequence, whatever the batch.
        posterior: take z_t from the posterior on the true frames at every step (a reconstruction that
            sees the future through z only); otherwise from the prior after the given frames.

        Through the given frames z comes from the posterior and the learned prior is stepped along
        (SVG-LP's generation). Returns (B, n_future, C, H, W).
        """
        B, T = frames.shape[0], n_past + n_future
        noise, spatial = self.draw_noise(noise, B, T, frames.device)
        c = self.embed_conditions(conds, B, T)
        h, skips = self.encoder(frames[:, 0])
        state_q = state_p = state_f = None
        preds = []
        for t in range(1, T):
            mu_p, logvar_p, state_p = self.prior_step(h, state_p)
            if t < n_past or posterior:
                h_t, skips_t = self.encoder(frames[:, t])
                z, _, _, state_q = self.posterior(h_t, state_q, noise[:, t - 1])
            else:
                z = self.sample_prior(mu_p, logvar_p, noise[:, t - 1])
            g, state_f = self.frame_predictor(torch.cat([h, z, c[:, t - 1]], 1), state_f)
            if t < n_past:  # a given frame: the next input is the true one
                h, skips = h_t, skips_t
                continue
            # the spatial levels' z from their posteriors with posterior=True, else from their priors
            targets = skips_t if posterior else None
            x_hat, _ = self.decode(g, skips, c[:, t - 1], targets, [n[:, t - 1] for n in spatial])
            preds.append(x_hat)
            h, skips_in = self.encoder(x_hat)
            if self.last_frame_skip:
                skips = skips_in
        return torch.stack(preds, 1)

    def decode(self, g, skips, c, targets=None, noise=()):
        """The decoder of one step: frames (B, C, H, W) and the spatial levels' Gaussians (vgg_decoder.forward;
        an empty list with one level). targets: the true frame's skips (posterior z), or None (prior z)."""
        if self.latent_levels == 1:
            return self.decoder(g, skips, c), []
        return self.decoder(g, skips, c, targets, noise)

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
