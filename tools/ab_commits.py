"""A demo.py recipe at two commits of this repository, end to end and side by side on one host.

    python tools/ab_commits.py --base bfd7a8a --recipe long [--head HEAD] [--rounds 2] [-- DEMO_FLAGS]

Each commit is checked out in a git worktree of its own (under --work) and runs `python demo.py --recipe R`
there on the same data set, with a decoded-data cache of its own. The runs alternate base, head, head, base,
... so that a slow spell of a shared host slows both alike, and the CPU's use by other processes is recorded
per run. Each run reports demo.py's training seconds (start-up, validation and sample GIFs included), the
loop's own seconds per iteration (metrics.csv: no validation, no checkpoint) and the test PSNR and SSIM; the
summary gives each commit's median and base / head. The host's peaks (bench.py's) are measured before and
after the runs. Flags after `--` go to demo.py at both commits (which must both accept them).
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", required=True, help="the earlier commit (any git revision)")
    p.add_argument("--head", default="HEAD", help="the later commit (any git revision)")
    p.add_argument("--recipe", default="long", help="demo.py --recipe at both commits")
    p.add_argument("--rounds", type=int, default=2, help="runs per commit, alternating base, head, head, base, ...")
    p.add_argument("--data_root", default=os.path.join(REPO, "data", "sim_data"),
                   help="data set both runs train and test on (demo.py generates it once when absent)")
    p.add_argument("--work", default="", help="runs, their logs and caches, and the worktrees while they run "
                                             "(default: a new temporary directory)")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs demo.py")
    p.add_argument("--no_peak", action="store_true", help="skip the peak measurement (tests)")
    p.add_argument("--out", default="", help="also write the runs and the summary here as JSON")
    return p


def order(rounds):
    """The runs' order: base, head, head, base, base, head, ... (each commit `rounds` times)."""
    pairs = [("base", "head") if i % 2 == 0 else ("head", "base") for i in range(rounds)]
    return [label for pair in pairs for label in pair]


def resolve(rev):
    """The commit hash of a git revision of this repository, or None where it names none."""
    res = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=REPO,
                         capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else None


def checkout(sha, path):
    """A detached worktree of commit `sha` at `path` (one an interrupted run left there is replaced)."""
    if os.path.isdir(path):
        subprocess.run(["git", "worktree", "remove", "--force", path], cwd=REPO, capture_output=True)
    res = subprocess.run(["git", "worktree", "add", "--detach", path, sha], cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"error: --work: cannot check out {sha[:9]} at {path}: {res.stderr.strip()}")


def read_run(log_dir):
    """(demo_summary.json, iterations, loop seconds) of the one run under log_dir."""
    runs = [os.path.join(log_dir, d) for d in os.listdir(log_dir)
            if os.path.isfile(os.path.join(log_dir, d, "demo_summary.json"))]
    if len(runs) != 1:
        raise RuntimeError(f"{log_dir}: expected one finished demo.py run, found {len(runs)}")
    with open(os.path.join(runs[0], "demo_summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(runs[0], "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    return summary, int(rows[-1]["step"]), sum(float(r["seconds"]) for r in rows)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)  # ours before "--", demo.py's after
    demo_flags = argv[split + 1:]
    parser = get_args_parser()
    args = parser.parse_args(argv[:split])
    shas = {label: resolve(rev) for label, rev in (("base", args.base), ("head", args.head))}
    for label, sha in shas.items():
        if sha is None:
            parser.error(f"--{label} {getattr(args, label)}: not a commit of the repository at {REPO}")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: must be >= 1")
    import bench
    import torch
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="ab-commits-"))
    os.makedirs(work, exist_ok=True)
    data_root = os.path.abspath(args.data_root)
    trees = {label: os.path.join(work, label) for label in ("base", "head")}
    for label in trees:
        checkout(shas[label], trees[label])
    device = torch.device("cpu")
    info = bench.machine_info(device)
    print(f"host: {info['cpu']}, {info['cpu_count']} cores, torch {info['torch']}; base {shas['base'][:9]} "
          f"({args.base}), head {shas['head'][:9]} ({args.head}); recipe {args.recipe}; work {work}")

    def peak():
        if args.no_peak:
            return None
        p = bench.bench_peak(device, bench.native_bf16(device, info))
        return {k: round(v["peak"] / 1e9, 1) for k, v in p.items()}
    peaks = [peak()]
    print(f"peaks before (GFLOP/s): {peaks[0]}")
    runs, count = [], {"base": 0, "head": 0}
    try:
        for label in order(args.rounds):
            count[label] += 1
            log_dir = os.path.join(work, f"runs/{label}{count[label]}")
            cmd = [args.python, "demo.py", "--recipe", args.recipe, "--data_root", data_root, "--log_dir", log_dir,
                   "--cache_dir", os.path.join(work, f"cache_{label}"), *demo_flags]
            os.makedirs(os.path.dirname(log_dir), exist_ok=True)
            monitor, t0 = bench.CpuMonitor(), time.time()
            with open(log_dir + ".log", "w") as log:
                res = subprocess.run(cmd, cwd=trees[label], stdout=log, stderr=subprocess.STDOUT)
            if res.returncode != 0:
                raise RuntimeError(f"{label} run {count[label]} failed (exit {res.returncode}): see {log_dir}.log")
            busy = monitor.lap()
            summary, iters, loop_s = read_run(log_dir)
            run = {"commit": label, "round": count[label], "train_s": summary["seconds"]["train"],
                   "wall_s": round(time.time() - t0, 1), "iterations": iters, "s_per_iteration": loop_s / iters,
                   "test_psnr": summary["test_psnr"], "test_ssim": summary["test_ssim"],
                   "other_cores_busy": None if busy is None else round(busy, 2)}
            runs.append(run)
            print(f"{label} {count[label]}: training {run['train_s']:.1f} s, {iters} iterations at "
                  f"{run['s_per_iteration']:.4f} s, test PSNR {run['test_psnr']:.2f} dB (SSIM {run['test_ssim']:.3f}), "
                  f"other processes {run['other_cores_busy']} cores", flush=True)
    finally:  # the worktrees go, the runs, their logs and caches stay under --work
        for tree in trees.values():
            subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=REPO, capture_output=True)
    peaks.append(peak())
    print(f"peaks after (GFLOP/s): {peaks[1]}")

    def median(label, key):
        return statistics.median(r[key] for r in runs if r["commit"] == label)
    result = {key: {label: median(label, key) for label in ("base", "head")}
              for key in ("train_s", "s_per_iteration", "test_psnr", "test_ssim")}
    for key in ("train_s", "s_per_iteration"):
        result[key]["base / head"] = result[key]["base"] / result[key]["head"]
    print(f"median training: base {result['train_s']['base']:.1f} s, head {result['train_s']['head']:.1f} s -> "
          f"base / head {result['train_s']['base / head']:.2f}x")
    print(f"median iteration: base {result['s_per_iteration']['base']:.4f} s, head "
          f"{result['s_per_iteration']['head']:.4f} s -> base / head {result['s_per_iteration']['base / head']:.2f}x")
    print(f"median test PSNR: base {result['test_psnr']['base']:.2f} dB, head {result['test_psnr']['head']:.2f} dB")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"host": info, "commits": shas, "recipe": args.recipe, "demo_flags": demo_flags,
                       "peaks_gflops": peaks, "runs": runs, "summary": result}, f, indent=1)
    return result


if __name__ == "__main__":
    main()
