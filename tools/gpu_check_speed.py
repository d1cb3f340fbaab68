"""Training speed of a run stopped by tools/gpu_check.sh: iterations per second from the run's own timing,
and the projected time of the course's schedule (300 epochs x 600 iterations = 180,000 at batch 12).

    python tools/gpu_check_speed.py RUN_DIR --label "bf16" [--summary FILE]

metrics.csv holds each finished epoch's training seconds (the loop only: no validation, no checkpoint).
Epoch 0 carries the start-up (CUDA context, data workers, first-call kernel selection), so it is left out
when a later epoch finished; the epoch a SIGTERM cut short is counted from last.pth's epoch sums.
"""
import argparse
import csv
import os
import sys

COURSE_ITERS = 300 * 600


def measure(run_dir):
    """(iterations, seconds, note) measured after start-up, or with it when nothing else finished."""
    rows = []
    path = os.path.join(run_dir, "metrics.csv")
    if os.path.isfile(path):
        with open(path) as f:
            rows = [(int(r["epoch"]), int(r["step"]), float(r["seconds"])) for r in csv.DictReader(f)]
    parts, prev_step = [], 0
    for epoch, step, seconds in rows:
        parts.append((epoch, step - prev_step, seconds))
        prev_step = step
    last = os.path.join(run_dir, "last.pth")
    if os.path.isfile(last):  # the epoch a stop cut short
        import torch
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        sums = ckpt.get("epoch_sums")
        if sums and ckpt.get("epoch_it", 0) > 0 and ckpt["epoch"] not in {p[0] for p in parts}:
            parts.append((ckpt["epoch"], ckpt["epoch_it"], float(sums["seconds"])))
    later = [p for p in parts if p[0] > 0 and p[1] > 0]
    used, note = (later, "epoch 0 (start-up) excluded") if later else (parts, "includes start-up: an upper bound on time")
    iters, seconds = sum(p[1] for p in used), sum(p[2] for p in used)
    return iters, seconds, note


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--label", default="")
    p.add_argument("--summary", default="", help="append the result line to this file")
    args = p.parse_args(argv)
    iters, seconds, note = measure(args.run_dir)
    if iters == 0 or seconds <= 0:
        line = f"train {args.label}: no timed iterations (see the run's log)"
        code = 1
    else:
        ips = iters / seconds
        total = COURSE_ITERS / ips
        line = (f"train {args.label}: {ips:.2f} it/s ({1000 / ips:.1f} ms/it) over {iters} iterations in {seconds:.1f} s "
                f"({note}); projected 180k-iteration schedule: {total / 3600:.2f} h ({total:.0f} s, training "
                f"iterations only)")
        code = 0
    print(line, flush=True)
    if args.summary:
        with open(args.summary, "a") as f:
            f.write(line + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
