"""Compare training runs the way the lab report does: one figure, one table, one command.

    python compare.py RUN [RUN ...] --out DIR
    python compare.py logs/experiments/annealing/*/seed*/* --out logs/experiments/annealing

Each RUN is a run directory written by train_fixed_prior.py. From each it reads `metrics.csv` (one row
per epoch), the `args: {...}` line of `train_record.txt` (with the `override k: a -> b` lines a resumed
run appends) and `test*/metrics.json` written by test.py (`test/` = real conditions, `test_shuffled/` =
the shuffled-conditions ablation).

Runs whose flags differ only in --seed (or in flags that never change what is trained: paths, workers,
device, progress bar) are one configuration. Configurations are labelled by the flags in which they
differ (e.g. `kl_anneal_cyclical=True`), in the order their first run was given. A flag a run
predates counts at its default, so such a run joins the configuration it trained as.

Writes
  DIR/compare.png  KL loss, MSE (log scale), validation PSNR, KL weight with the teacher-forcing ratio;
                   x = iterations; one colour per configuration; seeds thin, their mean bold
  DIR/compare_time.png  validation PSNR against training minutes (time to quality), the test PSNR as a
                   star at each run's end
  DIR/compare.md   the table (mean +- spread over seeds), the pairwise differences in test PSNR
                   against the seed spread, and what was missing; also printed to stdout
  DIR/compare.csv  the same numbers, one row per configuration
"""
import runtime  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)

import argparse
import ast
import csv
import io
import json
import math
import os
import sys

import numpy as np

import plots
import train_fixed_prior as train
from checkpoints import atomic_write
from run_log import read_metrics

# Flags that never change what a run computes (where it reads or writes, how fast, what it prints), and
# the seed, which is what repeats of one configuration differ in.
NOT_CONFIG = {"log_dir", "model_dir", "data_root", "cache_dir", "num_workers", "no_progress", "device", "cuda",
              "seed", "eval_batch_size", "plot_every", "save_every", "no_cache", "fvd_every", "conv_layouts",
              "sync_every"}
TESTS = {"real": "test", "shuffled": "test_shuffled"}
# test.py --n_samples N --out <run>/test_samples: best of N prior samples, read when present (experiments.py
# --n_samples writes it).
SAMPLES = "test_samples"


def get_args_parser():
    p = argparse.ArgumentParser("Compare training runs: curves, a table over seeds, and what is missing",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories written by train_fixed_prior.py")
    p.add_argument("--out", required=True, help="directory for compare.png, compare.md and compare.csv")
    p.add_argument("--spread", default="halfrange", choices=["halfrange", "std"],
                   help="spread over seeds shown after +-: half the range (max - min) / 2, or the sample std (ddof 1)")
    p.add_argument("--title", default="", help="heading of compare.md and title of the figure")
    p.add_argument("--ignore_flag", action="append", default=[], metavar="FLAG",
                   help="also ignore this flag when grouping runs into configurations (repeatable)")
    return p


class NotARun(ValueError):
    pass


# ----------------------------------------------------------------------------------------------- reading

def _parse_value(text, old):
    """Override lines print values with str(), not repr(): strings come unquoted."""
    if isinstance(old, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def read_record(path):
    """Effective args of a run from train_record.txt: the last `args:` line, then the overrides after it.

    Returns (args, resumes): resumes lists the `resumed from ...` lines (empty for an uninterrupted run)."""
    args, resumes = None, []
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("args: "):
                try:
                    args = ast.literal_eval(line[len("args: "):])
                except (ValueError, SyntaxError) as e:
                    raise NotARun(f"{path}: unreadable args line ({e})") from None
                resumes = []  # a fresh start in the same directory (an earlier try died before its checkpoint)
            elif line.startswith("resumed from ") and args is not None:
                resumes.append(line)
            elif line.startswith("override ") and args is not None and ": " in line and " -> " in line:
                key, change = line[len("override "):].split(": ", 1)
                _, new = change.split(" -> ", 1)
                args[key] = _parse_value(new, args.get(key))
    if args is None:
        raise NotARun(f"{path}: no 'args: {{...}}' line")
    return args, resumes


def load_run(path):
    """Everything compare needs from one run directory; NotARun names the directory otherwise."""
    record = os.path.join(path, "train_record.txt")
    if not os.path.isdir(path):
        raise NotARun(f"{path}: no such directory")
    if not os.path.isfile(record):
        raise NotARun(f"{path} is not a training run (no train_record.txt; expected a directory written by "
                      f"train_fixed_prior.py, e.g. logs/fp/rnn_size=...)")
    args, resumes = read_record(record)
    args = train.with_defaults(train.get_args_parser(), args)  # a flag the run predates: its default
    rows = read_metrics(os.path.join(path, "metrics.csv"))
    tests = {}
    for mode, sub in {**TESTS, "samples": SAMPLES}.items():
        m = os.path.join(path, sub, "metrics.json")
        if os.path.isfile(m):
            with open(m) as f:
                tests[mode] = json.load(f)
            # A test written before the checkpoint it scored last changed no longer describes the run.
            scored = os.path.join(path, os.path.basename(tests[mode].get("checkpoint") or "model.pth"))
            tests[mode]["stale"] = os.path.isfile(scored) and os.path.getmtime(scored) > os.path.getmtime(m)
    return {"path": path, "args": args, "resumes": resumes, "rows": rows, "tests": tests, **run_numbers(rows, tests)}


def _col(rows, key):
    return np.array([r.get(key, math.nan) for r in rows], dtype=float)


def run_numbers(rows, tests):
    """Per-run figures of the table, straight from the files."""
    val = _col(rows, "val_psnr")
    val = val[~np.isnan(val)]
    steps = _col(rows, "step")
    secs = _col(rows, "seconds")
    timed = len(secs) and not np.all(np.isnan(secs))
    total_steps = float(np.nanmax(steps)) if len(steps) and not np.all(np.isnan(steps)) else math.nan
    # `seconds` is the training time of each epoch (validation excluded); their sum over the run's steps.
    train_seconds = float(np.nansum(secs))
    sec_it = train_seconds / total_steps if total_steps and total_steps > 0 and timed else math.nan
    real, shuffled = tests.get("real"), tests.get("shuffled")
    samples = tests.get("samples", {}).get("samples")
    nan = math.nan
    return {
        "steps": total_steps, "epochs": len(rows),
        "val_final": float(val[-1]) if len(val) else nan, "val_best": float(val.max()) if len(val) else nan,
        "test_psnr": real["psnr"] if real else nan, "test_ssim": real["ssim"] if real else nan,
        "gain_copy_last": real["psnr"] - real["copy_last_psnr"] if real and "copy_last_psnr" in real else nan,
        "gain_shuffled": real["psnr"] - shuffled["psnr"] if real and shuffled else nan,
        "sec_per_iter": sec_it,
        "train_seconds": train_seconds, "train_min": train_seconds / 60 if timed else nan,
        "best_psnr": samples["psnr"]["best"] if samples else nan,
        "sample_std": samples["diversity_pixel_std"] if samples else nan,
        **{f"fvd_{form}": real["fvd"][form]["fvd"] if real and "fvd" in real else nan for form in ("predicted", "whole")},
    }


# ----------------------------------------------------------------------------------------------- grouping

def _key(args, ignore):
    return tuple(sorted((k, repr(v)) for k, v in args.items() if k not in ignore))


def group_runs(runs, ignore=NOT_CONFIG):
    """Configurations in order of first appearance; each label names the flags that tell them apart."""
    configs = {}
    for r in runs:
        configs.setdefault(_key(r["args"], ignore), []).append(r)
    groups = list(configs.values())
    keys = sorted({k for g in groups for k in g[0]["args"]} - set(ignore))
    missing = object()
    differing = [k for k in keys if len({repr(g[0]["args"].get(k, missing)) for g in groups}) > 1]
    out = []
    for g in groups:
        a = g[0]["args"]
        label = ", ".join(f"{k}={a[k]}" if k in a else f"{k}=(absent)" for k in differing) or "all runs"
        out.append({"label": label, "runs": sorted(g, key=lambda r: (r["args"].get("seed", 0), r["path"])),
                    "flags": {k: a.get(k) for k in differing}})
    return out, differing


# ----------------------------------------------------------------------------------------------- statistics

def spread_of(values, how):
    v = np.array([x for x in values if not math.isnan(x)], dtype=float)
    if len(v) < 2:
        return math.nan
    return float((v.max() - v.min()) / 2) if how == "halfrange" else float(v.std(ddof=1))


def summary(values, how):
    v = [x for x in values if not math.isnan(x)]
    return (float(np.mean(v)) if v else math.nan), spread_of(v, how), len(v)


FIELDS = [("val_final", "final val PSNR (dB)", 2), ("val_best", "best val PSNR (dB)", 2),
          ("test_psnr", "test PSNR (dB)", 2), ("test_ssim", "test SSIM", 3),
          ("gain_copy_last", "gain over copy-last (dB)", 2), ("gain_shuffled", "gain over shuffled cond. (dB)", 2),
          ("sec_per_iter", "s / iteration", 3), ("train_min", "training min", 1)]
# Shown when a run has test_samples: the best of N prior samples per sequence and metric (test.py
# --n_samples) and the per-pixel std across the samples (0 when the latent is ignored).
SAMPLE_FIELDS = [("best_psnr", "best-of-{n} test PSNR (dB)", 2), ("sample_std", "pixel std across samples", 4)]
# Shown when a run's test has FVD (test.py --fvd, experiments.py --fvd): the graded sample's FVD on the predicted
# frames and on the whole clip (given + predicted), which papers report interchangeably.
FVD_FIELDS = [("fvd_predicted", "test FVD, predicted frames", 1), ("fvd_whole", "test FVD, whole clip", 1)]
OPTIONAL_FIELDS = SAMPLE_FIELDS + FVD_FIELDS


def config_notes(cfg, longest):
    """What is missing or unusual in a configuration's runs, seed by seed."""
    notes = []
    for r in cfg["runs"]:
        who = f"seed {r['args'].get('seed', '?')}"
        if not r["rows"]:
            notes.append(f"{who}: no epoch logged")
        elif r["steps"] < longest:
            notes.append(f"{who}: shorter run ({r['steps']:.0f} of {longest:.0f} steps)")
        if r["resumes"]:
            notes.append(f"{who}: resumed" + (f" {len(r['resumes'])} times" if len(r["resumes"]) > 1 else "")
                         + " (" + "; ".join(x.split(" at ", 1)[-1] for x in r["resumes"]) + ")")
        if "real" not in r["tests"]:
            notes.append(f"{who}: no test")
        elif "shuffled" not in r["tests"]:
            notes.append(f"{who}: no shuffled-conditions test")
        if any(t.get("stale") for t in r["tests"].values()):
            notes.append(f"{who}: test older than its checkpoint")
        if math.isnan(r["val_final"]) and r["rows"]:
            notes.append(f"{who}: no validation")
    return notes


def compare_pair(a, b, how):
    """Difference of mean test PSNR (b - a) and whether it exceeds what the seeds alone give."""
    va = [r["test_psnr"] for r in a["runs"] if not math.isnan(r["test_psnr"])]
    vb = [r["test_psnr"] for r in b["runs"] if not math.isnan(r["test_psnr"])]
    if not va or not vb:
        return math.nan, "no test in one of them"
    d = float(np.mean(vb) - np.mean(va))
    if len(va) < 2 or len(vb) < 2:
        return d, "a single tested seed: spread unknown"
    if how == "halfrange":  # seeds' ranges overlap or not
        apart = min(vb) > max(va) or min(va) > max(vb)
    else:  # difference against the two std summed
        apart = abs(d) > np.std(va, ddof=1) + np.std(vb, ddof=1)
    return d, "larger than the seed spread" if apart else "within seed spread"


def build_table(configs, how):
    longest = max((r["steps"] for c in configs for r in c["runs"] if not math.isnan(r["steps"])), default=math.nan)
    table = []
    for i, c in enumerate(configs):
        row = {"label": c["label"], "n_seeds": len(c["runs"]), **{f"flag_{k}": v for k, v in c["flags"].items()}}
        for key, _, _ in FIELDS + OPTIONAL_FIELDS:
            m, s, n = summary([r[key] for r in c["runs"]], how)
            row[f"{key}_mean"], row[f"{key}_spread"], row[f"{key}_n"] = m, s, n
        if i == 0:
            row["vs_first_db"], row["vs_first"] = math.nan, "(reference)"
        else:
            row["vs_first_db"], row["vs_first"] = compare_pair(configs[0], c, how)
        row["notes"] = "; ".join(config_notes(c, longest))
        row["runs"] = ";".join(r["path"] for r in c["runs"])
        table.append(row)
    return table


# ----------------------------------------------------------------------------------------------- writing

def _pm(row, key, digits):
    m, s, n = row[f"{key}_mean"], row[f"{key}_spread"], row[f"{key}_n"]
    if math.isnan(m):
        return "–"
    text = f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if not math.isnan(s) else "")
    return text + (f" ({n} of {row['n_seeds']})" if n < row["n_seeds"] else "")


def markdown(configs, table, how, title, curve_notes, out):
    spread = "half the range over seeds" if how == "halfrange" else "sample std over seeds"
    lines = [f"# {title or 'Comparison'}", "",
             f"Mean ± {spread}; `(k of n)` = only k of the n seeds have the value. Test = the graded protocol "
             f"(test.py, real conditions); gains are over copying the last given frame and over the same model "
             f"with shuffled conditions. s / iteration = training seconds (metrics.csv) / steps.", ""]
    fields = FIELDS + [f for f in OPTIONAL_FIELDS if any(row[f"{f[0]}_n"] for row in table)]
    ns = sorted({r["tests"]["samples"]["n_samples"] for c in configs for r in c["runs"] if "samples" in r["tests"]})
    fields = [(k, h.format(n="/".join(map(str, ns))), d) for k, h, d in fields]
    heads = ["configuration", "seeds"] + [h for _, h, _ in fields] + ["test PSNR vs first config", "missing / notes"]
    lines += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for row in table:
        vs = row["vs_first"] if math.isnan(row["vs_first_db"]) else f"{row['vs_first_db']:+.2f} dB ({row['vs_first']})"
        cells = [f"`{row['label']}`", str(row["n_seeds"])] + [_pm(row, k, d) for k, _, d in fields] + \
                [vs, row["notes"].replace("|", "/") or "–"]
        lines.append("| " + " | ".join(cells) + " |")
    if len(configs) > 2:
        lines += ["", "## Every pair (test PSNR, second minus first)", ""]
        for i in range(len(configs)):
            for j in range(i + 1, len(configs)):
                d, verdict = compare_pair(configs[i], configs[j], how)
                diff = "–" if math.isnan(d) else f"{d:+.2f} dB"
                lines.append(f"- `{configs[j]['label']}` vs `{configs[i]['label']}`: {diff} ({verdict})")
    lines += ["", "## Runs", ""]
    for c in configs:
        lines.append(f"- `{c['label']}`: " + ", ".join(
            f"seed {r['args'].get('seed', '?')} `{os.path.relpath(r['path'], out)}`" for r in c["runs"]))
    if curve_notes:
        lines += ["", "## Figure notes", ""] + [f"- {n}" for n in curve_notes]
    lines += ["", "![curves](compare.png)", "", "![validation PSNR against training minutes](compare_time.png)", ""]
    return "\n".join(lines)


def write_csv(path, table):
    cols = []
    for row in table:
        cols += [k for k in row if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for row in table:
        w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def _series(run, key):
    """(steps, values) of one run's column, NaNs dropped."""
    s, v = _col(run["rows"], "step"), _col(run["rows"], key)
    ok = ~(np.isnan(s) | np.isnan(v))
    return s[ok], v[ok]


def seed_mean(runs, key):
    """Mean over seeds at common steps; when the seeds logged different steps, interpolated onto the steps
    of the seeds' union that every seed covers. Returns (steps, mean, interpolated) or None."""
    series = [_series(r, key) for r in runs]
    series = [s for s in series if len(s[0])]
    if len(series) < 2:
        return None
    if all(len(s[0]) == len(series[0][0]) and np.array_equal(s[0], series[0][0]) for s in series):
        return series[0][0], np.mean([s[1] for s in series], axis=0), False
    lo, hi = max(s[0].min() for s in series), min(s[0].max() for s in series)
    grid = np.unique(np.concatenate([s[0] for s in series]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    if len(grid) == 0:
        return None
    return grid, np.mean([np.interp(grid, s[0], s[1]) for s in series], axis=0), True


def plot(configs, path, title):
    """The report's four panels, every configuration overlaid, x in iterations."""
    plt = plots.pyplot()
    from matplotlib.lines import Line2D
    colours = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.4))
    ax_tfr = axes[3].twinx()
    panels = [(axes[0], "kld", "-"), (axes[1], "mse", "-"), (axes[2], "val_psnr", "o-"), (axes[3], "beta", "-"),
              (ax_tfr, "tfr", "--")]
    notes = []
    for i, c in enumerate(configs):
        colour = colours[i % len(colours)]
        interpolated = False
        for ax, key, style in panels:
            many = len(c["runs"]) > 1
            for r in c["runs"]:
                s, v = _series(r, key)
                if len(s):
                    ax.plot(s, v, style, color=colour, lw=0.8 if many else 2.0, alpha=0.4 if many else 1.0,
                            ms=2 if many else 4)
            mean = seed_mean(c["runs"], key) if many else None
            if mean is not None:
                ax.plot(mean[0], mean[1], style, color=colour, lw=2.2, ms=4)
                interpolated |= mean[2]
        if interpolated:
            notes.append(f"`{c['label']}`: its seeds logged different steps; the bold mean is interpolated "
                         f"over the steps every seed covers")
    axes[0].set(title="KL loss (per step)", xlabel="iteration")
    axes[1].set(title="MSE (per step)", xlabel="iteration", yscale="log")
    axes[2].set(title="validation PSNR (dB)", xlabel="iteration")
    axes[3].set(title="KL weight (solid) and teacher forcing (dashed)", xlabel="iteration", ylabel="KL weight")
    ax_tfr.set(ylabel="teacher-forcing ratio", ylim=(-0.05, 1.05))
    top = max((float(np.nanmax(_col(r["rows"], "beta"))) for c in configs for r in c["runs"]
               if r["rows"] and not np.all(np.isnan(_col(r["rows"], "beta")))), default=1.0) or 1.0
    axes[3].set_ylim(-0.05 * top, 1.05 * top)  # both axes from 0 to their maximum, so the curves line up
    handles = [Line2D([], [], color=colours[i % len(colours)], lw=2.2,
                      label=f"{c['label']} ({len(c['runs'])} seed{'s' if len(c['runs']) != 1 else ''})")
               for i, c in enumerate(configs)]
    if any(len(c["runs"]) > 1 for c in configs):
        handles += [Line2D([], [], color="grey", lw=0.8, alpha=0.5, label="one seed"),
                    Line2D([], [], color="grey", lw=2.2, label="mean over seeds")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=9, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08 + 0.05 * ((len(handles) - 1) // 4), 1, 0.95 if title else 1))
    plots.save_figure(fig, path)
    return notes


def plot_time(configs, path, title):
    """Validation PSNR against cumulative training minutes (metrics.csv's per-epoch `seconds`, validation
    excluded), one colour per configuration; a star marks each run's test PSNR at the end of its training."""
    plt = plots.pyplot()
    colours = plt.get_cmap("tab10").colors
    fig, ax = plt.subplots(figsize=(10, 5 + 0.25 * len(configs)))
    for i, c in enumerate(configs):
        colour = colours[i % len(colours)]
        for j, r in enumerate(c["runs"]):
            minutes = np.nancumsum(_col(r["rows"], "seconds")) / 60
            val = _col(r["rows"], "val_psnr")
            ok = ~np.isnan(val)
            ax.plot(minutes[ok], val[ok], "o-", color=colour, ms=3, lw=1.5,
                    label=f"{c['label']}" if j == 0 else None)
            if not math.isnan(r["test_psnr"]) and len(minutes):
                ax.plot(minutes[-1], r["test_psnr"], "*", color=colour, ms=12, mec="black", mew=0.5)
    ax.plot([], [], "*", color="grey", ms=12, mec="black", mew=0.5, label="test PSNR at the end")
    ax.set(xlabel="training minutes (validation excluded)", ylabel="validation PSNR (dB)", title=title or None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    fig.tight_layout()
    plots.save_figure(fig, path)


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    runs, seen = [], set()
    for path in args.runs:
        path = path.rstrip("/") or path
        if os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        try:
            runs.append(load_run(path))
        except NotARun as e:
            parser.error(str(e))
    configs, differing = group_runs(runs, NOT_CONFIG | set(args.ignore_flag))
    table = build_table(configs, args.spread)
    os.makedirs(args.out, exist_ok=True)
    curve_notes = plot(configs, os.path.join(args.out, "compare.png"), args.title)
    plot_time(configs, os.path.join(args.out, "compare_time.png"), args.title)
    md = markdown(configs, table, args.spread, args.title, curve_notes, args.out)
    atomic_write(os.path.join(args.out, "compare.md"), lambda f: f.write(md.encode()))
    write_csv(os.path.join(args.out, "compare.csv"), table)
    print(md.split("\n## Runs")[0].rstrip())
    print(f"\nwrote {os.path.join(args.out, 'compare.png')}, compare_time.png, compare.md, compare.csv")
    sys.stdout.flush()
    return {"configs": configs, "table": table, "differing": differing, "markdown": md, "curve_notes": curve_notes}


if __name__ == "__main__":
    main()
