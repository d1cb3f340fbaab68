"""The course sample's `utils` names, for code written against it: `finn_eval_seq(gt, pred)` with the
sample's signature (time-major sequences of (B, C, H, W) -> (mse, ssim, psnr), each (B, T)), and the
per-channel `finn_psnr` / `finn_ssim`. They live in metrics.py; nothing else belongs here.

    python -c "from utils import finn_eval_seq; help(finn_eval_seq)"
"""
from metrics import finn_eval_seq, finn_psnr, finn_ssim

__all__ = ["finn_eval_seq", "finn_psnr", "finn_ssim"]
