"""Recurrent parts of SVG (Denton & Fergus 2018, Sec. 3): the frame predictor, the Gaussian LSTM used for
the approximate posterior q(z_t | x_{1:t}) and the learned prior p(z_t | x_{1:t-1}), and the KL between
two diagonal Gaussians.

Both LSTMs are a linear embedding, a stack of LSTMCells and output heads, called one time step at a
time. They keep no per-batch state: the recurrent state is an argument and a return value (None starts
from zeros), so any batch size works at any time.

    python -c "from models.lstm import lstm; print(lstm(320, 128, 256, 2))"
"""
import torch
import torch.nn as nn


class _StackedLSTM(nn.Module):
    """Linear embedding followed by n_layers LSTMCells."""

    def __init__(self, input_size, hidden_size, n_layers):
        super().__init__()
        self.hidden_size = hidden_size
        self.n_layers = n_layers
        self.embed = nn.Linear(input_size, hidden_size)
        self.cells = nn.ModuleList([nn.LSTMCell(hidden_size, hidden_size) for _ in range(n_layers)])

    def cell_step(self, e, state):
        """Embedded input e (B, hidden) -> the top cell's output (B, hidden) and the new state."""
        if state is None:
            zeros = e.new_zeros(e.shape[0], self.hidden_size)
            state = tuple((zeros, zeros) for _ in range(self.n_layers))
        new_state = []
        for cell, (h, c) in zip(self.cells, state):
            h, c = cell(e, (h, c))
            new_state.append((h, c))
            e = h
        return e, tuple(new_state)


class lstm(_StackedLSTM):
    """Frame predictor: [h_{t-1}, z_t, cond_{t-1}] -> the code of frame t in (-1, 1) (Linear + BN + Tanh head)."""

    def __init__(self, input_size, output_size, hidden_size, n_layers):
        super().__init__(input_size, hidden_size, n_layers)
        self.output = nn.Sequential(nn.Linear(hidden_size, output_size), nn.BatchNorm1d(output_size), nn.Tanh())

    def forward(self, x, state=None):
        """x: (B, input_size), one time step; state: None or the returned state. Returns (B, output_size), state."""
        hid, state = self.cell_step(self.embed(x), state)
        return self.output(hid), state


class gaussian_lstm(_StackedLSTM):
    """A diagonal Gaussian over z_t from frame codes: the posterior (fed x_t) or the learned prior (fed x_{t-1})."""

    def __init__(self, input_size, output_size, hidden_size, n_layers):
        super().__init__(input_size, hidden_size, n_layers)
        self.mu_net = nn.Linear(hidden_size, output_size)
        self.logvar_net = nn.Linear(hidden_size, output_size)

    def forward(self, x, state=None, eps=None):
        """x: (B, input_size), one time step; eps: standard normal (B, output_size), or None to draw it.

        Returns z, mu, logvar, each (B, output_size), and the new state.
        """
        mu, logvar, state = self.params(x, state)
        return reparameterize(mu, logvar, torch.randn_like(mu) if eps is None else eps), mu, logvar, state

    def params(self, x, state=None):
        """x: (B, input_size), one time step -> mu, logvar (B, output_size) and the new state."""
        hid, state = self.cell_step(self.embed(x), state)
        return self.mu_net(hid), self.logvar_net(hid), state


def reparameterize(mu, logvar, eps):
    """z = mu + eps * sigma with sigma = exp(logvar / 2) (Kingma & Welling 2014, Sec. 2.4)."""
    return mu + eps * torch.exp(0.5 * logvar)


def kl_divergence(mu_q, logvar_q, mu_p=None, logvar_p=None):
    """KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p))) per dimension, in closed form; p = N(0, I) when
    mu_p is None. Both Gaussians are diagonal, so the KL is a sum of one-dimensional ones:
    1/2 [logvar_p - logvar_q + (exp(logvar_q) + (mu_q - mu_p)^2) / exp(logvar_p) - 1]
    (Kingma & Welling 2014, App. B, for the standard normal case)."""
    if mu_p is None:
        return -0.5 * (1 + logvar_q - mu_q.pow(2) - logvar_q.exp())
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) * torch.exp(-logvar_p) - 1)
