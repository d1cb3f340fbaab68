"""The lab report's comparisons as named experiment sets: train every configuration over several seeds,
test each run, and compare them, in one command.

    python experiments.py --list                          # the sets and their flags
    python experiments.py annealing                       # monotonic vs cyclical KL annealing, 2 seeds each
    python experiments.py lr --seeds 3                    # seeds 1..3
    python experiments.py teacher_forcing --niter 4       # other flags (after the set name) go to training
    python experiments.py extras --jobs 2 --n_samples 20  # FiLM, CondConv, latent levels; 2 runs at once; best of 20

Every configuration starts from demo.py's `demo_plain` recipe (the course's model, CPU-sized, 300 iterations) on the
simulated data (generated into --data_root when absent, as demo.py does), adds the set's flags, then
the extra flags given here (which win). Each run trains with train_fixed_prior.py, is scored with
test.py (real and shuffled conditions; with --n_samples N also the best of N prior samples; with --fvd also
FVD), and the
set ends with compare.py. --jobs N trains N runs at a time, each in its own process. Runs land in
    <log_dir>/<set>/<configuration>/seed<k>/<run name>/
and the comparison in <log_dir>/<set>/compare.{png,md,csv}.

Re-running the same command skips finished runs (last.pth at epoch == --niter and both tests written),
resumes interrupted ones (train_fixed_prior.py --model_dir RUN) and tests runs that lack a test. A
configuration that another set has already trained with the same flags and seed (the sets share their
base) is linked from there instead of trained again.
"""
import runtime  # first: sets the OpenMP wait policy before torch loads

import argparse
import glob
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch

import compare
from checkpoints import write_json
import demo
import make_sim_dataset
import test as test_script
import train_fixed_prior as train

# Each set: what it asks, and its configurations as (label, train_fixed_prior.py flags added to the base).
# Labels are the flag that tells the configurations apart, as compare.py labels them; they name the
# directories. The repository's --beta default is 1.0 (the course's maximum KL weight; the sample's own
# default 1e-4 is unused by it), so every set anneals to 1.
SETS = {
    "annealing": {
        "about": "monotonic vs cyclical KL annealing (the course's ratio 0.5 and 3 cycles; KL weight up to --beta 1)",
        "configs": [
            ("kl_anneal_cyclical=False", ["--kl_anneal_ratio", "0.5", "--kl_anneal_cycle", "3"]),
            ("kl_anneal_cyclical=True", ["--kl_anneal_cyclical", "--kl_anneal_ratio", "0.5", "--kl_anneal_cycle", "3"]),
        ]},
    "teacher_forcing": {
        # The report decays by 0.01 per epoch from epoch 20 of 300 down to 0. At the demo's 6 epochs that
        # would never move, so the decay starts at once and reaches 0 two epochs before the end:
        # epochs 0..5 train with ratios 1.0, 0.75, 0.5, 0.25, 0.0, 0.0.
        "about": "teacher forcing 1.0 throughout vs decaying 0.25 per epoch from the first epoch to 0",
        "configs": [
            ("tfr_decay_step=0.0", ["--tfr", "1.0", "--tfr_decay_step", "0"]),
            ("tfr_decay_step=0.25", ["--tfr", "1.0", "--tfr_start_decay_epoch", "0", "--tfr_decay_step", "0.25",
                                     "--tfr_lower_bound", "0"]),
        ]},
    "lr": {
        "about": "learning rate 0.002 (the sample's default) vs 0.01",
        "configs": [
            ("lr=0.002", ["--lr", "0.002"]),
            ("lr=0.01", ["--lr", "0.01"]),
        ]},
    "prior": {
        # SVG's KL weight for both: at the course's beta 1 the latent of either prior collapses (README,
        # "Stochastic predictions"), and there would be nothing to compare.
        "about": "fixed prior N(0, I) vs a learned prior (SVG-LP), both at SVG's beta 1e-4",
        "configs": [
            ("prior=fixed", ["--beta", "1e-4"]),
            ("prior=learned", ["--prior", "learned", "--beta", "1e-4"]),
        ]},
    "extras": {
        # SVG's KL weight for every configuration: at the course's beta 1 the KL drives every latent level
        # to its prior and the levels could not differ. Equal wall-clock training rather than equal steps:
        # each configuration's --epoch_size (base 50, 6 epochs) is scaled by the base's seconds per
        # iteration over its own, measured on one thread at the demo width (base 2.22 s, FiLM 2.33,
        # CondConv 3.30, 2 levels 2.50, 3 levels 2.76; docs/experiments.md). The baseline is the prior
        # set's fixed-prior run, linked when that set has run.
        "about": "FiLM, CondConv and spatial latent levels against the base, at equal training time (beta 1e-4)",
        "configs": [
            ("baseline", ["--beta", "1e-4"]),
            ("cond_conv=film", ["--cond_conv", "film", "--beta", "1e-4", "--epoch_size", "48"]),
            ("cond_conv=condconv", ["--cond_conv", "condconv", "--beta", "1e-4", "--epoch_size", "34"]),
            ("latent_levels=2", ["--latent_levels", "2", "--beta", "1e-4", "--epoch_size", "44"]),
            ("latent_levels=3", ["--latent_levels", "3", "--beta", "1e-4", "--epoch_size", "40"]),
        ]},
}
BASE = "demo_plain"  # demo.RECIPES key every configuration starts from: the course's model at the demo's scale


def get_args_parser():
    p = argparse.ArgumentParser("Named experiment sets: train over seeds, test, compare",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Flags after the set name that are not listed here go to train_fixed_prior.py "
                                       "(and win over the base recipe and the set's flags).")
    p.add_argument("set", nargs="?", choices=sorted(SETS), help="experiment set to run")
    p.add_argument("--list", action="store_true", help="print the sets, their configurations and flags, then exit")
    p.add_argument("--seeds", type=int, default=2, help="runs per configuration, with seeds 1..N")
    p.add_argument("--data_root", default="./data/sim_data", help="simulated data set (generated when absent)")
    p.add_argument("--log_dir", default="./logs/experiments",
                   help="runs go to <log_dir>/<set>/<configuration>/seed<k>/")
    p.add_argument("--n_train", type=int, default=2000, help="training sequences to simulate when generating")
    p.add_argument("--sim_workers", type=int, default=os.cpu_count(), help="processes simulating the data set")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each in its own process with cpu_count // jobs threads "
                        "(its output in its seed directory's log.txt)")
    p.add_argument("--n_samples", type=int, default=1,
                   help="also test each run with N prior samples per sequence (test.py --n_samples; best of N "
                        "and the spread across samples join the table); 1: the graded test only")
    p.add_argument("--fvd", action="store_true",
                   help="also FVD in each run's real-conditions test (test.py --fvd); the table carries it")
    p.add_argument("--spread", default="halfrange", choices=["halfrange", "std"], help="compare.py's --spread")
    return p


def _flag_value(argv, name):
    """Value of the last `--name v` or `--name=v` in argv (None when absent), as argparse would take it."""
    value = None
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def list_sets():
    lines = [f"base: demo.py --recipe {BASE}: {' '.join(demo.RECIPES[BASE])}"]
    for name, s in SETS.items():
        lines.append(f"\n{name}: {s['about']}")
        for label, flags in s["configs"]:
            lines.append(f"  {label:28s} {' '.join(flags) or '(base only)'}")
    return "\n".join(lines)


def find_run(seed_dir):
    """The run directory train_fixed_prior.py made inside seed_dir, or None before the first checkpoint."""
    found = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(glob.escape(seed_dir), "*", "last.pth")))
    if len(found) > 1:
        sys.exit(f"error: {seed_dir} holds several runs ({', '.join(found)}); keep one per seed directory")
    return found[0] if found else None


# compare.py's flags that change nothing a run computes, less the seed, the data and the device, which make
# another run of the same configuration: two runs whose other flags are equal are the same run.
SAME_RUN_IGNORES = compare.NOT_CONFIG - {"seed", "data_root", "device", "cuda"}


def _epoch(run):
    """Epochs finished by a run directory's last.pth."""
    return torch.load(os.path.join(run, "last.pth"), map_location="cpu", weights_only=True)["epoch"]


def finished_twin(log_dir, set_dir, train_argv, niter):
    """A finished run of another set under log_dir trained with the same flags as train_argv (the flags in
    SAME_RUN_IGNORES aside): several sets share their base configuration, which need not train twice.
    Returns its directory, or None."""
    parser = train.get_args_parser()
    args = parser.parse_args(train_argv)
    # runs save the resolved precision; auto resolves by a measurement on a CPU with bf16 units, so there a
    # finished run in either precision is what auto could have trained
    device = runtime.choose_device(args.device)
    amps = {runtime.resolve_amp(args.amp, device)}
    if args.amp == "auto" and device.type == "cpu":
        amps.add("off")
    want = {k: v for k, v in vars(args).items() if k not in SAME_RUN_IGNORES | {"amp"}}
    pattern = os.path.join(glob.escape(log_dir), "*", "*", "seed*", "*", "train_record.txt")
    for record in sorted(glob.glob(pattern)):
        run = os.path.dirname(record)
        if os.path.islink(run) or run.startswith(set_dir + os.sep):
            continue
        try:
            saved = train.with_defaults(parser, compare.read_record(record)[0])
        except compare.NotARun:
            continue
        if all(saved.get(k) == v for k, v in want.items()) and saved.get("amp") in amps \
                and os.path.isfile(os.path.join(run, "last.pth")) \
                and _epoch(run) >= niter:
            return run
    return None


def tests_needed(run, n_samples=1, fvd=False):
    """Test modes whose metrics.json is missing or older than the checkpoint it scores; with n_samples > 1
    also "samples" (test.py --n_samples) when missing, older, or made with another number of samples; with
    fvd, "real" when its test has no FVD."""
    best = os.path.join(run, "model.pth")
    need = []
    for mode, sub in {**compare.TESTS, **({"samples": compare.SAMPLES} if n_samples > 1 else {})}.items():
        m = os.path.join(run, sub, "metrics.json")
        if not os.path.isfile(m) or (os.path.isfile(best) and os.path.getmtime(best) > os.path.getmtime(m)):
            need.append(mode)
        elif mode == "samples" or (mode == "real" and fvd):
            with open(m) as f:
                m = json.load(f)
            if (mode == "samples" and m.get("n_samples") != n_samples) or (mode == "real" and "fvd" not in m):
                need.append(mode)
    return need


def run_job(job):
    """Train (or link, resume, skip) one run of a set and test it; returns its record for the set, with the
    progress line in "line" and status "stopped" when a signal interrupted the training."""
    seed_dir, argv_train = job["seed_dir"], job["argv_train"]
    niter = int(_flag_value(argv_train, "--niter"))
    run = find_run(seed_dir)
    what = []
    if run is None:
        twin = finished_twin(job["log_dir"], job["set_dir"], argv_train, niter)
        if twin is not None:  # linked, so the set's directory holds every run and the next call finds it
            os.makedirs(seed_dir, exist_ok=True)
            run = os.path.join(seed_dir, os.path.basename(twin))
            os.symlink(os.path.relpath(twin, seed_dir), run, target_is_directory=True)
            what.append(f"the same run as {os.path.relpath(twin, job['log_dir'])} (linked, not retrained)")
    epoch = _epoch(run) if run else 0
    if run is None or epoch < niter:
        if run is not None:
            what.append(f"resumed at epoch {epoch}")
            argv_train = argv_train + ["--model_dir", run]
        run = train.main(argv_train)
        if run is None:  # stopped by a signal; last.pth is saved and the next call resumes
            return {"label": job["label"], "seed": job["seed"], "status": "stopped",
                    "line": f"{job['tag']}: stopped; re-run the same command to resume"}
    need = tests_needed(run, job["n_samples"], job["fvd"])
    for mode in need:
        if mode == "samples":
            test_script.main(["--model_dir", run, "--n_samples", str(job["n_samples"]),
                              "--out", os.path.join(run, compare.SAMPLES)] + job["test_extra"])
        else:
            test_script.main(["--model_dir", run, "--cond_mode", mode] + job["test_extra"]
                             + (["--fvd"] if mode == "real" and job["fvd"] else []))
    if epoch >= niter and not need and not what:
        what.append("skipped (finished)")
    elif epoch >= niter and need:
        what.append("tested only (training was finished)")
    loaded = compare.load_run(run)
    trained, tests = loaded["train_seconds"], loaded["tests"]
    real = tests.get("real", {})
    return {"label": job["label"], "seed": job["seed"], "run": run, "status": what[0] if what else "trained",
            "epoch_before": epoch, "train_seconds": trained,
            "test_seconds": sum(t.get("seconds", 0.0) for t in tests.values()),
            "line": f"{job['tag']}: {', '.join(what + [f'trained {trained:.0f} s'])}, "
                    f"test {real.get('psnr', float('nan')):.2f} dB"}


def _run_job_logged(job, threads):
    """run_job in a worker process: `threads` torch threads, its output (progress bars included) appended
    to <seed_dir>/log.txt rather than interleaved with the other runs' on the terminal."""
    torch.set_num_threads(threads)
    os.makedirs(job["seed_dir"], exist_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(os.path.join(job["seed_dir"], "log.txt"), "a") as log:
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        try:
            return run_job(job)
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


def threads_per_run(n):
    """Torch threads of each run when n run at a time: this process's own with one, cpu_count // n else."""
    return torch.get_num_threads() if n == 1 else max(1, (os.cpu_count() or 1) // n)


def run_parallel(jobs, n):
    """The set's runs, n at a time, each in its own process with threads_per_run(n) threads: small models
    use one thread better than two (docs/experiments.md, "Time"). Returns their records in job order;
    exits, once the running ones have saved, when a run was stopped."""
    threads = threads_per_run(n)
    print(f"[experiments] {len(jobs)} runs, {n} at a time with {threads} thread(s) each; "
          f"each run's output goes to its seed directory's log.txt", flush=True)
    done = [None] * len(jobs)
    # spawn, not fork: a forked child would inherit this process's OpenMP thread pool in an unusable state.
    with ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run_job_logged, job, threads): i for i, job in enumerate(jobs)}
        try:
            for f in as_completed(futures):
                done[futures[f]] = d = f.result()
                print(d["line"], flush=True)
        except KeyboardInterrupt:  # the workers got the signal too: each saves its last.pth, then returns
            pool.shutdown(wait=True, cancel_futures=True)
            sys.exit("[experiments] stopped; re-run the same command to resume")
    stopped = [d["line"] for d in done if d["status"] == "stopped"]
    if stopped:
        sys.exit("\n".join(stopped))
    return done


def main(argv=None):
    parser = get_args_parser()
    args, extra = parser.parse_known_args(argv)
    if args.list:
        print(list_sets())
        return None
    if args.set is None:
        parser.error("name an experiment set (see --list); training flags go after it")
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: must be >= 1")
    if args.jobs < 1 or args.n_samples < 1:
        parser.error(f"--jobs {args.jobs}, --n_samples {args.n_samples}: both must be >= 1")
    spec = SETS[args.set]
    set_dir = os.path.join(args.log_dir, args.set)

    # Refuse flags train_fixed_prior.py does not know before anything trains, rather than after the
    # first configuration has run for minutes.
    train_parser = train.get_args_parser()
    for label, flags in spec["configs"]:
        _, unknown = train_parser.parse_known_args(demo.RECIPES[BASE] + flags + extra)
        if unknown:
            sys.exit(f"error: set '{args.set}', configuration {label}: train_fixed_prior.py does not accept "
                     f"{' '.join(unknown)} (no such flag)")

    if not all(os.path.isdir(os.path.join(args.data_root, s)) for s in ("train", "validate", "test")):
        print(f"[experiments] simulating the data set into {args.data_root} (once)")
        make_sim_dataset.generate(args.data_root, n_train=args.n_train, workers=args.sim_workers,
                                  overwrite=os.path.isdir(os.path.join(args.data_root, "train")))
    # test.py reads the data the run was trained on; give it the same cache location.
    test_extra = []
    if _flag_value(extra, "--cache_dir"):
        test_extra += ["--cache_dir", _flag_value(extra, "--cache_dir")]
    if "--no_cache" in extra:
        test_extra.append("--no_cache")

    t_start = time.perf_counter()
    runs = [(label, flags, seed) for label, flags in spec["configs"] for seed in range(1, args.seeds + 1)]
    jobs = []
    for n, (label, flags, seed) in enumerate(runs, 1):
        seed_dir = os.path.join(set_dir, label, f"seed{seed}")
        argv_train = demo.RECIPES[BASE] + flags + ["--data_root", args.data_root, "--log_dir", seed_dir,
                                                   "--seed", str(seed)] + extra
        jobs.append({"tag": f"[{args.set} {n}/{len(runs)}] {label} seed={seed}", "label": label, "seed": seed,
                     "seed_dir": seed_dir, "argv_train": argv_train, "log_dir": args.log_dir, "set_dir": set_dir,
                     "test_extra": test_extra, "n_samples": args.n_samples, "fvd": args.fvd})

    if args.jobs == 1:
        done = []
        for job in jobs:
            d = run_job(job)
            print(d["line"], flush=True)
            if d["status"] == "stopped":
                sys.exit(d["line"])
            done.append(d)
    else:
        done = run_parallel(jobs, args.jobs)

    result = compare.main([d["run"] for d in done] + ["--out", set_dir, "--title", f"{args.set}: {spec['about']}",
                                                      "--spread", args.spread])
    # Wall-clock of this call, and the time the set's runs took wherever they were made (training epochs
    # plus tests; validation, start-up and data caching are outside it), so a resumed set still tells.
    timing = {"wall_seconds_this_call": round(time.perf_counter() - t_start, 1),
              "train_seconds": round(sum(d["train_seconds"] for d in done), 1),
              "test_seconds": round(sum(d["test_seconds"] for d in done), 1),
              "jobs": args.jobs, "threads": threads_per_run(args.jobs), "runs": len(done)}
    write_json(os.path.join(set_dir, "timing.json"), timing)
    print(f"[{args.set}] {len(done)} runs; this call {timing['wall_seconds_this_call'] / 60:.1f} min wall-clock "
          f"({timing['jobs']} run(s) at a time, {timing['threads']} thread(s) each); the runs' training "
          f"{timing['train_seconds'] / 60:.1f} min + tests {timing['test_seconds'] / 60:.1f} min -> {set_dir}",
          flush=True)
    return {"runs": done, "compare": result, "out": set_dir, "timing": timing}


if __name__ == "__main__":
    main()
