"""Benchmark every fast path of the pipeline against its reference, in one run, on this machine.

    python bench.py                                  # full run (11-17 min on 2 CPU cores), writes bench.json
    python bench.py --quick                          # reduced sizes (~2 min): a smoke test, not the headline
    python bench.py --data_root data/processed_data  # use a real data set instead of a generated one
    OMP_WAIT_POLICY=PASSIVE python bench.py          # sleeping OpenMP threads (default: as the scripts, runtime.py)

Measured, each fast path next to its reference (median of repeats after warm-up, time.perf_counter):
 1. loader: decoded memory-mapped cache vs PNG decoding (`no_cache`), same split and items, tensors compared;
    and whether one loader process outpaces what a training step at batch 12 consumes.
 2. training step at full width (forward + loss + backward + Adam): the per-step fp32 rollout as SVG's code and
    the course's sample run it (the reference) vs the plain CVAE.forward (per step), the batched rollout in
    fp32, channels_last, and bf16 autocast.
 3. model FLOP/s (torch.utils.flop_counter on the meta device) against this machine's measured peak
    (a large convolution and a large matmul) of the same precision.
 4. the graded evaluation (`evaluation.evaluate`, n_past 2, n_future 10) scaled to the 256 test sequences, with the
    direct convolution algorithm and with the Winograd algorithms where they pay (`models.fast.conv3x3`).
 5. batched PSNR/SSIM (`metrics.batch_metrics`, eager and torch.compile'd) vs the per-channel `utils.finn_eval_seq`.
 6. on paper: FLOPs of the course schedule and its time on one modern GPU at the fraction of peak achieved here.
 7. the demo/long recipes' iteration (width 8, batch 4, FiLM, weight average) and the full-width one (batch 12):
    the current training step against the step as the loop ran it before (the same function, tests/test_train.py),
    in alternating rounds of one run; FLOP/s against the peak; where the time goes (torch.profiler self time by
    category: convolutions, BatchNorm/activations, LSTM cells, optimizer, Python and dispatch overhead); the
    step with its clip encoder and decoder torch.compile'd, and on CUDA the whole step as one CUDA graph.
 8. roofline: every convolution shape of those steps, forward and forward + backward, timed alone at the
    step's batch, per precision, against the large-kernel peak. `--only_steps`: sections 0, 7 and 8 alone.
Without --data_root a small data set is generated in a temporary directory (make_sim_dataset.py when present,
random PNG/CSV files otherwise). Where a figure is extrapolated (a subset scaled up, a smaller batch scaled by
its FLOP count) the table and bench.json say so.
"""
import runtime  # first, as in the entry points: sets the OpenMP wait policy before torch loads

import argparse
import functools
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from collections import namedtuple
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import evaluation
import metrics
import utils
from dataset import bair_robot_pushing_dataset
from models import CVAE, fast, kl_divergence

N_PAST, N_FUTURE = 2, 10
T = N_PAST + N_FUTURE  # frames per training clip
COURSE_ITERS = 300 * 600  # --niter x --epoch_size of the course schedule
GPU = {"name": "NVIDIA A100 SXM (dense, no sparsity)", "fp32": 19.5e12, "bf16": 312e12}  # assumed peaks, FLOP/s

# name -> (rollout batched, amp, channels_last, SVG decoder). The reference is the rollout as SVG's code
# and the course's sample code run it: one frame at a time, skips concatenated at every decoder step.
Config = namedtuple("Config", "batched amp channels_last svg")
TRAIN_CONFIGS = {
    "fp32 per-step SVG": Config(False, "off", False, True),  # the reference
    "fp32 per-step": Config(False, "off", False, False),  # the plain CVAE.forward: one frame at a time, each
    # frame encoded once, the decoder concatenating the skips (the reference the fast paths are tested against)
    "fp32 batched": Config(True, "off", False, False),
    "fp32 batched CL": Config(True, "off", True, False),
    "bf16 batched": Config(True, "bf16", False, False),
    "bf16 batched CL": Config(True, "bf16", True, False),
}
REFERENCE = "fp32 per-step SVG"


def make_model(config, device):
    """The full-width model of a TRAIN_CONFIGS entry."""
    model = CVAE().to(device)
    return model.to(memory_format=torch.channels_last) if TRAIN_CONFIGS[config].channels_last else model


def svg_forward(model, frames, conds, n_past):
    """A teacher-forced training forward as SVG's code and the course sample run it: at every step the input
    frame and the posterior's target are encoded in separate calls (so frames 1..T-2 are encoded twice).
    The same model and losses as CVAE.forward (tests/test_models.py)."""
    B, T = frames.shape[:2]
    c = model.embed_conditions(conds, B, T)  # (B, T-1, E)
    noise = torch.randn(B, T - 1, model.z_dim, device=frames.device)
    state_p = state_q = skips = None
    mse = kld = 0
    for t in range(1, T):
        h, sk = model.encoder(frames[:, t - 1])  # (B, g)
        skips = sk if t - 1 < n_past else skips
        h_target = model.encoder(frames[:, t])[0]
        z, mu, logvar, state_q = model.posterior(h_target, state_q, noise[:, t - 1])
        g, state_p = model.frame_predictor(torch.cat([h, z, c[:, t - 1]], 1), state_p)
        pred = model.decoder(g, skips)  # (B, C, H, W)
        mse = mse + (pred - frames[:, t]).pow(2).mean()
        kld = kld + kl_divergence(mu, logvar).sum(1).mean()
    return {"mse": mse, "kld": kld}


def training_forward(config, model, frames, conds):
    """The training forward of a TRAIN_CONFIGS entry (teacher forcing, posterior z)."""
    if TRAIN_CONFIGS[config].svg:
        return svg_forward(model, frames, conds, N_PAST)
    return model(frames, conds, N_PAST, teacher_forcing=True, batched=TRAIN_CONFIGS[config].batched)


# What each mode measures. train: (batch, warm-up steps, timed steps, configs or None for all fp32 ones);
# 'best fp32' is the fastest fp32 configuration of the first batch size.
PLANS = {
    "full": dict(data=(64, 32, 32), cache_reads=2000, png_reads=60, headline_batch=12,
                 train=[(12, 1, 3, None), (24, 0, 1, (REFERENCE, "best fp32"))],
                 bf16=("bf16 batched", "bf16 batched CL"), eval_seqs=32,
                 eval_configs=((32, False, "direct"), (32, False, "rule"), (32, False, "auto"), (32, False, "auto cached"),
                               (32, False, "direct"), (32, False, "rule"), (32, False, "auto"), (32, False, "auto cached")),
                 metric_seqs=256, metric_repeats=3, finn_seqs=16, conv_repeats=3,
                 recipe_rounds={"demo/long recipe (width 8, batch 4, FiLM, EMA)": (5, 3), "full width (batch 12)": (2, 1)}),
    "quick": dict(data=(16, 8, 16), cache_reads=500, png_reads=20, headline_batch=2,
                  train=[(2, 1, 2, None)], bf16=("bf16 batched CL",), eval_seqs=16,
                  eval_configs=((16, False, "direct"), (16, False, "rule"), (16, False, "auto"), (16, False, "auto cached")),
                  metric_seqs=32, metric_repeats=3, finn_seqs=4, conv_repeats=2,
                  recipe_rounds={"demo/long recipe (width 8, batch 4, FiLM, EMA)": (3, 2), "full width (batch 12)": (0, 0)}),
}


def get_args_parser():
    p = argparse.ArgumentParser("Benchmark the fast paths against their references",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_root", default="",
                   help="lab-layout data set to read; empty: generate a small one in a temp dir")
    p.add_argument("--quick", action="store_true", help="reduced sizes (~2 min): smoke test, figures not the headline")
    p.add_argument("--out", default="bench.json", help="where to write all figures and the machine info")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--profile", action="store_true", help="also profile one fp32 batched step and print its top ops")
    p.add_argument("--only_steps", action="store_true",
                   help="only the peak, the recipes' iterations (before vs after, where the time goes) and the "
                        "roofline of the model's own convolutions (sections 0, 7, 8)")
    p.add_argument("--eval_seqs", type=int, default=0,
                   help="test sequences the evaluation section times (0: the mode's, 32 full / 16 quick, scaled to 256); "
                        "256 times the whole graded evaluation, the online part of --conv_algorithms auto included unscaled")
    p.add_argument("--only_eval", action="store_true",
                   help="only the peak and the full-width evaluation with each choice of inference convolution "
                        "algorithms: direct, the fixed rule, measured on this host (sections 0 and 4)")
    return p


# ----------------------------------------------------------------------------------------------------
# Helpers
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup=1, repeats=3):
    """Median wall time of fn() over `repeats` calls after `warmup` calls, and every timed call."""
    for _ in range(warmup):
        fn()
        sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


class CpuMonitor:
    """CPU time used by other processes (and hypervisor steal) between laps, from Linux /proc/stat.

    Two cores shared with anything else make every timing here slower, and the many small ops of the
    per-step rollout slower still (an OpenMP region waits for its slowest thread), so each section
    reports how many cores other processes kept busy while it ran."""

    def __init__(self):
        self.last = self.snap()

    @staticmethod
    def snap():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            busy = (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait, incl. steal
        except (OSError, ValueError):
            busy = None
        return time.perf_counter(), busy, sum(os.times()[:4])

    def lap(self):
        """Average number of cores busy with other work since the last lap (None when unknown)."""
        (w0, b0, o0), (w1, b1, o1) = self.last, self.snap()
        self.last = (w1, b1, o1)
        if b0 is None or b1 is None or w1 <= w0:
            return None
        return max(0.0, ((b1 - b0) - (o1 - o0)) / (w1 - w0))


def machine_info(device):
    model, flags = runtime.cpu_info()
    return {
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cpu": model, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": {f: f in flags for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")},
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "openmp_wait": runtime.OPENMP_WAIT, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def native_bf16(device, info):
    return device.type == "cuda" or info["cpu_flags"]["avx512_bf16"] or info["cpu_flags"]["amx_bf16"]


def fmt(x, unit=""):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    mag = abs(x)
    s = f"{x:.3g}" if mag < 1000 else f"{x:,.0f}"
    return s + unit


def make_dataset(root, counts):
    """A small lab-layout data set: the simulator when present, random PNG/CSV files otherwise."""
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isfile(os.path.join(here, "make_sim_dataset.py")):
        from make_sim_dataset import generate
        generate(root, *counts, seed=0, workers=os.cpu_count(), progress=False)
        return "make_sim_dataset.generate"
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "validate", "test"), counts):
        for k in range(n):
            d = os.path.join(root, split, "traj_0_to_255.tfrecords", str(k))
            os.makedirs(d)
            for i in range(30):
                Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(os.path.join(d, f"{i}.png"))
            np.savetxt(os.path.join(d, "actions.csv"), rng.normal(size=(30, 4)), delimiter=",")
            np.savetxt(os.path.join(d, "endeffector_positions.csv"), rng.normal(size=(30, 3)), delimiter=",")
    return "random PNG/CSV (incompressible frames: PNG decoding slower than on real data)"


def dataset_args(data_root, cache_dir, no_cache=False, n_eval=30):
    return SimpleNamespace(data_root=data_root, n_past=N_PAST, n_future=N_FUTURE, n_eval=n_eval, no_cache=no_cache,
                           cache_dir=cache_dir, skip_bad_sequences=False, num_workers=0, quiet=True)


def count_flops(B, config, train=True, steps=T):
    """FLOPs of one forward (+ backward when train) of the full-width model of a TRAIN_CONFIGS entry at
    batch B (counted ops are convolutions and matmuls, all linear in B, so one batch of 2 is counted and
    scaled; the Adam update and elementwise ops are not counted). Evaluation (train=False) runs the graded
    rollout as evaluation.evaluate does: per step, without teacher forcing, decoding the predicted frames only;
    counted as direct convolutions (the Winograd paths do fewer multiplications for the same map)."""
    return B * _count_flops_b2(config, train, steps) // 2


@functools.lru_cache(maxsize=None)
def _count_flops_b2(config, train, steps):
    model = make_model(config, "meta")  # shapes only: nothing is computed
    frames = torch.empty(2, steps, 3, 64, 64, device="meta")  # 2: BatchNorm refuses a single value in training
    conds = torch.empty(2, steps, 7, device="meta")
    noise = torch.empty(2, steps - 1, model.z_dim, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        if train:
            out = training_forward(config, model, frames, conds)
            (out["mse"] + out["kld"]).backward()
        else:
            model.eval()
            with torch.no_grad():
                fast.predict(model, frames, conds, N_PAST, N_FUTURE, noise)
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------------
# 1. Loader
CPU = torch.device("cpu")


def bench_loader(data_root, cache_dir, plan):
    t0 = time.perf_counter()
    cached = bair_robot_pushing_dataset(dataset_args(data_root, cache_dir), "train")
    build_s = time.perf_counter() - t0
    png = bair_robot_pushing_dataset(dataset_args(data_root, cache_dir, no_cache=True), "train")
    n = len(cached)

    def read(ds, count):
        return lambda: [ds[i % n] for i in range(count)]

    read(cached, n)(), read(png, min(n, 8))()  # page the memory map in; warm PIL up
    # Rounds alternate between the two paths, so a slow spell of the host slows both, not one.
    rounds = [(plan["cache_reads"] / timed(read(cached, plan["cache_reads"]), CPU, warmup=0, repeats=1)[0],
               plan["png_reads"] / timed(read(png, plan["png_reads"]), CPU, warmup=0, repeats=1)[0])
              for _ in range(5)]  # (cache seq/s, PNG seq/s) per round
    identical = all(torch.equal(a, b) for i in range(min(n, plan["png_reads"])) for a, b in zip(cached[i], png[i]))
    return {"split": "train", "sequences": n, "frames_per_item": cached.seq_len, "cache_build_s": build_s,
            "cache_seq_per_s": statistics.median(c for c, _ in rounds),
            "png_seq_per_s": statistics.median(p for _, p in rounds),
            "round_ratios": [c / p for c, p in rounds],
            "cache_reads": plan["cache_reads"], "png_reads": plan["png_reads"], "identical": identical}


# ----------------------------------------------------------------------------------------------------
# 2. Training step
def train_step_seconds(config, B, device, warmup, repeats, steps=T):
    amp = TRAIN_CONFIGS[config].amp
    torch.manual_seed(0)
    model = make_model(config, device)
    opt = torch.optim.Adam(model.parameters(), lr=0.002, betas=(0.9, 0.999), fused=True)  # as train_fixed_prior.py
    frames = torch.rand(B, steps, 3, 64, 64, device=device)
    conds = torch.randn(B, steps, 7, device=device)

    def step():
        with runtime.autocast(device, amp):
            out = training_forward(config, model, frames, conds)
        loss = out["mse"] + 1.0 * out["kld"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sec, times = timed(step, device, warmup, repeats)
    del model, opt
    gc.collect()
    return sec, times


def bench_train(device, plan, bf16_native, log):
    """Seconds per training step of each configuration, keyed '<config> b<batch>'.

    bf16 runs at the headline batch when the hardware has bf16 units; otherwise (emulated, 7-19x slower
    than fp32 per step here) one step runs at batch 2 and is scaled to the headline batch by the FLOP count.
    """
    res = {}

    def record(name, B, probe_b, warmup, repeats):
        monitor = CpuMonitor()
        sec, times = train_step_seconds(name, probe_b, device, warmup, repeats)
        other = monitor.lap()
        probe_flops, flops = count_flops(probe_b, name), count_flops(B, name)
        res[f"{name} b{B}"] = {"config": name, "batch": B, "s": sec * flops / probe_flops, "flops": flops,
                               "probe_batch": probe_b, "probe_s": sec, "probe_flops": probe_flops, "times": times,
                               "warmup": warmup, "repeats": repeats, "other_processes_cores": other}
        log(f"  {name:16s} b{probe_b}: {sec:6.2f} s/step  {probe_flops / sec / 1e9:6.1f} GFLOP/s  "
            f"(timed: {', '.join(f'{t:.2f}' for t in times)}; other processes: "
            f"{'?' if other is None else f'{other:.1f}'} cores)")

    for B, warmup, repeats, only in plan["train"]:
        names = [n for n in TRAIN_CONFIGS if n.startswith("fp32")] if only is None else list(only)
        if "best fp32" in names:  # the fastest fp32 configuration of the first batch size
            b0 = plan["train"][0][0]
            fastest = min((r for r in res.values() if r["batch"] == b0 and r["config"].startswith("fp32")),
                          key=lambda r: r["s"])
            names[names.index("best fp32")] = fastest["config"]
            names = list(dict.fromkeys(names))  # the reference may itself be the fastest
        for name in names:
            record(name, B, B, warmup, repeats)
    B = plan["headline_batch"]
    for name in plan["bf16"]:
        # Batch 2 is the least training can run: BatchNorm needs two values per channel at every step.
        record(name, B, *((B, 1, 1) if bf16_native else (2, 0, 1)))
    return res


# ----------------------------------------------------------------------------------------------------
# 3. Peak FLOP/s
def bench_peak(device, bf16_native):
    """Best FLOP/s of a large 3x3 convolution (both memory formats) and a large matmul, per precision.

    A peak is a best case: the fastest repeat counts (main() also measures twice and keeps the higher)."""
    res = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        slow = dtype == torch.bfloat16 and not bf16_native  # emulated bf16 is 7-19x slower: keep it small
        N, n_mm, repeats = (2, 512, 1) if slow else (32, 2048, 5)
        x = torch.randn(N, 256, 32, 32, device=device, dtype=dtype)
        w = torch.randn(256, 256, 3, 3, device=device, dtype=dtype)
        a = torch.randn(n_mm, n_mm, device=device, dtype=dtype)
        kernels = {}
        with torch.no_grad():
            for mf_name, mf in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
                xm, wm = x.contiguous(memory_format=mf), w.contiguous(memory_format=mf)
                _, times = timed(lambda: torch.nn.functional.conv2d(xm, wm, padding=1), device, 1, repeats)
                s = min(times)
                kernels[f"conv3x3 ({N},256,32,32)x(256,256,3,3) {mf_name}"] = 2 * N * 256 * 32 * 32 * 256 * 9 / s
            _, times = timed(lambda: a @ a, device, 1, repeats)
            s = min(times)
            kernels[f"matmul {n_mm}x{n_mm}x{n_mm}"] = 2 * n_mm ** 3 / s
        res[name] = {"peak": max(kernels.values()), "kernels": kernels}
    return res


def merge_peaks(a, b):
    """Kernel by kernel, the higher of two peak measurements (one at the start, one after training)."""
    out = {}
    for prec in a:
        kernels = {k: max(a[prec]["kernels"][k], b[prec]["kernels"][k]) for k in a[prec]["kernels"]}
        out[prec] = {"peak": max(kernels.values()), "kernels": kernels}
    return out


# ----------------------------------------------------------------------------------------------------
# 4. Evaluation
def bench_eval(data_root, cache_dir, device, plan, log):
    test = bair_robot_pushing_dataset(dataset_args(data_root, cache_dir, n_eval=0), "test")
    n = min(len(test), 256, plan["eval_seqs"])  # main() puts --eval_seqs here
    subset = torch.utils.data.Subset(test, range(n))
    res, user_cache = {}, evaluation.ALGORITHM_CACHE
    evaluation.ALGORITHM_CACHE = os.path.join(cache_dir, "conv_algorithms.json")  # starts empty
    for bs, channels_last, algorithms in plan["eval_configs"]:
        # direct: no Winograd; rule: models.fast._algorithm_rule (fixed, from an AVX2 host); auto: measured per
        # layer shape on this host (a screen at the start, then the evaluation's own first calls timed:
        # models.fast.OnlineChoice), the measurement inside the timed region; "auto cached": a later process on
        # this host, which reads that measurement from the cache file
        evaluation._MEASURED.clear()
        if algorithms == "auto" and os.path.exists(evaluation.ALGORITHM_CACHE):
            os.remove(evaluation.ALGORITHM_CACHE)  # each "auto" is a first evaluation on the machine
        torch.manual_seed(0)
        model = CVAE().to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.eval()
        with torch.no_grad():  # warm-up: the same batch shapes on a 3-frame clip, with every configuration's
            # kernels (direct, then the rule's), so that none pays the first calls of its kernels in the timed run
            b = min(bs, n)
            for warm in ({}, None):
                fast.set_inference_algorithms(warm)
                fast.predict(model, torch.rand(b, N_PAST, 3, 64, 64, device=device),
                             torch.zeros(b, 3, 7, device=device), N_PAST, 1)
        sync(device)
        t0 = time.perf_counter()
        out = evaluation.evaluate(model, subset, N_PAST, N_FUTURE, device, batch_size=bs,
                                  algorithms=algorithms.split()[0])
        sync(device)
        sec = time.perf_counter() - t0
        assert out["n_sequences"] == n
        name = f"eval bs{bs}" + (" CL" if channels_last else "") + f" {algorithms}"
        chosen = out["inference_algorithms"] if algorithms.startswith("auto") else None
        choose_s = out["inference_algorithms_s"]  # the screen and the timed calls' excess, once: not scaled
        s_256 = (sec - choose_s) * 256 / n + choose_s
        runs = res.get(name, {}).get("runs_s_256", []) + [s_256]  # a configuration listed again: best of its runs
        res[name] = {"batch_size": bs, "channels_last": channels_last, "algorithms": algorithms, "sequences_timed": n,
                     "s": sec, "s_256": min(runs), "runs_s_256": runs, "scaled_from": None if n == 256 else n,
                     "chosen": chosen, "choose_s": choose_s, "psnr": out["psnr"]}
        log(f"  {name}: {sec:.1f} s for {n} sequences ({choose_s:.1f} s of it choosing the algorithms) -> {s_256:.1f} s "
            f"for 256 (PSNR {out['psnr']:.5f})"
            + (f"; Winograd for {', '.join(f'{k} {v}' for k, v in chosen.items() if v != 'direct') or 'no layer'}"
               if chosen is not None else ""))
        del model
        gc.collect()
    fast.set_inference_algorithms(None)
    evaluation.ALGORITHM_CACHE = user_cache
    return res


# ----------------------------------------------------------------------------------------------------
# 5. Metrics
def bench_metrics(device, plan):
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(plan["metric_seqs"], N_FUTURE, 3, 64, 64, generator=g)
    pred = (gt + 0.1 * torch.randn(gt.shape, generator=g)).clamp(0, 1)
    gt, pred = gt.to(device), pred.to(device)
    res = {"shape": list(gt.shape)}
    for name, compiled in (("eager", False), ("compiled", True)):
        t0 = time.perf_counter()
        metrics.batch_metrics(gt[:2], pred[:2], compiled=compiled)  # warm-up; compiles the kernel once
        res[f"{name}_first_call_s"] = time.perf_counter() - t0
        res[f"{name}_s"], _ = timed(lambda: metrics.batch_metrics(gt, pred, compiled=compiled), device, warmup=0,
                                    repeats=plan["metric_repeats"])
        res[name] = [v.cpu().numpy() for v in metrics.batch_metrics(gt, pred, compiled=compiled)]  # psnr, ssim
    k = plan["finn_seqs"]
    gt_seq = [gt[:k, t].cpu() for t in range(N_FUTURE)]  # the sample's time-major list of (B, C, H, W)
    pred_seq = [pred[:k, t].cpu() for t in range(N_FUTURE)]
    t0 = time.perf_counter()
    _, ssim_ref, psnr_ref = utils.finn_eval_seq(gt_seq, pred_seq)  # each (k, T)
    finn_s = time.perf_counter() - t0
    for name in ("eager", "compiled"):
        psnr, ssim = res.pop(name)
        res[f"{name}_max_abs_diff"] = float(max(np.abs(psnr[:k] - psnr_ref).max(), np.abs(ssim[:k] - ssim_ref).max()))
    res.update(finn_s=finn_s, finn_sequences_timed=k, finn_s_scaled=finn_s * gt.shape[0] / k)
    return res


def profile_step(device, B, log):
    """Top ops (self time) of one fp32 batched training step."""
    from torch.profiler import ProfilerActivity, profile
    model = CVAE().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=0.002, fused=True)
    frames, conds = torch.rand(B, T, 3, 64, 64, device=device), torch.randn(B, T, 7, device=device)

    def step():
        out = model(frames, conds, N_PAST, teacher_forcing=True, batched=True)
        opt.zero_grad(set_to_none=True)
        (out["mse"] + out["kld"]).backward()
        opt.step()

    step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        sync(device)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    top = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
            "calls": e.count} for e in events[:12]]
    log(f"  fp32 batched step, batch {B}, self CPU time:")
    for r in top:
        log(f"  {r['op'][:44]:44s} {r['self_s']:7.2f} s  {100 * r['share']:5.1f}%  {r['calls']:5d} calls")
    return top


# ----------------------------------------------------------------------------------------------------
# 7. The recipes' training iteration: the current step against the step as the loop ran it before, in one run
RECIPE_MODELS = {  # demo.py's demo and long recipes share the model and batch (they differ in schedule only)
    "demo/long recipe (width 8, batch 4, FiLM, EMA)": (dict(base_channels=8, g_dim=64, z_dim=16, rnn_size=128,
                                                            cond_conv="film"), 4, True),
    "full width (batch 12)": ({}, 12, False),
}


def _step_closures(model_cfg, B, ema_on, device, amp):
    """Two training iterations of one model on one batch: "before", the loop as train_fixed_prior.py ran it
    before its device-side form (the LSTMs stepped cell by cell, the gradient norm clipped at infinity, the
    non-finite check and four losses read on the host every step, the weight average one lerp per tensor of
    a fresh state_dict), and "after", the current loop's step (one torch.lstm per LSTM, the norm alone, the
    skip decided on the device by fused Adam, the foreach average, the epoch sums kept on the device, and each
    convolution in the memory format measured faster here, --conv_layouts auto). The same function: the same
    losses, weights and average up to rounding (tests/test_train.py, tests/test_models.py). Each form trains
    its own copy of the same initial model; returns the two steps, the layout choice and "compiled": the
    "after" step of a third copy with the clip encoder and decoder torch.compile'd (train --compile), the
    compilation falling in its first call."""
    import copy
    import math
    import train_fixed_prior as tfp
    frames, conds = torch.rand(B, T, 3, 64, 64, device=device), torch.randn(B, T, 7, device=device)

    def setup():  # each form trains its own copy of the same initial model
        torch.manual_seed(0)
        model = CVAE(**model_cfg).to(device)
        ema = copy.deepcopy(model).requires_grad_(False) if ema_on else None
        return model, ema, torch.optim.Adam(model.parameters(), lr=0.002, betas=(0.9, 0.999), fused=True)

    model_b, ema_b, opt_b = setup()
    model, ema, opt = setup()
    t0 = time.perf_counter()  # the current loop's --conv_layouts auto, as train_fixed_prior.py measures it
    chosen, _ = fast.choose_conv_layouts(model, frames, conds, N_PAST, lambda: runtime.autocast(device, amp))
    layouts = {"channels_last": chosen, "choose_s": time.perf_counter() - t0}
    fast.set_conv_layouts(model, chosen)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    pairs = tfp.ema_tensors(ema, model) if ema_on else None
    sums = tfp.EpochSums({"loss": 0.0, "mse": 0.0, "kld": 0.0, "n": 0}, 1, device)

    def forward(model):
        with runtime.autocast(device, amp):
            out = model(frames, conds, N_PAST, teacher_forcing=True, batched=True)
        return out, out["mse"] + 1e-4 * out["kld"]

    def before():
        cells, fast._cells = fast._cells, fast._cells_per_step
        try:
            out, loss = forward(model_b)
        finally:
            fast._cells = cells
        opt_b.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model_b.parameters(), math.inf)
        bad, _ = tfp.agree([not (torch.isfinite(loss) and torch.isfinite(gnorm)), False], device, 1)
        if not bad:
            opt_b.step()
            if ema_b is not None:
                with torch.no_grad():
                    for a, b in zip(ema_b.state_dict().values(), model_b.state_dict().values()):
                        a.lerp_(b, 1 - 0.995) if a.is_floating_point() else a.copy_(b)
        out["kl_levels"].tolist(), loss.item(), out["mse"].item(), out["kld"].item()

    def make_after(model, ema, opt, pairs, sums):
        def after():
            out, loss = forward(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            bad = ~(torch.isfinite(loss) & torch.isfinite(gnorm))
            skip = tfp.optimizer_step(opt, scaler, bad)
            if ema is not None:
                tfp.update_ema(ema, model, 0.995, skip, pairs)
            sums.add(loss, out, bad, T)
        return after

    def another_after():  # the "after" step of a further copy of the same initial model, and its optimizer
        model_n, ema_n, opt_n = setup()
        fast.set_conv_layouts(model_n, chosen)
        return make_after(model_n, ema_n, opt_n, tfp.ema_tensors(ema_n, model_n) if ema_on else None,
                          tfp.EpochSums({"loss": 0.0, "mse": 0.0, "kld": 0.0, "n": 0}, 1, device)), opt_n

    eager_after, _ = another_after()
    compiled_parts = {}

    def compiled():  # fast.compile_rollout's form, swapped in for this model's steps only
        if not compiled_parts:
            compiled_parts.update(encode=torch.compile(fast.encode), decode=torch.compile(fast.decode))
        plain = fast.encode, fast.decode
        fast.encode, fast.decode = compiled_parts["encode"], compiled_parts["decode"]
        try:
            eager_after()
        finally:
            fast.encode, fast.decode = plain

    def graphed():  # the "after" step of a fourth copy captured in one CUDA graph (graph_step), on CUDA only
        return graph_step(*another_after(), device)

    return before, make_after(model, ema, opt, pairs, sums), layouts, compiled, graphed


def graph_step(step, opt, device, warmup=3):
    """step (a training iteration on fixed input tensors, as _step_closures makes them) captured in one CUDA
    graph: returns the graph's replay, which reruns every kernel of the step with one launch, so that a small
    model's thousands of kernel launches and the Python that issues them cost nothing per iteration. The
    usual whole-network capture (torch.cuda.graph): warm-up iterations on a side stream (cuDNN's algorithm
    search, the optimizer's state), the gradients set to None so that the captured backward allocates them
    from the graph's pool, the optimizer marked capturable (fused Adam keeps its step counts on the device
    already; the flag only passes its capture check). Random draws inside the step (the noise) advance on
    every replay. Where capture fails (an op that reads a value on the host, an unsupported kernel), the
    error is raised."""
    if device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    for group in opt.param_groups:
        group["capturable"] = True
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


# Profile categories: the first whose pattern occurs in an op's name (lower case) takes its self time.
OP_CATEGORIES = (
    ("convolutions", ("conv", "mkldnn_convolution", "nnpack")),
    ("LSTM cells", ("lstm", "rnn")),
    ("BatchNorm/activations", ("batch_norm", "leaky_relu", "tanh", "sigmoid", "max_pool", "threshold")),
    ("optimizer + weight average", ("adam", "lerp", "foreach", "norm")),
    ("matrix products (linear layers)", ("mm", "addmm", "linear", "bmm")),
    ("copies/casts/fills", ("copy", "fill", "zero", "clone", "cat", "stack", "contiguous", "to_copy", "empty")),
)


def profile_categories(fn, device, repeats=2):
    """Self time of fn()'s ops by category (OP_CATEGORIES; the rest "other ops"), with "Python and dispatch
    overhead" = wall time minus the ops' self time, and the top ops. On the CPU the ops' self time on the
    calling thread; on a GPU their kernels' device time (the host's time then is launch overhead)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync(device)
        wall = (time.perf_counter() - t0) / repeats
    own = (lambda e: getattr(e, "self_device_time_total", 0)) if device.type == "cuda" else \
        (lambda e: e.self_cpu_time_total)
    events = [e for e in prof.key_averages() if own(e) > 0]
    cats = {name: 0.0 for name, _ in OP_CATEGORIES}
    cats["other ops"] = 0.0
    for e in events:
        key = e.key.lower()
        name = next((n for n, pats in OP_CATEGORIES if any(p in key for p in pats)), "other ops")
        cats[name] += own(e) / 1e6 / repeats
    ops = sum(cats.values())
    cats["Python and dispatch overhead" if device.type == "cpu" else "device idle (launch and host overhead)"] = \
        max(0.0, wall - ops)
    top = sorted(events, key=lambda e: -own(e))[:8]
    return {"wall_s": wall, "categories_s": cats, "shares": {k: v / max(wall, ops) for k, v in cats.items()},
            "top_ops": [{"op": e.key, "self_s": own(e) / 1e6 / repeats, "calls": e.count // repeats} for e in top]}


def model_step_flops(model_cfg, B):
    """Counted FLOPs (convolutions and matmuls) of one batched training forward + backward of a CVAE(**model_cfg)."""
    model = CVAE(**model_cfg).to("meta")
    frames, conds = torch.empty(B, T, 3, 64, 64, device="meta"), torch.empty(B, T, 7, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(frames, conds, N_PAST, teacher_forcing=True, batched=True)
        (out["mse"] + out["kld"]).backward()
    return counter.get_total_flops()


def bench_recipes(device, plan, bf16_native, peak, log, save=None):
    """Each recipe model's iteration, "before" and "after" (_step_closures) in alternating rounds, the ratio,
    FLOP/s against the measured peak, and where the current step's time goes (profile_categories); on CUDA
    also the step as one CUDA graph (graph_step). save(results so far) after each configuration, so that a
    run stopped by a time limit keeps what it measured."""
    res = {}
    precisions = ["fp32"] + (["bf16"] if bf16_native else [])
    for name, (cfg, B, ema_on) in RECIPE_MODELS.items():
        rounds, steps = plan["recipe_rounds"][name]
        if rounds == 0:
            continue
        flops = model_step_flops(cfg, B)
        for prec in precisions:
            amp = "bf16" if prec == "bf16" else "off"
            before, after, layouts, compiled, graphed = _step_closures(cfg, B, ema_on, device, amp)
            before(), after()  # warm-up (first-call allocations, oneDNN primitive creation)
            graph = time_graphed(graphed, after, device, rounds, steps)
            comp = time_compiled(compiled, after, device, rounds, steps)
            times = alternating_rounds({"before": before, "after": after}, device, rounds, steps)
            s_b, s_a = statistics.median(times["before"]), statistics.median(times["after"])
            prof = profile_categories(after, device, repeats=max(1, steps // 2))
            rec = {"model": cfg, "batch": B, "ema": ema_on, "precision": prec, "before_s": s_b, "after_s": s_a,
                   "conv_layouts": layouts,
                   "ratio": s_b / s_a, "rounds": times, "flops": flops, "after_gflops": flops / s_a / 1e9,
                   "fraction_of_peak": flops / s_a / peak[prec]["peak"], "profile": prof, "compiled": comp,
                   "cuda_graph": graph}
            res[f"{name} {prec}"] = rec
            log(f"  {name} {prec}: before {s_b:.3f} s/it, after {s_a:.3f} s/it -> {s_b / s_a:.2f}x; "
                f"{flops / 1e9:.1f} GFLOP/it, {flops / s_a / 1e9:.1f} GFLOP/s = "
                f"{100 * rec['fraction_of_peak']:.0f}% of the {prec} peak {peak[prec]['peak'] / 1e9:.0f} GFLOP/s")
            if "error" in comp:
                log(f"    torch.compile'd encoder and decoder: failed ({comp['error']})")
            else:
                log(f"    torch.compile'd encoder and decoder: {comp['s']:.3f} s/it ({s_a / comp['s']:.2f}x the eager step in "
                    f"the same rounds), first call {comp['first_call_s']:.0f} s (compiling); "
                    + (f"repaid after {comp['break_even_iterations']:.0f} iterations" if comp["break_even_iterations"]
                       else "never repaid"))
            if "s" in graph:
                log(f"    the step as one CUDA graph: {graph['s']:.4f} s/it ({s_a / graph['s']:.2f}x the eager step in the "
                    f"same rounds), capture {graph['capture_s']:.1f} s")
            else:
                log(f"    the step as one CUDA graph: {graph.get('error') or graph.get('skipped')}")
            if save:
                save(res)
            log("    where the time goes: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in
                                                          sorted(prof["shares"].items(), key=lambda kv: -kv[1]) if v >= 0.005))
            log(f"    channels-last (measured here in {layouts['choose_s']:.1f} s): "
                f"{', '.join(layouts['channels_last']) or 'none'}")
            del before, after
            gc.collect()
    return res


def alternating_rounds(fns, device, rounds, steps):
    """{name: [seconds per call of each round]} of `rounds` rounds of `steps` calls of each fn in turn: a slow
    spell of a shared host slows all of them."""
    times = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            times[key].append((time.perf_counter() - t0) / steps)
    return times


def short_error(e):
    """An exception's type and the first line of its message, for a figure that could not be measured."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def time_compiled(compiled, eager, device, rounds, steps):
    """The torch.compile'd step against the eager one in alternating rounds (median s/it of each), its first
    call (the compilation, with the inductor's on-disk cache as this machine has it), and the iterations after
    which the compilation is repaid (None where the compiled step is not faster). {"error": ...} where
    compiling fails (no C++ compiler, an unsupported op)."""
    sync(device)
    t0 = time.perf_counter()
    try:
        compiled()
    except Exception as e:  # the eager figures stand without it
        return {"error": short_error(e)}
    sync(device)
    first = time.perf_counter() - t0
    compiled()  # the second call may still specialise (e.g. the first step's optimizer state)
    times = alternating_rounds({"compiled": compiled, "eager": eager}, device, rounds, steps)
    s_c, s_e = statistics.median(times["compiled"]), statistics.median(times["eager"])
    return {"s": s_c, "eager_s": s_e, "first_call_s": first, "rounds": times,
            "break_even_iterations": (first - s_c) / (s_e - s_c) if s_c < s_e else None}


def time_graphed(graphed, eager, device, rounds, steps):
    """The CUDA-graphed step (graph_step) against the eager one in alternating rounds (median s/it of each)
    and the seconds its warm-up and capture took; {"skipped": ...} off CUDA, {"error": ...} where the capture
    fails (the eager figures stand without it)."""
    if device.type != "cuda":
        return {"skipped": "CUDA graphs: CUDA only"}
    sync(device)
    t0 = time.perf_counter()
    try:
        replay = graphed()
        replay()
    except Exception as e:
        return {"error": short_error(e)}
    sync(device)
    capture = time.perf_counter() - t0
    times = alternating_rounds({"graph": replay, "eager": eager}, device, rounds, steps)
    return {"s": statistics.median(times["graph"]), "eager_s": statistics.median(times["eager"]),
            "capture_s": capture, "rounds": times}


# ----------------------------------------------------------------------------------------------------
# 8. Roofline of the model's own convolutions
def conv_shapes(model_cfg, B):
    """Every convolution of one batched training forward of CVAE(**model_cfg) at batch B: a list of
    ((input shape, weight shape, stride, padding, transposed, groups), calls), from a run on the meta device."""
    from torch.utils._python_dispatch import TorchDispatchMode
    seen = {}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default:
                x, w, _, stride, padding, _, transposed, _, groups = args
                key = (tuple(x.shape), tuple(w.shape), tuple(stride), tuple(padding), bool(transposed), groups)
                seen[key] = seen.get(key, 0) + 1
            return func(*args, **(kwargs or {}))

    model = CVAE(**model_cfg).to("meta")
    frames, conds = torch.empty(B, T, 3, 64, 64, device="meta"), torch.empty(B, T, 7, device="meta")
    with Record():
        model(frames, conds, N_PAST, teacher_forcing=True, batched=True)
    return list(seen.items())


def bench_conv_roofline(device, plan, bf16_native, peak, log):
    """Each convolution shape of each RECIPE_MODELS step, forward and forward + backward (input and weight
    gradients), timed alone at the step's batch, per precision: FLOP/s against the measured large-kernel peak,
    and the sum over the step's convolutions (the time the step would spend in them run alone)."""
    res = {}
    precisions = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if bf16_native else [])
    for name, (cfg, B, _) in RECIPE_MODELS.items():
        if plan["recipe_rounds"][name][0] == 0:
            continue
        shapes = conv_shapes(cfg, B)
        for prec, dtype in precisions:
            rows, tot = [], {"fwd_s": 0.0, "fwdbwd_s": 0.0, "fwd_flops": 0, "fwdbwd_flops": 0}
            for (xs, ws, stride, padding, transposed, groups), calls in shapes:
                x = torch.randn(xs, device=device, dtype=dtype, requires_grad=True)
                w = torch.randn(ws, device=device, dtype=dtype, requires_grad=True)
                conv = lambda: torch.convolution(x, w, None, stride, padding, (1, 1), transposed, (0, 0), groups)
                with torch.no_grad():
                    y = conv()
                g = torch.randn_like(y)
                counter = FlopCounterMode(display=False)
                with counter:
                    conv().backward(g)
                fb_flops = counter.get_total_flops()
                counter = FlopCounterMode(display=False)
                with counter, torch.no_grad():
                    conv()
                f_flops = counter.get_total_flops()

                def fwd():
                    with torch.no_grad():
                        conv()
                f_s = min(timed(fwd, device, 1, plan["conv_repeats"])[1])
                fb_s = min(timed(lambda: conv().backward(g), device, 1, plan["conv_repeats"])[1])
                rows.append({"input": xs, "weight": ws, "stride": stride, "transposed": transposed, "calls": calls,
                             "fwd_s": f_s, "fwdbwd_s": fb_s, "fwd_gflops": f_flops / f_s / 1e9,
                             "fwdbwd_gflops": fb_flops / fb_s / 1e9})
                tot["fwd_s"] += calls * f_s
                tot["fwdbwd_s"] += calls * fb_s
                tot["fwd_flops"] += calls * f_flops
                tot["fwdbwd_flops"] += calls * fb_flops
                del x, w, y, g
            p = peak[prec]["peak"]
            tot.update(fwd_fraction=tot["fwd_flops"] / tot["fwd_s"] / p, fwdbwd_fraction=tot["fwdbwd_flops"] / tot["fwdbwd_s"] / p)
            res[f"{name} {prec}"] = {"shapes": rows, "total": tot, "peak": p}
            log(f"  {name} {prec}: {len(rows)} convolution shapes; alone, the step's convolutions take "
                f"{tot['fwdbwd_s']:.3f} s forward + backward ({tot['fwdbwd_flops'] / tot['fwdbwd_s'] / 1e9:.1f} GFLOP/s, "
                f"{100 * tot['fwdbwd_fraction']:.0f}% of the {prec} peak {p / 1e9:.0f}); forward "
                f"{100 * tot['fwd_fraction']:.0f}%")
            for r in sorted(rows, key=lambda r: -r["calls"] * r["fwdbwd_s"])[:4]:
                log(f"    {str(r['input']):18s} x {str(r['weight']):16s}{' T' if r['transposed'] else '  '} x{r['calls']}: "
                    f"fwd {r['fwd_gflops']:6.1f}, fwd+bwd {r['fwdbwd_gflops']:6.1f} GFLOP/s")
    return res


# ----------------------------------------------------------------------------------------------------
# The table
def make_table(plan, loader, train, peak, evals, metrics):
    B = plan["headline_batch"]
    at_b = {r["config"]: r for r in train.values() if r["batch"] == B}
    ref = at_b[REFERENCE]
    best32 = min((r for k, r in at_b.items() if k.startswith("fp32")), key=lambda r: r["s"])
    best = min(at_b.values(), key=lambda r: r["s"])
    bf16 = at_b.get("bf16 batched") or at_b.get("bf16 batched CL")
    best16 = min((r for k, r in at_b.items() if k.startswith("bf16")), key=lambda r: r["s"])
    rows = []

    def row(name, measured, reference, ratio, target="", met=None):
        rows.append({"name": name, "measured": measured, "reference": reference, "ratio": ratio, "target": target,
                     "met": None if met is None else bool(met)})

    # 1. loader; the demand is that of the fastest measured step, at batch 12 (scaled by FLOPs if needed)
    step12 = best["s"] * count_flops(12, best["config"]) / best["flops"]
    r = loader["cache_seq_per_s"] / loader["png_seq_per_s"]
    lo, hi = min(loader["round_ratios"]), max(loader["round_ratios"])
    row(f"loader: cache vs PNG (seq/s, median of 5 alternating rounds, {lo:.0f}-{hi:.0f}x)", loader["cache_seq_per_s"],
        loader["png_seq_per_s"], r, ">= 20x", r >= 20)
    row("loader: cache == PNG tensors", "yes" if loader["identical"] else "NO", "", None, "identical",
        loader["identical"])
    r = loader["cache_seq_per_s"] / (12 / step12)
    row("loader: 1 process vs b12 step demand (seq/s)", loader["cache_seq_per_s"], 12 / step12, r, "> 1x", r > 1)
    # 2. training steps, ratio = reference seconds / seconds
    for rec in train.values():
        ref_b = train.get(f"{REFERENCE} b{rec['batch']}")
        how = (f", from b{rec['probe_batch']} x FLOPs" if rec["probe_batch"] != rec["batch"] else "") + \
              (f", {rec['repeats']} step, no warm-up" if rec["warmup"] == 0 else "")
        is_target = rec["batch"] == B and (rec is bf16 or rec is best)
        r = ref_b["s"] / rec["s"] if ref_b else None
        row(f"train b{rec['batch']} {rec['config']} (s/step{how})", rec["s"], ref_b["s"] if ref_b else None, r,
            ">= 1.8x" if is_target else "", (r >= 1.8) if is_target else None)
    # 3. achieved FLOP/s against the measured peak of the same precision
    for rec, prec in ((best32, "fp32"), (best16, "bf16")):
        achieved = rec["probe_flops"] / rec["probe_s"]
        frac = achieved / peak[prec]["peak"]
        row(f"model GFLOP/s {prec} ({rec['config']} b{rec['probe_batch']}) vs peak", achieved / 1e9,
            peak[prec]["peak"] / 1e9, frac, ">= 0.70", frac >= 0.7)
    # 4. evaluation of 256 sequences
    for name, rec in evals.items():
        note = f", {rec['sequences_timed']} seq x {256 / rec['sequences_timed']:g}" if rec["scaled_from"] else ""
        row(f"{name}: 256 test seq (s{note})", rec["s_256"], 120.0, rec["s_256"] / 120, "< 120 s", rec["s_256"] < 120)
    for name, rec in evals.items():
        direct = evals.get(name.replace(" " + rec["algorithms"], " direct"))
        if rec["algorithms"] != "direct" and direct:
            row(f"{name} vs direct (s for 256)", rec["s_256"], direct["s_256"], direct["s_256"] / rec["s_256"])
    # 5. metrics: the target applies to the faster path, as for the training step
    fastest = min(("eager", "compiled"), key=lambda k: metrics[f"{k}_s"])
    for name in ("eager", "compiled"):
        r = metrics["finn_s_scaled"] / metrics[f"{name}_s"]
        first = f", first call {metrics[f'{name}_first_call_s']:.0f} s" if name == "compiled" else ""
        row(f"metrics {name} {metrics['shape'][0]}x{N_FUTURE} frames (s, finn: {metrics['finn_sequences_timed']} "
            f"seq scaled{first})", metrics[f"{name}_s"], metrics["finn_s_scaled"], r,
            ">= 50x" if name == fastest else "", (r >= 50) if name == fastest else None)
        row(f"metrics {name}: max |batched - finn|", metrics[f"{name}_max_abs_diff"], "", None, "< 1e-5",
            metrics[f"{name}_max_abs_diff"] < 1e-5)
    summary = {"best": best, "best_fp32": best32, "reference": ref, "step_b12_s": step12,
               "fp32_fraction": best32["probe_flops"] / best32["probe_s"] / peak["fp32"]["peak"]}
    return rows, summary


def print_steps(recipes, roofline, peak, log):
    """The targets of the training iteration side by side with the host's peaks: each recipe model's
    after/before ratio (target 3x for the demo/long recipe), its FLOP/s against the peak, and the roofline.
    The fractions are recomputed against the final peak (the higher of two measurements)."""
    for r in recipes.values():
        r["fraction_of_peak"] = r["flops"] / r["after_s"] / peak[r["precision"]]["peak"]
    for name, c in roofline.items():
        c["peak"] = p = peak[name.rsplit(" ", 1)[1]]["peak"]
        t = c["total"]
        t.update(fwd_fraction=t["fwd_flops"] / t["fwd_s"] / p, fwdbwd_fraction=t["fwdbwd_flops"] / t["fwdbwd_s"] / p)
    log(f"\ntraining iterations, this host's measured peaks: fp32 {peak['fp32']['peak'] / 1e9:.1f}, bf16 "
        f"{peak['bf16']['peak'] / 1e9:.1f} GFLOP/s")
    for name, r in recipes.items():
        conv = roofline.get(name)
        target = ">= 3x (issue #32)" if name.startswith("demo") else ">= 1x (no config slower)"
        met = r["ratio"] >= (3 if name.startswith("demo") else 1)
        log(f"  {name}: {r['after_s']:.3f} s/it against {r['before_s']:.3f} before: {r['ratio']:.2f}x, target {target}: "
            f"{'met' if met else 'NOT met'}; {100 * r['fraction_of_peak']:.0f}% of the {r['precision']} peak"
            + (f"; its convolutions alone (forward + backward) at {100 * conv['total']['fwdbwd_fraction']:.0f}% of "
               f"it, {conv['total']['fwdbwd_s']:.3f} s of the {r['after_s']:.3f} s" if conv else ""))


def print_table(rows, log):
    head = ("name", "measured", "reference", "ratio", "target", "met")
    cells = [[x["name"], fmt(x["measured"]), fmt(x["reference"]), fmt(x["ratio"], "x") if x["ratio"] else "",
              x["target"], {None: "", True: "yes", False: "NO"}[x["met"]]] for x in rows]
    widths = [max(len(str(c[i])) for c in cells + [list(head)]) for i in range(len(head))]
    line = lambda c: "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)
                               for i, (v, w) in enumerate(zip(c, widths)))
    log(line(head))
    log("-" * len(line(head)))
    for c in cells:
        log(line(c))


# ----------------------------------------------------------------------------------------------------
def main(args):
    t_start = time.perf_counter()
    malloc_tuned = runtime.keep_freed_memory()  # as train_fixed_prior.py and test.py do
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    if use_cuda:
        torch.backends.cudnn.benchmark = True  # as train_fixed_prior.py: each convolution's fastest cuDNN kernel
    plan = dict(PLANS["quick" if args.quick else "full"])
    if args.eval_seqs:
        plan["eval_seqs"] = args.eval_seqs
    log = lambda s: print(s, flush=True)
    info = machine_info(device)
    info["malloc_keeps_freed_memory"] = malloc_tuned
    bf16_native = native_bf16(device, info)
    monitor, contention, section_s = CpuMonitor(), {}, {}
    time.sleep(1.0)
    contention["before start"] = other = monitor.lap()
    if other is not None and other > 0.2:
        log(f"WARNING: other processes keep {other:.1f} of {os.cpu_count()} cores busy: every timing will be slower "
            f"(rerun on an idle machine, or with --threads {max(1, round(os.cpu_count() - other))})")
    log(f"bench ({'quick' if args.quick else 'full'}): torch {info['torch']}, {info['cpu']}, {info['threads']} "
        f"threads, device {device}{' (' + info['gpu'] + ')' if info['gpu'] else ''}, native bf16: {bf16_native}")

    def section(name, fn, *a):
        log(name)
        monitor.lap()
        t0 = time.perf_counter()
        out = fn(*a)
        contention[name] = other = monitor.lap()
        section_s[name] = time.perf_counter() - t0
        if other is not None and other > 0.2:
            log(f"  WARNING: other processes kept {other:.1f} cores busy during this section: its figures are slowed")
        return out

    def save(recipes):  # the recipes measured so far (bench_recipes), in case a time limit stops the run
        with open(args.out, "w") as f:
            json.dump({"mode": "partial", "machine": info, "peak_flops": peak, "recipes": recipes}, f, indent=2,
                      default=str)

    if args.only_steps:
        peak = section("0. peak FLOP/s", bench_peak, device, bf16_native)
        recipes = section("7. the recipes' training iteration, before vs after (same run)", bench_recipes, device, plan,
                          bf16_native, peak, log, save)
        roofline = section("8. roofline: the model's own convolutions alone", bench_conv_roofline, device, plan,
                           bf16_native, peak, log)
        peak = merge_peaks(peak, section("peak FLOP/s (second measurement)", bench_peak, device, bf16_native))
        print_steps(recipes, roofline, peak, log)
        result = {"mode": ("quick" if args.quick else "full") + " --only_steps", "machine": info,
                  "bf16_native": bf16_native, "other_processes_cores": contention, "section_s": section_s,
                  "peak_flops": peak, "recipes": recipes, "conv_roofline": roofline,
                  "wall_s": time.perf_counter() - t_start}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
        log(f"\nwrote {args.out} ({result['wall_s']:.0f} s wall)")
        return result

    if args.only_eval:
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            data_root = args.data_root or os.path.join(tmp, "data")
            if not args.data_root:
                make_dataset(data_root, plan["data"])
            peak = section("0. peak FLOP/s", bench_peak, device, bf16_native)
            evals = section("4. evaluation (evaluation.evaluate, n_past 2, n_future 10)", bench_eval, data_root,
                            os.path.join(tmp, "cache"), device, plan, log)
        fastest = min(evals, key=lambda k: evals[k]["s_256"])
        for name, rec in evals.items():
            log(f"  {name}: {rec['s_256']:.1f} s for 256 sequences, {evals[fastest]['s_256'] / rec['s_256']:.2f}x "
                f"the fastest ({fastest}); host fp32 peak {peak['fp32']['peak'] / 1e9:.1f} GFLOP/s")
        result = {"mode": ("quick" if args.quick else "full") + " --only_eval", "machine": info, "peak_flops": peak,
                  "other_processes_cores": contention, "evals": evals, "wall_s": time.perf_counter() - t_start}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
        log(f"\nwrote {args.out} ({result['wall_s']:.0f} s wall)")
        return result

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        data_root, source = args.data_root, "given"
        if not data_root:
            data_root = os.path.join(tmp, "data")
            t0 = time.perf_counter()
            source = make_dataset(data_root, plan["data"])
            log(f"data: {plan['data']} train/validate/test sequences from {source} in {time.perf_counter() - t0:.0f} s")
        cache_dir = os.path.join(tmp, "cache")
        peak_first = section("0. peak FLOP/s (first of two measurements)", bench_peak, device, bf16_native)
        loader = section("1. loader", bench_loader, data_root, cache_dir, plan)
        train = section("2. training steps (full width, T = 12, teacher forcing)", bench_train, device, plan,
                        bf16_native, log)
        peak = section("3. peak FLOP/s (second measurement)",
                       lambda: merge_peaks(peak_first, bench_peak(device, bf16_native)))
        evals = section("4. evaluation (evaluation.evaluate, n_past 2, n_future 10)", bench_eval, data_root, cache_dir,
                        device, plan, log)
        metrics = section("5. metrics", bench_metrics, device, plan)
        top_ops = section("profile", profile_step, device, plan["headline_batch"], log) if args.profile else None
        recipes = section("7. the recipes' training iteration, before vs after (same run)", bench_recipes, device, plan,
                          bf16_native, peak, log, save)
        roofline = section("8. roofline: the model's own convolutions alone", bench_conv_roofline, device, plan,
                           bf16_native, peak, log)

    rows, summary = make_table(plan, loader, train, peak, evals, metrics)
    log("\n" + ("QUICK RUN: reduced sizes, not the headline figures\n" if args.quick else ""))
    print_table(rows, log)
    print_steps(recipes, roofline, peak, log)

    # 6. on paper: the course schedule
    best, ref, frac = summary["best"], summary["reference"], summary["fp32_fraction"]
    flops_iter = count_flops(12, "fp32 batched")
    total = flops_iter * COURSE_ITERS
    paper = {"flops_per_iteration_b12": flops_iter, "flops_per_iteration_b12_per_step": count_flops(12, "fp32 per-step"),
             "flops_per_iteration_b12_svg": count_flops(12, REFERENCE),
             "course_iterations": COURSE_ITERS, "course_flops": total, "gpu": GPU, "fraction_of_peak": frac,
             "this_machine_s_per_iteration": summary["step_b12_s"],
             "this_machine_days": summary["step_b12_s"] * COURSE_ITERS / 86400,
             "gpu_fp32_hours": total / (GPU["fp32"] * frac) / 3600,
             "gpu_bf16_hours": total / (GPU["bf16"] * frac) / 3600}
    eval_best = min(evals, key=lambda k: evals[k]["s_256"])
    log(f"\nbest training configuration at batch {plan['headline_batch']}: {best['config']} "
        f"({ref['s'] / best['s']:.2f}x the fp32 per-step reference); fastest evaluation: {eval_best} "
        f"({evals[eval_best]['s_256']:.0f} s for 256 sequences, "
        f"{count_flops(256, 'fp32 batched', train=False) / 1e12:.1f} TFLOP)")
    log(f"on paper: {flops_iter / 1e12:.2f} TFLOP per iteration (batch 12, batched rollout, forward + backward; "
        f"per-step rollout {paper['flops_per_iteration_b12_per_step'] / 1e12:.2f}, SVG's per-step rollout "
        f"{paper['flops_per_iteration_b12_svg'] / 1e12:.2f}) x {COURSE_ITERS:,} iterations "
        f"(300 epochs x 600) = {total:.3g} FLOP")
    log(f"  this machine at {summary['step_b12_s']:.1f} s/iteration: {paper['this_machine_days']:.0f} days")
    log(f"  one {GPU['name']} at {100 * frac:.0f}% of peak (the fp32 fraction measured here): "
        f"fp32 {GPU['fp32'] / 1e12:g} TFLOP/s -> {paper['gpu_fp32_hours']:.1f} h; "
        f"bf16 tensor cores {GPU['bf16'] / 1e12:g} TFLOP/s -> {paper['gpu_bf16_hours']:.2f} h")
    ssim_share = metrics["eager_s"] / (metrics["shape"][0] * N_FUTURE) * 256 * N_FUTURE
    log(f"  of the evaluation, the eager batch_metrics take about {ssim_share:.1f} s for 256 sequences (section 5)")
    busy = {k: v for k, v in contention.items() if v is not None and v > 0.2}
    if busy:
        log("WARNING: other processes were using the CPUs during: " +
            ", ".join(f"{k.split(' (')[0]} ({v:.1f} cores)" for k, v in busy.items()) + "; rerun on an idle machine")

    result = {"mode": "quick" if args.quick else "full", "plan": plan, "machine": info, "bf16_native": bf16_native,
              "data": {"root": args.data_root or None, "source": source},
              "other_processes_cores": contention, "section_s": section_s, "loader": loader, "train": train,
              "peak_flops": peak, "eval": evals, "metrics": metrics, "paper": paper, "profile_top_ops": top_ops,
              "recipes": recipes, "conv_roofline": roofline,
              "table": rows, "wall_s": time.perf_counter() - t_start}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    log(f"\nwrote {args.out} ({result['wall_s']:.0f} s wall)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
