"""Model zoo: the VGG-64 frame encoder/decoder, the LSTMs, and the conditional VAE composing them."""
from .cvae import CVAE, ARCH_KEYS
from .lstm import gaussian_lstm, lstm
from .vgg_64 import vgg_decoder, vgg_encoder

__all__ = ["CVAE", "ARCH_KEYS", "lstm", "gaussian_lstm", "vgg_encoder", "vgg_decoder"]
