"""On a CUDA GPU (`python -m pytest -m cuda tests`; tools/gpu_check.sh runs them): the fast paths equal to the
plain model, bf16 and fp16 autocast training with the grad scaler, exact resume, the training step as one CUDA
graph, and NCCL data parallelism.
Every test here skips without CUDA. They reuse the CPU tests' models and helpers (test_models, test_train)."""
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, read when CUDA starts

import pytest
import torch

import checkpoints
import models.fast as fast
import run_log
import test_models
import test_train
from conftest import REPO, TINY

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")


def _to(obj, device=CUDA, dtype=None):
    if obj is None:
        return None
    if isinstance(obj, (list, tuple)):
        return [_to(o, device, dtype) for o in obj]
    return obj.to(device, dtype) if dtype else obj.to(device)


@pytest.fixture
def tf32(request):
    """Sets TF32 for matmuls and cuDNN convolutions to the parameter (True/False), restores it after."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = request.param
    yield request.param
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# fp32 without TF32: only the summation order differs, as on the CPU. With TF32 (10-bit mantissas in the
# convolutions and matmuls) the two forms round differently at every layer.
TOL = {False: dict(atol=5e-5, rtol=1e-4), True: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("tf32", [False, True], indirect=True, ids=["fp32", "tf32"])
@pytest.mark.parametrize("kw", test_models.VARIANTS)
def test_fast_rollouts_match_the_plain_model_on_cuda(kw, tf32):
    """forward_batched, forward_fed_back, predict and inference_copy against CVAE.forward / predict on CUDA,
    and the CUDA plain model against the CPU one (fp32 only: the CPU is the reference there)."""
    m, x, c, noise = test_models._model(**kw)
    with torch.no_grad():
        ref_cpu = m.predict(x, c, 3, 5, noise)
    m, x, c, noise = m.to(CUDA), x.to(CUDA), _to(c), _to(noise)
    tol = TOL[tf32]
    with torch.no_grad():
        for tf in (True, False):
            a = m(x, c, 3, teacher_forcing=tf, noise=noise)
            b = m(x, c, 3, teacher_forcing=tf, noise=noise, batched=True)
            for key in ("pred", "kl", "kl_levels"):
                torch.testing.assert_close(b[key], a[key], **tol, msg=f"{key}, teacher forcing {tf}")
        copy = fast.inference_copy(m)
        for posterior in (False, True):
            p = m.predict(x, c, 3, 5, noise, posterior=posterior)
            torch.testing.assert_close(fast.predict(m, x, c, 3, 5, noise, posterior=posterior), p, **tol)
            torch.testing.assert_close(fast.predict(copy, x, c, 3, 5, noise, posterior=posterior), p, **tol)
            if not posterior and not tf32:
                torch.testing.assert_close(p.cpu(), ref_cpu, **tol)


@pytest.mark.parametrize("kw", test_models.inner_loop(test_models.VARIANTS, test_models.INNER))
def test_batched_rollout_trains_as_per_step_on_cuda(kw):
    """The same losses, gradients and BatchNorm running statistics from both training rollouts (float64)."""
    results = []
    for batched in (True, False):
        m, x, c, noise = test_models._model(**kw)
        m, x, c, noise = m.to(CUDA, torch.float64), _to(x, CUDA, torch.float64), _to(c, CUDA, torch.float64), \
            _to(noise, CUDA, torch.float64)
        m.train()
        out = m(x, c, 2, teacher_forcing=True, noise=noise, batched=batched)
        (out["mse"] + out["kld"]).backward()
        results.append((out, {n: p.grad for n, p in m.named_parameters()}, m.state_dict()))
    (a, grad_a, state_a), (b, grad_b, state_b) = results
    for key in ("pred", "kl", "kl_levels"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)
    for name in grad_a:
        torch.testing.assert_close(grad_a[name], grad_b[name], atol=1e-5, rtol=1e-3, msg=name)
    for name in state_a:
        torch.testing.assert_close(state_a[name], state_b[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("tf32", [False], indirect=True, ids=["fp32"])
@pytest.mark.parametrize("kw", test_models.inner_loop(test_models.VARIANTS[:3] + test_models.EXTRAS,
                                                      [test_models.VARIANTS[0], test_models.EXTRAS[3]]))
def test_fed_back_training_rollout_matches_the_plain_one_on_cuda(kw, tf32):
    """Without teacher forcing: the same losses, and (BatchNorm in eval mode, as the CPU test explains) the
    same gradients."""
    for train in (True, False):
        results = []
        for batched in (True, False):
            m, x, c, noise = test_models._model(**kw)
            m, x, c, noise = m.to(CUDA), x.to(CUDA), _to(c), _to(noise)
            m.train(train)
            out = m(x, c, 3, teacher_forcing=False, noise=noise, batched=batched)
            (out["mse"] + out["kld"]).backward()
            results.append((out, {n: p.grad for n, p in m.named_parameters()}))
        (a, grad_a), (b, grad_b) = results
        for key in ("pred", "kl", "kl_levels"):
            torch.testing.assert_close(a[key], b[key], **TOL[False], msg=key)
        for name in grad_a if not train else ():
            torch.testing.assert_close(grad_a[name], grad_b[name], atol=1e-5, rtol=1e-3, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_training_on_cuda(sim_root, tmp_path, amp):
    """A few autocast steps on CUDA (fp16 with the grad scaler): finite losses and weights, the scaler saved."""
    run = test_train._train(sim_root, tmp_path, "--device", "cuda", "--amp", amp, "--niter", "2", "--epoch_size", "3",
                            "--plot_every", "9", "--eval_every", "1")
    rows = run_log.read_metrics(os.path.join(run, "metrics.csv"))
    assert len(rows) == 2 and all(0 < r["loss"] < float("inf") and r["val_psnr"] > 5 for r in rows)
    ckpt = checkpoints.load_checkpoint(os.path.join(run, "last.pth"))
    assert ckpt["step"] == 6 and ckpt["args"]["amp"] == amp
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert (ckpt["scaler"] is not None) == (amp == "fp16")
    if amp == "fp16":
        assert ckpt["scaler"]["scale"] > 0


@pytest.fixture
def deterministic(monkeypatch):
    """Deterministic cuDNN and CUDA kernels (warning where an op has none), as an exact resume needs."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--amp", "bf16"]], ids=["fp32", "bf16"])
def test_resume_is_exact_on_cuda(sim_root, tmp_path, monkeypatch, deterministic, flags):
    """The CPU resume test (test_train.test_resume_is_bit_exact: SIGINT in the second epoch, resume, the
    same weights and optimizer state bit for bit) with --device cuda. When it fails, two uninterrupted runs
    are compared too, to tell a resume bug from kernels that are not deterministic on this GPU."""
    try:
        test_train.test_resume_is_bit_exact(sim_root, tmp_path, monkeypatch, ["--device", "cuda", *flags])
    except AssertionError as e:
        base = ["--niter", "2", "--epoch_size", "3", "--eval_every", "1", "--plot_every", "9", "--seed", "5",
                "--tfr", "0.5", "--device", "cuda", *flags]
        runs = [test_train._train(sim_root, tmp_path / f"again{i}", *base) for i in range(2)]
        a, b = (test_train._params(os.path.join(r, "last.pth"))["model"] for r in runs)
        same = all(torch.equal(a[k], b[k]) for k in a)
        raise AssertionError(f"resume on CUDA is not exact ({e}); two uninterrupted runs are "
                             f"{'identical: a resume bug' if same else 'different too: non-deterministic kernels'}")


DDP_SCRIPT = textwrap.dedent("""
    import copy, os, sys
    sys.path.insert(0, {repo!r})
    import torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from models import CVAE
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    torch.manual_seed(0)
    model = CVAE(g_dim=16, z_dim=4, rnn_size=16, base_channels=4, cond_embed_dim=4).to(dev)
    plain = copy.deepcopy(model)
    ddp = DDP(model, device_ids=[rank])
    g = torch.Generator().manual_seed(rank)
    x, c = torch.rand(4, 8, 3, 64, 64, generator=g).to(dev), torch.randn(4, 8, 7, generator=g).to(dev)
    noise = torch.randn(4, 7, 4, generator=g).to(dev)
    for net in (ddp, plain):
        out = net(x, c, 2, teacher_forcing=True, noise=noise, batched=True)
        (out["mse"] + out["kld"]).backward()
    flags = torch.tensor([float(rank == 0), 0.0], device=dev)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # train_fixed_prior.agree's collective
    assert flags.tolist() == [1.0, 0.0], flags
    world = dist.get_world_size()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        mean = q.grad.clone()
        dist.all_reduce(mean)
        torch.testing.assert_close(p.grad, mean / world, atol=1e-6, rtol=1e-4, msg=name)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {{rank}} of {{world}}: DDP gradients equal the mean of the ranks' own")
""")


def _torchrun(tmp_path, nproc, port, script=None, args=()):
    path = tmp_path / "ddp_check.py"
    path.write_text(DDP_SCRIPT.format(repo=REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           script or str(path), *args]
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("tf32", [False], indirect=True, ids=["fp32"])
def test_cuda_graph_step_trains_as_the_eager_one(tf32):
    """bench.graph_step, the training iteration captured in one CUDA graph (bench.py times it against the eager
    step): its replays give the eager iterations' weights, weight average, BatchNorm statistics and Adam state."""
    import copy

    import bench
    import train_fixed_prior as tfp
    states = []
    for graphed in (False, True):
        m, x, c, noise = test_models._model(cond_conv="film")
        m, x, c, noise = m.to(CUDA).train(), x.to(CUDA), _to(c), _to(noise)
        ema = copy.deepcopy(m).requires_grad_(False)
        pairs, opt = tfp.ema_tensors(ema, m), torch.optim.Adam(m.parameters(), lr=1e-3, fused=True)
        scaler = torch.amp.GradScaler("cuda", enabled=False)

        def step():  # the loop's iteration (bench._step_closures' "after") on fixed tensors, fixed noise
            out = m(x, c, 2, teacher_forcing=True, noise=noise, batched=True)
            loss = out["mse"] + 1e-4 * out["kld"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.get_total_norm([p.grad for p in m.parameters() if p.grad is not None])
            skip = tfp.optimizer_step(opt, scaler, ~(torch.isfinite(loss) & torch.isfinite(norm)))
            tfp.update_ema(ema, m, 0.9, skip, pairs)

        if graphed:
            replay = bench.graph_step(step, opt, CUDA, warmup=2)  # 2 eager iterations, then the capture
            for _ in range(3):
                replay()
        else:
            for _ in range(5):
                step()
        torch.cuda.synchronize()
        states.append((m.state_dict(), ema.state_dict(), [s["exp_avg_sq"] for s in opt.state.values()],
                       [s["step"] for s in opt.state.values()]))
    for name, a, b in zip(("weights", "average", "second moments", "steps"), *states):
        if isinstance(a, dict):
            for key in a:
                torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_one_process_nccl_ddp(tmp_path):
    """A 1-process NCCL group: DDP's gradients of the model equal the plain model's, and the all-reduce the
    training loop's decisions use works on CUDA tensors."""
    res = _torchrun(tmp_path, 1, 29541)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "rank 0 of 1: DDP gradients equal" in res.stdout


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_nccl_training(sim_root, tmp_path):
    """2 processes on 2 GPUs: the DDP check above, then train_fixed_prior.py under torchrun with NCCL: both
    ranks end with the same parameters."""
    res = _torchrun(tmp_path, 2, 29542)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    res = _torchrun(tmp_path, 2, 29543, os.path.join(REPO, "train_fixed_prior.py"), [
        "--data_root", sim_root, "--log_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache"), *TINY,
        "--niter", "1", "--epoch_size", "3", "--plot_every", "9", "--device", "cuda"])
    assert res.returncode == 0, res.stderr[-3000:]
    run = os.path.join(tmp_path, [d for d in os.listdir(tmp_path) if d.startswith("rnn")][0])
    ckpt = checkpoints.load_checkpoint(os.path.join(run, "last.pth"))
    assert ckpt["world_size"] == 2 and ckpt["step"] == 3
    a, b = ckpt["rank_param_checksums"]
    assert a == b
