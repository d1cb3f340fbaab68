"""A training run's logs: the run directory's name, train_record.txt (the course's log lines), metrics.csv,
TensorBoard scalars, curves.png and the prediction GIFs, written by one small object, RunLog.

    python -c "import run_log; print(run_log.read_metrics('logs/demo/<run>/metrics.csv')[-1])"
"""
import csv
import math
import os

import plots

METRIC_FIELDS = ["epoch", "step", "loss", "mse", "kld", "beta", "tfr", "lr", "val_psnr", "seconds",
                 "val_kld", "active_dims", "val_kld_per_step", "kld_levels", "val_kld_levels", "val_kld_per_dim",
                 "val_psnr_trained", "val_fvd_predicted", "val_fvd_whole"]


def run_name(args):
    """Run directory name as the course sample forms it; the additions (a learned prior, no conditions, spatial
    latent levels, a modulated decoder, the pixel-motion output, BatchNorm statistics over the clip) are appended
    only when used, so the course's configurations keep the course's names."""
    name = ("rnn_size=%d-predictor-posterior-rnn_layers=%d-%d-n_past=%d-n_future=%d-lr=%.4f-g_dim=%d-z_dim=%d"
            "-last_frame_skip=%s-beta=%.7f" % (args.rnn_size, args.predictor_rnn_layers, args.posterior_rnn_layers,
                                                args.n_past, args.n_future, args.lr, args.g_dim, args.z_dim,
                                                args.last_frame_skip, args.beta))
    if getattr(args, "prior", "fixed") != "fixed":
        name += f"-prior={args.prior}"
    if getattr(args, "cond", "action_pos") != "action_pos":
        name += f"-cond={args.cond}"
    if getattr(args, "latent_levels", 1) != 1:
        name += f"-latent_levels={args.latent_levels}"
    if getattr(args, "cond_conv", "none") != "none":
        name += f"-cond_conv={args.cond_conv}"
        if args.cond_conv == "condconv" and args.condconv_experts != 4:
            name += f"-experts={args.condconv_experts}"
    if getattr(args, "motion", "none") != "none":
        name += f"-motion={args.motion}-{args.motion_kernels}"
    if getattr(args, "bn_stats", "step") != "step":
        name += f"-bn_stats={args.bn_stats}"
    return name


def read_metrics(path):
    """metrics.csv -> a list of dicts of floats (NaN for empty cells and non-numbers; a ';'-joined cell becomes
    a list); columns this code does not know are kept."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _parse(v):
    try:
        return [float(x) for x in v.split(";")] if ";" in v else float(v)
    except (AttributeError, TypeError, ValueError):  # blank cells and anything not a number
        return math.nan


def _fmt(v):
    if isinstance(v, (list, tuple)):
        return ";".join(f"{x:.6g}" for x in v)
    if v is None or isinstance(v, float) and math.isnan(v):
        return ""
    return (f"{v:.6g}" if isinstance(v, float) else str(v))


class RunLog:
    """Everything a run writes besides checkpoints; only rank 0 makes one.

    On a resume, metrics.csv keeps the rows of finished epochs and TensorBoard purges the steps after the
    checkpoint, so the logs read as one uninterrupted run.
    """

    def __init__(self, run_dir, args, epoch, step, resumed_from=None, overrides=()):
        from torch.utils.tensorboard import SummaryWriter
        self.run_dir, self.n_past = run_dir, args.n_past
        self.record_path = os.path.join(run_dir, "train_record.txt")
        self.metrics_path = os.path.join(run_dir, "metrics.csv")
        os.makedirs(os.path.join(run_dir, "gen"), exist_ok=True)
        rows = [r for r in read_metrics(self.metrics_path) if r["epoch"] < epoch]  # drop rows of unfinished epochs
        with open(self.metrics_path, "w") as f:
            f.write(",".join(METRIC_FIELDS) + "\n")
            for r in rows:
                f.write(",".join(_fmt(r.get(k, math.nan)) for k in METRIC_FIELDS) + "\n")
        if resumed_from is None:
            self.record(f"args: {vars(args)}")
        else:
            self.record(f"resumed from {resumed_from} at epoch {epoch}, step {step}")
            for o in overrides:
                self.record(f"override {o}")
                print(f"[resume] override {o}")
        self.writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=step if resumed_from else None)

    def record(self, line):
        with open(self.record_path, "a") as f:
            f.write(line + "\n")

    def scalars(self, step, prefix, values):
        for k, v in values.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def epoch(self, row, val=None, clip=None):
        """Close an epoch: the course's log lines (printed and recorded), a metrics.csv row, the validation
        scalars, curves.png when there is a new validation point, and the prediction GIF/strip."""
        line = "[epoch: %02d] loss: %.5f | mse loss: %.5f | kld loss: %.5f" % (row["epoch"], row["loss"], row["mse"], row["kld"])
        if val is not None:
            line += "\n" + "=" * 22 + " validate psnr = %.5f " % val["psnr"] + "=" * 24
            if val.get("psnr_trained") is not None:  # --ema: the line above is the average's
                line += "\n(the trained weights, without the average: %.5f)" % val["psnr_trained"]
            self.scalars(row["step"], "val", {k: val[k] for k in ("psnr", "ssim", "kld", "active_dims")})
            for form, f in val.get("fvd", {}).items():  # --fvd_every
                self.writer.add_scalar(f"val/fvd_{form}", f["fvd"], row["step"])
            for t, v in enumerate(val["kld_per_step"], 1):
                self.writer.add_scalar(f"val_kld_per_step/t{t:02d}", v, row["step"])
            for i, v in enumerate(val.get("kld_levels", ()), 1):  # each latent level's KL, global z first
                self.writer.add_scalar(f"val/kld_level{i}", v, row["step"])
        print(line, flush=True)
        self.record(line)
        with open(self.metrics_path, "a") as f:
            f.write(",".join(_fmt(row.get(k, math.nan)) for k in METRIC_FIELDS) + "\n")
        if val is not None:
            plots.plot_curves(read_metrics(self.metrics_path), os.path.join(self.run_dir, "curves.png"))
        if clip is not None:
            name = os.path.join(self.run_dir, "gen", f"epoch_{row['epoch']:03d}")
            plots.save_gif(name + ".gif", clip["gt"], clip["pred"], self.n_past)
            plots.save_strip(name + ".png", clip["gt"], clip["pred"], self.n_past)

    def close(self):
        self.writer.close()
