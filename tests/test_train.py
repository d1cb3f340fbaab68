"""End to end: training writes every artefact, test.py scores it, resume is exact, faults are handled."""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import test as test_script
import train_fixed_prior as train
import checkpoints
import run_log
import runtime
from conftest import REPO, TINY
from models import CVAE, fast


def _train(root, log_dir, *extra):
    argv = ["--data_root", root, "--log_dir", str(log_dir), "--cache_dir", str(log_dir / "cache"), *TINY, *extra]
    return train.main(argv)


@pytest.fixture(scope="module")
def run_dir(sim_root, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs")
    return _train(sim_root, log, "--niter", "2", "--epoch_size", "3", "--eval_every", "1", "--plot_every", "2",
                  "--tfr_decay_step", "0.5", "--kl_anneal_cyclical")


@pytest.mark.slow
def test_training_writes_every_artefact(run_dir):
    assert os.path.basename(run_dir).startswith("rnn_size=16-predictor-posterior-rnn_layers=2-1-n_past=2-n_future=10-"
                                                "lr=0.0020-g_dim=8-z_dim=4-last_frame_skip=False-beta=1.0000000")
    record = open(os.path.join(run_dir, "train_record.txt")).read()
    assert len(re.findall(r"^\[epoch: \d\d\] loss: \d+\.\d{5} \| mse loss: \d+\.\d{5} \| kld loss: \d+\.\d{5}$",
                          record, re.M)) == 2
    assert len(re.findall(r"^={22} validate psnr = \d+\.\d{5} ={24}$", record, re.M)) == 2
    rows = run_log.read_metrics(os.path.join(run_dir, "metrics.csv"))
    assert [r["epoch"] for r in rows] == [0, 1] and [r["step"] for r in rows] == [3, 6]
    assert [r["tfr"] for r in rows] == [1.0, 0.5] and all(r["val_psnr"] > 5 for r in rows)
    assert all(0 <= r["active_dims"] <= 4 and r["val_kld"] >= 0 and len(r["val_kld_per_step"]) == 11 for r in rows)
    # each z dimension's KL, averaged over the steps: the active ones are those above 0.01 nats
    assert all(len(r["val_kld_per_dim"]) == 4 and sum(v > 0.01 for v in r["val_kld_per_dim"]) == r["active_dims"] for r in rows)
    for f in ("curves.png", "model.pth", "last.pth", "gen/epoch_001.gif", "gen/epoch_001.png"):
        assert os.path.getsize(os.path.join(run_dir, f)) > 0, f
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(run_dir, "tb")))
    ckpt = torch.load(os.path.join(run_dir, "last.pth"), weights_only=True)
    assert ckpt["step"] == 6 and ckpt["epoch"] == 2 and ckpt["arch"]["g_dim"] == 8
    assert {"model", "optimizer", "args", "rng", "best_psnr", "tfr"} <= set(ckpt)
    assert ckpt["arch"]["prior"] == "fixed" and ckpt["arch"]["cond_dim"] == 7
    # Written files get the permissions a plain open() gives, so another user can read the run.
    mode = 0o666 & ~_umask()
    for f in ("model.pth", "last.pth", "curves.png", "metrics.csv"):
        assert os.stat(os.path.join(run_dir, f)).st_mode & 0o777 == mode, f


@pytest.mark.slow
def test_test_script_batch_size_and_compiled_metrics_invariance(run_dir, capsys, tmp_path):
    m1 = test_script.main(["--model_dir", run_dir, "--batch_size", "1", "--out", str(tmp_path / "a")])
    assert re.search(r"^test psnr: \d+\.\d{4}$", capsys.readouterr().out, re.M)
    m2 = test_script.main(["--model_dir", run_dir, "--batch_size", "5", "--num_workers", "2", "--compile_metrics",
                           "--out", str(tmp_path / "b")])
    assert m1["n_sequences"] == m2["n_sequences"] == 5
    assert m1["psnr"] == pytest.approx(m2["psnr"], abs=1e-6)
    assert m1["ssim"] == pytest.approx(m2["ssim"], abs=1e-6)
    assert m1["psnr_per_step"] == pytest.approx(m2["psnr_per_step"], abs=1e-6)
    saved = json.load(open(tmp_path / "a" / "metrics.json"))
    assert {"psnr", "ssim", "psnr_per_step", "ssim_per_step", "psnr_std", "n_sequences", "copy_last_psnr",
            "checkpoint", "split", "seed"} <= set(saved) and len(saved["psnr_per_step"]) == 10
    assert (tmp_path / "a" / "seq0.gif").stat().st_size > 0 and (tmp_path / "a" / "seq0.png").stat().st_size > 0
    for mode in ("shuffled", "zero"):
        m = test_script.main(["--model_dir", run_dir, "--cond_mode", mode, "--out", str(tmp_path / mode)])
        assert m["n_sequences"] == 5 and m["cond_mode"] == mode


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _params(path):
    return torch.load(path, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("model_flags", [[], ["--prior", "learned", "--beta", "1e-3", "--free_bits", "0.05"],
                                         ["--cond_conv", "condconv", "--latent_levels", "2", "--beta", "1e-3"],
                                         ["--ema", "0.9"]])
def test_resume_is_bit_exact(sim_root, tmp_path, monkeypatch, model_flags):
    flags = ["--niter", "2", "--epoch_size", "3", "--eval_every", "1", "--plot_every", "9", "--seed", "5",
             "--tfr", "0.5", "--kl_anneal_cyclical", "--lr_schedule", "cosine", "--warmup", "2", "--conv_layouts", "auto",
             *model_flags]
    # A fixed layout choice instead of a measurement (which may differ between the two runs): a resume must
    # reuse the interrupted run's choice, not measure again.
    measured = []
    monkeypatch.setattr(train.fast, "choose_conv_layouts", lambda *a, **k: measured.append(1) or (["encoder.c1.0.0:conv"], {}))
    full = _train(sim_root, tmp_path / "a", *flags)
    real_kl = train.kl_weight_from_args

    def interrupt_at_step_4(step, args):  # a SIGINT arrives during iteration 4 (in the second epoch)
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return real_kl(step, args)

    monkeypatch.setattr(train, "kl_weight_from_args", interrupt_at_step_4)
    part = _train(sim_root, tmp_path / "b", *flags)
    assert part is None and _params(tmp_path / "b" / os.path.basename(full) / "last.pth")["step"] == 5
    monkeypatch.setattr(train, "kl_weight_from_args", real_kl)
    resumed = train.main(["--model_dir", str(tmp_path / "b" / os.path.basename(full))])
    a, b = _params(os.path.join(full, "last.pth")), _params(os.path.join(resumed, "last.pth"))
    assert a["step"] == b["step"] == 6
    assert len(measured) == 2 and a["conv_layouts"] == b["conv_layouts"] == ["encoder.c1.0.0:conv"]
    for key in ("model", "train_model") if a["train_model"] is not None else ("model",):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["best_psnr"] == b["best_psnr"]


@pytest.mark.slow
def test_weight_average_is_what_validation_and_test_use(sim_root, tmp_path, capsys):
    run = _train(sim_root, tmp_path, "--niter", "1", "--epoch_size", "3", "--eval_every", "1", "--plot_every", "9",
                 "--ema", "0.5")
    ckpt = _params(os.path.join(run, "model.pth"))
    assert any(not torch.equal(ckpt["model"][k], ckpt["train_model"][k]) for k in ckpt["model"])
    row = run_log.read_metrics(os.path.join(run, "metrics.csv"))[-1]
    assert row["val_psnr"] > 0 and row["val_psnr_trained"] > 0 and row["val_psnr"] != row["val_psnr_trained"]
    assert "the trained weights, without the average" in capsys.readouterr().out
    m = test_script.main(["--model_dir", run, "--data_root", sim_root, "--cache_dir", str(tmp_path / "cache")])
    assert m["psnr"] > 0  # test.py rebuilds the model from model.pth's "model": the average


@pytest.mark.slow
def test_an_existing_run_is_never_overwritten(run_dir, sim_root, capsys):
    before = open(os.path.join(run_dir, "last.pth"), "rb").read()
    with pytest.raises(SystemExit):
        _train(sim_root, __import__("pathlib").Path(os.path.dirname(run_dir)), "--niter", "2", "--epoch_size", "3",
               "--eval_every", "1", "--plot_every", "2", "--tfr_decay_step", "0.5", "--kl_anneal_cyclical")
    assert "already holds a run" in capsys.readouterr().err
    assert open(os.path.join(run_dir, "last.pth"), "rb").read() == before


@pytest.mark.slow
def test_resume_refuses_contradicting_architecture(run_dir, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--model_dir", run_dir, "--g_dim", "32", "--z_dim", "4"])
    assert e.value.code == 2 and "--g_dim contradict" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--n_past", "20", "--n_future", "11"], "--n_past 20 and --n_future 11"),
    (["--batch_size", "1"], "--batch_size 1: BatchNorm"),
    (["--tfr", "1.5"], "--tfr 1.5: must be in [0, 1]"),
    (["--lr", "-1"], "--lr -1.0"),
    (["--min_lr_ratio", "2"], "--min_lr_ratio 2.0 in [0, 1]"),
    (["--data_root", "/nonexistent"], "--data_root /nonexistent: expected a 'train' directory"),
    (["--model_dir", "/nonexistent"], "--model_dir /nonexistent"),
    (["--cond", "none", "--cond_conv", "film"], "--cond_conv film modulates the decoder by the condition, and --cond none"),
    (["--motion", "flow", "--motion_kernels", "0"], "--motion_kernels 0: must be a positive integer"),
    (["--bn_stats", "clip", "--tfr_decay_step", "0.1"], "--bn_stats clip normalises over every frame of the clip"),
] + ([] if torch.cuda.is_available() else [(["--cuda"], "CUDA is not available"),
                                           (["--amp", "fp16"], "--amp fp16 needs CUDA")]))
def test_bad_flags_are_named(sim_root, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        train.main(["--data_root", sim_root, "--log_dir", str(tmp_path), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_bad_checkpoints_fail_clearly(run_dir, tmp_path):
    good = open(os.path.join(run_dir, "model.pth"), "rb").read()
    cases = {
        "truncated": good[: len(good) // 2],
        "garbage": b"this is not a checkpoint" * 10,
    }
    for name, data in cases.items():
        (tmp_path / f"{name}.pth").write_bytes(data)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled module, as the sample saves
    torch.save({"model": {}}, tmp_path / "foreign.pth")
    expected = {"truncated": "not a readable checkpoint", "garbage": "not a readable checkpoint",
                "module.pth": "not a readable checkpoint", "foreign": "not a checkpoint of this project"}
    for name, msg in expected.items():
        path = tmp_path / (name if name.endswith(".pth") else f"{name}.pth")
        with pytest.raises(checkpoints.CheckpointError, match=msg):
            checkpoints.load_checkpoint(str(path))
    ckpt = checkpoints.load_checkpoint(os.path.join(run_dir, "model.pth"))
    ckpt["model"]["encoder.c1.0.0.weight"] = torch.zeros(5, 3, 3, 3)
    ckpt["version"] = 1
    torch.save(ckpt, tmp_path / "model.pth")
    with pytest.raises(SystemExit, match="weights do not fit the architecture"):
        test_script.main(["--model_dir", str(tmp_path)])
    ckpt["version"] = 99
    torch.save(ckpt, tmp_path / "model.pth")
    with pytest.raises(SystemExit, match="format version 99"):
        test_script.main(["--model_dir", str(tmp_path)])


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoint(run_dir, tmp_path):
    target = tmp_path / "last.pth"
    target.write_bytes(open(os.path.join(run_dir, "last.pth"), "rb").read())
    before = target.read_bytes()
    code = ("import os, sys, checkpoints\n"
            "def writer(f):\n    f.write(b'x' * 100000); f.flush(); os._exit(9)\n"
            f"checkpoints.atomic_write({str(target)!r}, writer)\n")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 9
    assert target.read_bytes() == before
    assert checkpoints.load_checkpoint(str(target))["step"] == 6


@pytest.mark.slow
def test_full_disk_stops_cleanly(sim_root, tmp_path, monkeypatch, capsys):
    run = _train(sim_root, tmp_path, "--niter", "1", "--epoch_size", "2", "--plot_every", "9")
    before = open(os.path.join(run, "last.pth"), "rb").read()

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as e:
        train.main(["--model_dir", run, "--niter", "2"])
    assert "No space left on device" in str(e.value) and "is intact" in str(e.value)
    assert open(os.path.join(run, "last.pth"), "rb").read() == before
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]


def test_step_without_host_reads_is_the_plain_step():
    """The loop's device-side step against the plain one: fused Adam skipping on its found_inf flag leaves the
    weights and Adam's state bit for bit; a good step is opt.step(); the foreach weight average equals the
    per-tensor lerp of the state_dict, and a skipped step leaves it; EpochSums equals item() per step."""
    import argparse
    import copy
    from models import CVAE
    torch.manual_seed(0)
    model = CVAE(g_dim=8, z_dim=4, rnn_size=16, base_channels=4, cond_embed_dim=4)
    ref = copy.deepcopy(model)
    args = argparse.Namespace(optimizer="adam", lr=0.01, beta1=0.9)
    opt, opt_ref = train.make_optimizer(args, model.parameters()), train.make_optimizer(args, ref.parameters())
    ema, ema_ref = copy.deepcopy(model).requires_grad_(False), copy.deepcopy(model).requires_grad_(False)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x, c, noise = torch.rand(2, 4, 3, 64, 64), torch.randn(2, 4, 7), torch.randn(2, 3, 4)
    sums, plain = train.EpochSums({"loss": 0.0, "mse": 0.0, "kld": 0.0, "n": 0}, 1, torch.device("cpu")), [0.0, 0]
    for step, poison in enumerate([False, True, False]):
        for net, o in ((model, opt), (ref, opt_ref)):
            out = net(x, c, 2, noise=noise, batched=True)
            loss = out["mse"] + out["kld"] * (float("nan") if poison else 1.0)
            o.zero_grad()
            loss.backward()
        bad = ~torch.isfinite(loss)
        assert torch.equal(train.optimizer_step(opt, scaler, bad), bad)
        if not poison:
            opt_ref.step()
            with torch.no_grad():  # the average as it was computed before: per tensor, on a fresh state_dict
                for a, b in zip(ema_ref.state_dict().values(), ref.state_dict().values()):
                    a.lerp_(b, 1 - 0.9) if a.is_floating_point() else a.copy_(b)
            plain = [plain[0] + loss.item() / 3, plain[1] + 1]
        train.update_ema(ema, model, 0.9, bad)
        sums.add(loss, out, bad, 3)
        for a, b in ((model, ref), (ema, ema_ref)):
            for (k, u), v in zip(a.state_dict().items(), b.state_dict().values()):
                assert torch.equal(u, v), (step, k)
        for sa, sb in zip(opt.state.values(), opt_ref.state.values()):
            assert all(torch.equal(sa[k], sb[k]) for k in sa), step
    assert sums.read()["loss"] == plain[0] and sums.sums["n"] == plain[1] == 2


@pytest.mark.slow
@pytest.mark.parametrize("sync_every", [0, 4])
def test_non_finite_steps_are_skipped_then_stop(sim_root, tmp_path, monkeypatch, sync_every):
    real_forward = train.CVAE.forward
    calls = {"n": 0}

    def nan_after_first(self, *a, **k):
        out = real_forward(self, *a, **k)
        if self.training:
            calls["n"] += 1
            if calls["n"] >= 2:
                out["mse"] = out["mse"] * float("nan")
        return out

    monkeypatch.setattr(train.CVAE, "forward", nan_after_first)
    with pytest.raises(SystemExit, match="3 consecutive non-finite steps"):
        _train(sim_root, tmp_path, "--niter", "2", "--epoch_size", "5", "--max_bad_steps", "3", "--sync_every", str(sync_every))
    run = os.path.join(tmp_path, [d for d in os.listdir(tmp_path) if d.startswith("rnn")][0])
    ckpt = checkpoints.load_checkpoint(os.path.join(run, "last.pth"))
    assert ckpt["skipped_steps"] == 3 and ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_mixed_precision_and_channels_last_run(sim_root, tmp_path):
    run = _train(sim_root, tmp_path, "--niter", "1", "--epoch_size", "2", "--amp", "bf16", "--channels_last",
                 "--plot_every", "9")
    m = test_script.main(["--model_dir", run, "--amp", "bf16", "--out", str(tmp_path / "t")])
    assert 5 < m["psnr"] < 100


@pytest.mark.slow
def test_action_free_learned_prior_end_to_end(sim_copy, tmp_path, capsys):
    """--cond none: trains and tests on frames alone (the CSV files are not needed), the learned prior is
    rebuilt by test.py from the checkpoint, and the condition ablations are refused with a reason."""
    import glob
    for f in glob.glob(os.path.join(sim_copy, "*", "*", "*", "*.csv")):
        os.remove(f)
    run = _train(sim_copy, tmp_path, "--niter", "1", "--epoch_size", "2", "--cond", "none", "--prior", "learned",
                 "--beta", "1e-4", "--free_bits", "0.1")
    assert run.endswith("-prior=learned-cond=none")
    ckpt = checkpoints.load_checkpoint(os.path.join(run, "model.pth"))
    assert ckpt["arch"]["cond_dim"] == 0 and ckpt["arch"]["prior"] == "learned"
    assert any(k.startswith("prior.") for k in ckpt["model"]) and not any(k.startswith("cond_embed") for k in ckpt["model"])
    m = test_script.main(["--model_dir", run, "--n_samples", "3", "--lpips", "--out", str(tmp_path / "t")])
    s = m["samples"]
    assert s["n_samples"] == 3 and s["psnr"]["best"] >= s["psnr"]["mean"] >= s["psnr"]["worst"]
    assert s["lpips"]["best"] <= s["lpips"]["mean"] <= s["lpips"]["worst"] and s["diversity_lpips"] >= 0
    for f in ("samples.gif", "samples.png", "samples_curves.png", "metrics.json"):
        assert (tmp_path / "t" / f).stat().st_size > 0, f
    with pytest.raises(SystemExit):
        test_script.main(["--model_dir", run, "--cond_mode", "shuffled"])
    assert "trained without conditions" in capsys.readouterr().err


@pytest.mark.slow
def test_extras_train_log_and_rebuild_in_test_script(sim_root, tmp_path):
    """The decoder modulated by the condition (FiLM, CondConv) and the spatial latent levels: a run of each
    (teacher forced, and fed back) logs each level's KL, saves its architecture, and test.py rebuilds it."""
    for cond_conv, levels, extra in (("film", 3, ["--prior", "learned"]),
                                     ("condconv", 2, ["--condconv_experts", "2", "--tfr", "0"])):
        run = _train(sim_root, tmp_path / cond_conv, "--niter", "1", "--epoch_size", "2", "--plot_every", "9",
                     "--cond_conv", cond_conv, "--latent_levels", str(levels), *extra)
        assert f"-latent_levels={levels}-cond_conv={cond_conv}" in run
        arch = checkpoints.load_checkpoint(os.path.join(run, "model.pth"))["arch"]
        assert arch["cond_conv"] == cond_conv and arch["latent_levels"] == levels and arch["z_spatial_dim"] == 4
        row = run_log.read_metrics(os.path.join(run, "metrics.csv"))[-1]
        assert len(row["kld_levels"]) == len(row["val_kld_levels"]) == levels
        assert row["val_kld"] == pytest.approx(sum(row["val_kld_levels"]), rel=1e-4)
        m = test_script.main(["--model_dir", run, "--out", str(tmp_path / cond_conv / "t")])
        assert m["n_sequences"] == 5 and 5 < m["psnr"] < 100


@pytest.mark.slow
def test_pixel_motion_trains_and_rebuilds_in_test_script(sim_root, tmp_path):
    """--motion: a run of each kind (half fed back) saves it in its architecture and test.py rebuilds it."""
    for kind in ("cdna", "flow"):
        run = _train(sim_root, tmp_path / kind, "--niter", "1", "--epoch_size", "2", "--plot_every", "9",
                     "--motion", kind, "--motion_kernels", "2", "--tfr", "0.5")
        assert run.endswith(f"-motion={kind}-2")
        arch = checkpoints.load_checkpoint(os.path.join(run, "model.pth"))["arch"]
        assert arch["motion"] == kind and arch["motion_kernels"] == 2
        m = test_script.main(["--model_dir", run, "--out", str(tmp_path / kind / "t")])
        assert m["n_sequences"] == 5 and 5 < m["psnr"] < 100


def test_amp_auto_resolution(monkeypatch):
    """--amp auto: bf16 exactly where the CPU has native bf16 units (the probe mocked both ways)."""
    import runtime
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "fma"})
    assert runtime.resolve_amp("auto", cpu) == "off"
    for flag in ("avx512_bf16", "amx_bf16"):
        monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", flag})
        assert runtime.resolve_amp("auto", cpu) == "bf16"
    assert runtime.resolve_amp("off", cpu) == "off" and runtime.resolve_amp("bf16", cpu) == "bf16"


def test_training_loads_only_the_rollouts_frames(sim_root):
    """The training split decodes the n_past + n_future frames a rollout uses (not --n_eval's 30); the
    validation split keeps --n_eval."""
    args = train.get_args_parser().parse_args(TINY + ["--data_root", sim_root])
    train_ds, val_ds = train.load_data(args, 1, True)
    assert train_ds[0][0].shape == (args.n_past + args.n_future, 3, 64, 64) and train_ds[0][1].shape[0] == 12
    assert val_ds[0][0].shape[0] == args.n_eval == 30


def _rollouts_timed_by_precision(seconds, timed=None):
    """A stand-in for fast.time_training_rollouts: seconds(bf16) per candidate, by the precision its context
    enters (as autocast reports it); each call's (frames shape, bf16) appended to `timed`."""
    def fake(runs, frames, conds, n_past, rounds=5):
        out = {}
        for name, (model, amp_context) in runs.items():
            with amp_context():
                bf16 = torch.is_autocast_enabled("cpu")
            if timed is not None:
                timed.append((frames.shape, bf16))
            out[name] = seconds(bf16)
        return out
    return fake


def test_amp_auto_is_measured_on_a_cpu_with_bf16_units(monkeypatch, capsys):
    """On a CPU with bf16 units --amp auto times a training rollout in both precisions and keeps bf16 only
    where it is faster by 10%; on a CPU without them it measures nothing (emulated bf16 is 7-19x slower)."""
    import runtime
    args = train.get_args_parser().parse_args(["--amp", "auto", "--batch_size", "2", "--base_channels", "4",
                                               "--g_dim", "8", "--z_dim", "2", "--rnn_size", "8", "--conv_layouts", "off"])
    model = CVAE.from_config(args)
    timed = []

    monkeypatch.setattr(fast, "time_training_rollouts", _rollouts_timed_by_precision(lambda bf16: seconds[bf16], timed))
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    for seconds, expected in (({False: 1.0, True: 0.5}, "bf16"), ({False: 1.0, True: 0.95}, "off"),
                              ({False: 1.0, True: 3.0}, "off")):
        timed.clear()
        assert train.choose_amp(model, args, torch.device("cpu"), True) == expected
        assert timed == [((2, args.n_past + args.n_future, 3, 64, 64), False), ((2, args.n_past + args.n_future, 3, 64, 64), True)]
        assert f"[amp] auto -> {expected} on cpu (measured" in capsys.readouterr().out
    # each precision is timed with its own convolution layouts, which the run then reuses without measuring again
    args.conv_layouts, layouts, measured = "auto", {}, []
    choose = fast.choose_conv_layouts
    monkeypatch.setattr(fast, "choose_conv_layouts", lambda *a, **k: measured.append(1) or choose(*a, **k))
    train.choose_amp(model, args, torch.device("cpu"), True, layouts=layouts)
    assert set(layouts) == {"off", "bf16"} and len(measured) == 2
    assert train.choose_conv_layouts(model, args, torch.device("cpu"), True, measured=layouts["off"]) == list(layouts["off"])
    assert len(measured) == 2 and "measured with --amp auto" in capsys.readouterr().out
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "fma"})
    timed.clear()
    assert train.choose_amp(model, args, torch.device("cpu"), True) == "off" and timed == []
    args.amp = "bf16"
    assert train.choose_amp(model, args, torch.device("cpu"), True) == "bf16"  # an explicit choice is kept
    # The real measurement: a copy is timed, the model's weights and statistics untouched.
    monkeypatch.undo()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    T = args.n_past + args.n_future
    calls = []

    @contextlib.contextmanager
    def context(name, pause=0.0):  # entered once per timed rollout
        calls.append(name)
        time.sleep(pause)
        yield
    sec = fast.time_training_rollouts({"fast": (model, lambda: context("fast")),
                                       "slow": (model, lambda: context("slow", 0.02))},
                                      torch.rand(2, T, 3, 64, 64), torch.randn(2, T, 7), args.n_past, rounds=3)
    assert 0 < sec["fast"] < sec["slow"] and sec["slow"] >= 0.02
    # one warm-up each, then the candidates alternate call by call
    assert calls == ["fast", "slow"] + ["fast", "slow"] * 3
    calls.clear()  # past its time budget the timing stops after the second round
    fast.time_training_rollouts({"fast": (model, lambda: context("fast")), "slow": (model, lambda: context("slow", 0.02))},
                                torch.rand(2, T, 3, 64, 64), torch.randn(2, T, 7), args.n_past, rounds=5, budget_s=0.0)
    assert calls == ["fast", "slow"] + ["fast", "slow"] * 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_amp_auto_is_saved_resolved_and_kept_on_resume(sim_root, tmp_path, monkeypatch):
    import runtime
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "avx512_bf16"})  # a host with native bf16

    monkeypatch.setattr(fast, "time_training_rollouts", _rollouts_timed_by_precision(lambda bf16: 1.0 if bf16 else 2.0))
    run = _train(sim_root, tmp_path, "--niter", "1", "--epoch_size", "1", "--plot_every", "9", "--amp", "auto")
    assert checkpoints.load_checkpoint(os.path.join(run, "last.pth"))["args"]["amp"] == "bf16"
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2"})  # resumed on a host without: the run's choice stays
    train.main(["--model_dir", run, "--niter", "2"])
    assert checkpoints.load_checkpoint(os.path.join(run, "last.pth"))["args"]["amp"] == "bf16"


def test_openmp_threads_sleep_only_where_others_use_the_cpu():
    """runtime.openmp_wait_policy: OpenMP's default spin on a CPU idle at start, sleeping threads (PASSIVE)
    where other processes used half a core or more, or the load is unknown; an explicit setting wins."""
    env = {}
    assert "idle" in runtime.openmp_wait_policy(env, lambda: 0.1) and env == {}
    for busy in (0.5, 1.3, None):
        env = {}
        assert "PASSIVE" in runtime.openmp_wait_policy(env, lambda: busy) and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for given in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "1000"}):
        env, looked = dict(given), []
        assert "as set" in runtime.openmp_wait_policy(env, lambda: looked.append(1) or 1.3) and env == given
        assert looked == []  # an explicit setting: the load is not even looked at
    busy = runtime.others_busy(0.05)
    assert busy is None or 0 <= busy <= os.cpu_count()
