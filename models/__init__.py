"""The model: VGG-64 frame encoder/decoder (vgg_64.py), the LSTMs (lstm.py), and the conditional VAE
composing them (cvae.py). fast.py holds exact-equivalent speed paths that a reader may skip."""
from .cvae import ARCH_KEYS, BN_STATS, CVAE, MOTIONS, PRIORS
from .lstm import gaussian_lstm, kl_divergence, lstm
from .vgg_64 import COND_CONVS, vgg_decoder, vgg_encoder

__all__ = ["CVAE", "ARCH_KEYS", "BN_STATS", "PRIORS", "MOTIONS", "COND_CONVS", "lstm", "gaussian_lstm", "kl_divergence",
           "vgg_encoder", "vgg_decoder"]
