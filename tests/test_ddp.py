"""Two-process data-parallel training (gloo, CPU) equals averaging the two per-rank gradients."""
import argparse
import os
import random
import subprocess
import sys

import pytest
import torch

import checkpoints
from conftest import REPO, TINY
from dataset import bair_robot_pushing_dataset
from models import CVAE
from train_fixed_prior import StreamBatchSampler


@pytest.mark.slow
def test_two_process_ddp_matches_gradient_averaging(sim_root, tmp_path):
    steps, seed = 3, 4
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
           os.path.join(REPO, "train_fixed_prior.py"), "--data_root", sim_root, "--log_dir", str(tmp_path),
           "--cache_dir", str(tmp_path / "cache"), *TINY, "--niter", "1", "--epoch_size", str(steps),
           "--seed", str(seed), "--plot_every", "9", "--device", "cpu",
           "--optimizer", "sgd", "--lr", "0.5",  # SGD: parameters move linearly with the gradients
           "--conv_layouts", "off"]  # NCHW, as the reference computes it: lr 0.5 magnifies the layouts' rounding
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    run = os.path.join(tmp_path, [d for d in os.listdir(tmp_path) if d.startswith("rnn")][0])
    ckpt = checkpoints.load_checkpoint(os.path.join(run, "last.pth"))
    assert ckpt["world_size"] == 2 and ckpt["step"] == steps
    a, b = ckpt["rank_param_checksums"]
    assert a == b  # both ranks hold the same parameters

    # Reference: one process runs each rank's batch separately and averages the gradients, on one thread
    # like each rank (float sums over many pixels depend on the threads' reduction order).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    args = argparse.Namespace(**ckpt["args"])
    ds = bair_robot_pushing_dataset(argparse.Namespace(**{**vars(args), "quiet": True}), "train")
    rng_states = []
    for rank in range(2):
        torch.manual_seed(seed + rank)
        model = CVAE.from_config(args)  # consumes the same random numbers as the rank did
        rng_states.append(torch.get_rng_state())
    torch.manual_seed(seed)
    model = CVAE.from_config(args)
    model.set_cond_stats(*ds.cond_stats())
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    samplers = [iter(StreamBatchSampler(len(ds), args.batch_size, seed, 0, 2, r)) for r in range(2)]
    random.seed(seed)
    from kl_annealing import kl_weight_from_args
    T = args.n_past + args.n_future
    for step in range(steps):
        use_tf = random.random() < args.tfr
        grads = []
        for rank in range(2):
            idx = next(samplers[rank])
            frames = torch.stack([ds[i][0] for i in idx])[:, :T]
            conds = torch.stack([ds[i][1] for i in idx])[:, :T]
            torch.set_rng_state(rng_states[rank])
            out = model(frames, conds, args.n_past, teacher_forcing=use_tf, batched=True)
            rng_states[rank] = torch.get_rng_state()
            loss = out["mse"] + kl_weight_from_args(step, args) * out["kld"]
            opt.zero_grad()
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, g0, g1 in zip(model.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        opt.step()
    torch.set_num_threads(threads)
    ref = {k: v for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(ckpt["model"][name], ref[name], atol=1e-5, rtol=1e-4, msg=name)
