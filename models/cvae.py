"""The action-conditioned stochastic video predictor: SVG with a fixed prior (Denton & Fergus 2018)
plus a learned embedding of the robot's condition (action + end-effector position).

One module, one rollout. `CVAE.forward` is used by training (teacher forcing, posterior z), by
validation and testing (no teacher forcing, prior z after the given frames) and by the GIFs, so the
numbers mean the same thing everywhere.

    python -c "from models import CVAE; m = CVAE(); print(sum(p.numel() for p in m.parameters()))"
"""
import torch
import torch.nn as nn

from .lstm import gaussian_lstm, lstm
from .vgg_64 import vgg_decoder, vgg_encoder

# Constructor arguments that define the architecture; they are saved in every checkpoint so that
# test.py rebuilds the model without architecture flags.
ARCH_KEYS = ("g_dim", "z_dim", "rnn_size", "predictor_rnn_layers", "posterior_rnn_layers", "cond_dim",
             "cond_embed_dim", "base_channels", "last_frame_skip")


def kl_standard_normal(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the last (z) dimension (Kingma & Welling 2014, App. B)."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)


def init_weights(m):
    """N(0, 0.02) weights for conv/linear layers and N(1, 0.02) BatchNorm scales, zero biases (as SVG)."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class CVAE(nn.Module):
    def __init__(self, g_dim=128, z_dim=64, rnn_size=256, predictor_rnn_layers=2, posterior_rnn_layers=1,
                 cond_dim=7, cond_embed_dim=32, base_channels=64, last_frame_skip=False):
        super().__init__()
        self.g_dim, self.z_dim, self.last_frame_skip = g_dim, z_dim, last_frame_skip
        self.encoder = vgg_encoder(g_dim, base_channels)
        self.decoder = vgg_decoder(g_dim, base_channels)
        self.cond_embed = nn.Linear(cond_dim, cond_embed_dim)
        self.frame_predictor = lstm(g_dim + z_dim + cond_embed_dim, g_dim, rnn_size, predictor_rnn_layers)
        self.posterior = gaussian_lstm(g_dim, z_dim, rnn_size, posterior_rnn_layers)
        # Conditions are not normalised on disk (positions ~0.6, actions ~0.05, commands 0..4);
        # standardising with train-split statistics keeps the embedding well scaled. Saved with the weights.
        self.register_buffer("cond_mean", torch.zeros(cond_dim))
        self.register_buffer("cond_std", torch.ones(cond_dim))
        self.apply(init_weights)

    @classmethod
    def from_config(cls, cfg):
        """Build from a dict or namespace holding ARCH_KEYS (e.g. the args saved in a checkpoint)."""
        get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
        return cls(**{k: get(k) for k in ARCH_KEYS})

    def set_cond_stats(self, mean, std):
        self.cond_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.cond_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6))

    def forward(self, frames, conds, n_past, teacher_forcing=True, prior=False, noise=None, batched=True,
                decode_from=1):
        """Predict frames 1..T-1 of a clip, one step at a time (SVG, Sec. 3).

        frames: (B, T, C, H, W) in [0, 1]; conds: (B, T, cond_dim), cond_t = [action_t, endeffector_t].
        n_past: frames 0..n_past-1 are given; later inputs are ground truth only with teacher_forcing,
            otherwise the previous prediction (re-encoded).
        prior: draw z_t ~ N(0, I) for steps t >= n_past (evaluation); otherwise z_t ~ q(z_t | x_{1:t}).
        noise: standard normal (B, T-1, z_dim) used for every z (posterior reparameterisation or prior
            sample); passing it makes a rollout reproducible per sequence, whatever the batch.
        batched: encode all input frames and decode all steps in single calls when teacher forcing
            makes the inputs known in advance; only the LSTMs step through time. The same computation
            as batched=False in training too: BatchNorm takes its statistics per step (models/norm.py).
        decode_from: the first frame to predict, in [1, n_past]. The steps before it still run the LSTMs,
            but their frames are given, so evaluation (decode_from=n_past) skips decoding them.

        Step t takes [h_{t-1}, z_t, embed(cond_{t-1})]: the condition that acts between frames t-1 and t.
        Returns a dict: pred (B, T-decode_from, C, H, W) for frames decode_from..T-1; mse, the sum over
        steps of the per-step pixel-mean squared error; kld, the sum over posterior steps of the KL summed
        over z and averaged over the batch; and their per-step values mse_per_step (T-decode_from,), kld_per_step.
        """
        B, T = frames.shape[:2]
        steps = T - 1
        if not 1 <= n_past < T:
            raise ValueError(f"n_past={n_past} must be in [1, {T - 1}] for a clip of {T} frames")
        if not 1 <= decode_from <= n_past:
            raise ValueError(f"decode_from={decode_from} must be in [1, n_past={n_past}]")
        n_post = n_past - 1 if prior else steps  # steps t = 1..n_post use the posterior
        if noise is None:
            noise = torch.randn(B, steps, self.z_dim, device=frames.device)
        c = self.embed_conditions(conds)  # (B, T-1, E)

        # Skip features for step t come from frame min(t-1, n_past-1): the last given frame once the
        # prediction starts (SVG's code keeps x_{n_past-2} through its `i < n_past` test; we follow the
        # paper's "last ground truth frame"), or from the step's own input with last_frame_skip.
        if batched and teacher_forcing:
            h_all, skips_all = self.encoder(frames[:, : 1 + max(n_post, steps - 1)])  # (B, T', g)
            z, mu, logvar = self._latents(h_all[:, 1: 1 + n_post], noise, n_post)
            g_pred, _ = self.frame_predictor(torch.cat([h_all[:, :steps], z, c], -1))  # (B, T-1, g)
            n_skip = steps if self.last_frame_skip else min(n_past, steps)  # distinct skip frames
            # Skip terms once per distinct skip frame; the steps after them all reuse the last one (an
            # expand, whose gradient is a sum, not a gather).
            terms = self.decoder.skip_terms([s[:, :n_skip] for s in skips_all])  # each (B, n_skip, c, r, r)
            terms = [torch.cat([t, t[:, -1:].expand(-1, steps - n_skip, -1, -1, -1)], 1) for t in terms]  # (B, T-1, ...)
            first = decode_from - 1  # step index of frame decode_from
            pred = self.decoder(g_pred[:, first:], [t[:, first:] for t in terms])  # (B, T-decode_from, C, H, W)
        else:
            # The given frames and the posterior's targets are all ground truth, so they can still be
            # encoded in one call (each frame once); only the fed-back predictions are encoded per step.
            n_gt = max(n_past, n_post + 1) if batched and not teacher_forcing else 0
            if n_gt:
                h_gt, skips_gt = self.encoder(frames[:, :n_gt])  # (B, n_gt, g), skips (B, n_gt, ...)
            preds, mus, logvars = [], [], []
            state_p = state_q = terms = target = None
            for t in range(1, T):
                given = teacher_forcing or t - 1 < n_past
                if given and t - 1 < n_gt:
                    h, sk = h_gt[:, t - 1], [s[:, t - 1] for s in skips_gt]  # (B, g)
                elif given and target is not None:
                    h, sk = target  # frame t-1, already encoded as the previous step's posterior target
                else:
                    h, sk = self.encoder(frames[:, t - 1] if given else preds[-1])  # (B, g)
                if self.last_frame_skip or t - 1 < n_past:
                    terms = self.decoder.skip_terms(sk)  # reused by every step until the skip frame changes
                target = None
                if t <= n_post:
                    if n_gt:
                        ht = h_gt[:, t]  # (B, g)
                    else:
                        target = self.encoder(frames[:, t])  # each frame is encoded once per rollout
                        ht = target[0]
                    z_t, mu_t, logvar_t, state_q = self.posterior(ht[:, None], state_q, noise[:, t - 1: t])
                    mus.append(mu_t)
                    logvars.append(logvar_t)
                else:
                    z_t = noise[:, t - 1: t]
                g_t, state_p = self.frame_predictor(torch.cat([h[:, None], z_t, c[:, t - 1: t]], -1), state_p)
                if t >= decode_from:
                    preds.append(self.decoder(g_t[:, 0], terms))  # (B, C, H, W)
            pred = torch.stack(preds, 1)
            mu = torch.cat(mus, 1) if mus else noise[:, :0]
            logvar = torch.cat(logvars, 1) if logvars else noise[:, :0]

        pred32 = pred.float()
        mse_per_step = (pred32 - frames[:, decode_from:].float()).pow(2).mean(dim=(0, 2, 3, 4))  # (T-decode_from,)
        kld_per_step = kl_standard_normal(mu.float(), logvar.float()).mean(0)  # (n_post,)
        return {"pred": pred, "mse": mse_per_step.sum(), "kld": kld_per_step.sum(),
                "mse_per_step": mse_per_step, "kld_per_step": kld_per_step}

    def embed_conditions(self, conds):
        """conds (B, T, cond_dim) -> the embeddings (B, T-1, E) of cond_0..cond_{T-2}, standardised first:
        step t uses cond_{t-1}."""
        cond = (conds[:, :-1].float() - self.cond_mean) / self.cond_std  # (B, T-1, cond_dim)
        return self.cond_embed(cond)

    def _latents(self, h_target, noise, n_post):
        """z for all steps: posterior samples for the first n_post steps, noise (prior) after."""
        if n_post == 0:
            return noise, noise[:, :0], noise[:, :0]
        z_q, mu, logvar, _ = self.posterior(h_target, None, noise[:, :n_post])
        return torch.cat([z_q, noise[:, n_post:]], 1), mu, logvar
