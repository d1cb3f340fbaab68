"""Recurrent parts of SVG (Denton & Fergus 2018): the frame predictor and the Gaussian posterior.

Both are stacks of LSTMCells between a linear embedding and output heads. They keep no per-batch
state: the recurrent state is an argument and a return value (None starts from zeros), so any batch
size works at any time. Both accept a whole sequence (B, T, D) and step the cells through T; the
embedding and the heads run once on all B*T rows, which is what the batched rollout relies on.

    python -c "from models.lstm import lstm; print(lstm(320, 128, 256, 2))"
"""
import torch
import torch.nn as nn

from .norm import run_per_step


class _StackedLSTM(nn.Module):
    """Linear embedding followed by n_layers LSTMCells, stepped over the time axis."""

    def __init__(self, input_size, hidden_size, n_layers):
        super().__init__()
        self.hidden_size = hidden_size
        self.n_layers = n_layers
        self.embed = nn.Linear(input_size, hidden_size)
        self.cells = nn.ModuleList([nn.LSTMCell(hidden_size, hidden_size) for _ in range(n_layers)])

    def init_state(self, batch_size, like):
        zeros = like.new_zeros(batch_size, self.hidden_size)
        return tuple((zeros, zeros) for _ in range(self.n_layers))

    def recur(self, x, state):
        """x: (B, T, input_size) -> hidden (B, T, hidden_size), new state."""
        B, T, _ = x.shape
        e = self.embed(x)  # (B, T, hidden)
        state = self.init_state(B, e) if state is None else state
        outs = []
        for t in range(T):
            h_in, new_state = e[:, t], []
            for cell, (h, c) in zip(self.cells, state):
                h, c = cell(h_in, (h, c))
                new_state.append((h, c))
                h_in = h
            state = tuple(new_state)
            outs.append(h_in)
        return torch.stack(outs, 1), state


class lstm(_StackedLSTM):
    """Frame predictor: [h_{t-1}, z_t, cond] -> next frame code in (-1, 1) (Linear + BN + Tanh head)."""

    def __init__(self, input_size, output_size, hidden_size, n_layers):
        super().__init__(input_size, hidden_size, n_layers)
        self.output = nn.Sequential(nn.Linear(hidden_size, output_size), nn.BatchNorm1d(output_size), nn.Tanh())

    def forward(self, x, state=None):
        """x: (B, T, input_size), one row per step; state: None or the returned state.

        Returns (B, T, output_size) and the new state. The head's BatchNorm takes its training
        statistics per step, as when the steps run one call at a time.
        """
        hid, state = self.recur(x, state)
        B, T, H = hid.shape
        out = run_per_step(self.output, hid.reshape(B * T, H), T)  # (B*T, H): BatchNorm1d wants (N, C)
        return out.reshape(B, T, -1), state


class gaussian_lstm(_StackedLSTM):
    """Approximate posterior q(z_t | x_{1:t}): frame codes -> (z, mu, logvar) of a diagonal Gaussian."""

    def __init__(self, input_size, output_size, hidden_size, n_layers):
        super().__init__(input_size, hidden_size, n_layers)
        self.mu_net = nn.Linear(hidden_size, output_size)
        self.logvar_net = nn.Linear(hidden_size, output_size)

    def forward(self, x, state=None, eps=None):
        """x: (B, T, input_size); eps: standard normal noise (B, T, output_size) or None to draw it.

        Returns z, mu, logvar, each (B, T, output_size), and the new state.
        """
        hid, state = self.recur(x, state)
        mu, logvar = self.mu_net(hid), self.logvar_net(hid)
        if eps is None:
            eps = torch.randn_like(mu)
        z = mu + eps * torch.exp(0.5 * logvar)  # reparameterisation trick (Kingma & Welling 2014)
        return z, mu, logvar, state
