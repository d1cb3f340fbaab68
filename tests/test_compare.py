"""compare.py against numbers computed directly from the run files; experiments.py end to end and its resume."""
import csv
import json
import math
import os

import numpy as np
import pytest

import compare
import experiments
import test as test_script
import train_fixed_prior as train
from conftest import TINY

SHORT = ["--niter", "2", "--epoch_size", "2", "--eval_every", "1", "--plot_every", "9"]


# ------------------------------------------------------------------ fabricated runs: fast, exact numbers

def _fake_run(path, args, rows, tests=None, extra_lines=()):
    """A run directory as train_fixed_prior.py and test.py lay it out, with chosen numbers."""
    os.makedirs(path)
    with open(os.path.join(path, "train_record.txt"), "w") as f:
        f.write(f"args: {args}\n[epoch: 00] loss: 1.00000 | mse loss: 1.00000 | kld loss: 0.00000\n")
        for line in extra_lines:
            f.write(line + "\n")
    cols = ["epoch", "step", "loss", "mse", "kld", "beta", "tfr", "lr", "val_psnr", "seconds", "kld_active_dims"]
    with open(os.path.join(path, "metrics.csv"), "w") as f:
        f.write(",".join(cols) + "\n")
        for r in rows:
            f.write(",".join("" if r.get(k) is None else str(r.get(k)) for k in cols) + "\n")
    for sub, m in (tests or {}).items():
        os.makedirs(os.path.join(path, sub))
        json.dump(m, open(os.path.join(path, sub, "metrics.json"), "w"))
    return str(path)


def _rows(n, step, val, secs=2.0):
    return [{"epoch": e, "step": (e + 1) * step, "loss": 0.1, "mse": 0.01 / (e + 1), "kld": 0.5, "beta": 1.0,
             "tfr": 1.0, "lr": 0.002, "val_psnr": val[e], "seconds": secs, "kld_active_dims": "3"} for e in range(n)]


ARGS = {"lr": 0.002, "niter": 3, "epoch_size": 10, "seed": 1, "log_dir": "x", "data_root": "d", "num_workers": 0,
        "kl_anneal_cyclical": False, "some_future_flag": [1, 2]}


def test_fabricated_runs_table_notes_and_errors(tmp_path, capsys):
    a1 = _fake_run(tmp_path / "a1", {**ARGS, "log_dir": "a/seed1"}, _rows(3, 10, [18.0, None, 19.0]),
                   {"test": {"psnr": 20.0, "ssim": 0.7, "copy_last_psnr": 15.0},
                    "test_shuffled": {"psnr": 16.0, "ssim": 0.5, "copy_last_psnr": 15.0}})
    a2 = _fake_run(tmp_path / "a2", {**ARGS, "seed": 2, "num_workers": 4}, _rows(3, 10, [17.0, 19.5, 19.2], 4.0),
                   {"test": {"psnr": 21.0, "ssim": 0.8, "copy_last_psnr": 15.0,
                             "fvd": {"predicted": {"fvd": 120.5, "copy_last_fvd": 900.0},
                                     "whole": {"fvd": 80.25, "copy_last_fvd": 700.0}}}})
    # Configuration B: started with lr 0.002 and niter 2, resumed with overrides; then a shorter seed.
    b1 = _fake_run(tmp_path / "b1", {**ARGS, "lr": 0.002, "niter": 2}, _rows(3, 10, [10.0, 11.0, 12.0]),
                   {"test": {"psnr": 23.0, "ssim": 0.9, "copy_last_psnr": 15.0}},
                   ["resumed from b1/last.pth at epoch 1, step 10", "override lr: 0.002 -> 0.01",
                    "override niter: 2 -> 3", "override log_dir: x -> y/z"])
    b2 = _fake_run(tmp_path / "b2", {**ARGS, "lr": 0.01, "seed": 2}, _rows(2, 5, [11.0, 12.5]),
                   {"test": {"psnr": 23.4, "ssim": 0.9, "copy_last_psnr": 15.0}})
    res = compare.main([a1, a2, b1, b2, "--out", str(tmp_path / "out")])
    assert res["differing"] == ["lr"]
    labels = [c["label"] for c in res["configs"]]
    assert labels == ["lr=0.002", "lr=0.01"]
    ta, tb = res["table"]
    assert ta["n_seeds"] == tb["n_seeds"] == 2
    assert ta["val_final_mean"] == pytest.approx((19.0 + 19.2) / 2)
    assert ta["val_best_mean"] == pytest.approx((19.0 + 19.5) / 2)
    assert ta["val_best_spread"] == pytest.approx(0.25)  # half the range
    assert ta["test_psnr_mean"] == pytest.approx(20.5) and ta["test_psnr_spread"] == pytest.approx(0.5)
    assert ta["gain_copy_last_mean"] == pytest.approx(5.5)
    assert ta["gain_shuffled_mean"] == pytest.approx(4.0) and ta["gain_shuffled_n"] == 1
    assert ta["fvd_predicted_mean"] == 120.5 and ta["fvd_whole_mean"] == 80.25 and ta["fvd_whole_n"] == 1
    assert ta["sec_per_iter_mean"] == pytest.approx((6 / 30 + 12 / 30) / 2)
    assert tb["sec_per_iter_mean"] == pytest.approx((6 / 30 + 4 / 10) / 2)
    assert ta["train_min_mean"] == pytest.approx((6 + 12) / 2 / 60)  # the epochs' training seconds summed
    assert tb["vs_first_db"] == pytest.approx(23.2 - 20.5) and tb["vs_first"] == "larger than the seed spread"
    assert "seed 2: no shuffled-conditions test" in ta["notes"]
    assert "seed 1: resumed (epoch 1, step 10)" in tb["notes"]
    assert "seed 2: shorter run (10 of 30 steps)" in tb["notes"]
    md = open(tmp_path / "out" / "compare.md").read()
    assert "half the range" in md and "`lr=0.01`" in md and "+2.70 dB (larger than the seed spread)" in md
    assert "test FVD, predicted frames" in md and "120.5 (1 of 2)" in md
    assert "interpolated" in md  # B's seeds logged different steps
    assert "| `lr=0.002` | 2 |" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "out" / "compare.csv")))
    assert [r["label"] for r in rows] == labels and float(rows[1]["test_psnr_mean"]) == pytest.approx(23.2)
    assert os.path.getsize(tmp_path / "out" / "compare.png") > 10000
    assert os.path.getsize(tmp_path / "out" / "compare_time.png") > 10000

    # The std variant, and a pair whose seeds overlap.
    c2 = _fake_run(tmp_path / "c2", {**ARGS, "lr": 0.005}, _rows(3, 10, [1, 2, 3]),
                   {"test": {"psnr": 20.9, "ssim": 0.7, "copy_last_psnr": 15.0}})
    c3 = _fake_run(tmp_path / "c3", {**ARGS, "lr": 0.005, "seed": 3}, _rows(3, 10, [1, 2, 3]),
                   {"test": {"psnr": 20.3, "ssim": 0.7, "copy_last_psnr": 15.0}})
    res = compare.main([a1, a2, c2, c3, b1, "--out", str(tmp_path / "out2"), "--spread", "std"])
    assert res["table"][1]["vs_first"] == "within seed spread"
    assert res["table"][0]["test_psnr_spread"] == pytest.approx(np.std([20.0, 21.0], ddof=1))
    assert res["table"][2]["vs_first"] == "a single tested seed: spread unknown"
    assert "Every pair" in res["markdown"]

    # A run that predates a flag is the configuration with the flag's default.
    d1 = _fake_run(tmp_path / "d1", {**ARGS, "seed": 5, "lr_schedule": "constant"}, _rows(3, 10, [1, 2, 3]))
    d2 = _fake_run(tmp_path / "d2", {**ARGS, "lr_schedule": "cosine"}, _rows(3, 10, [1, 2, 3]))
    res = compare.main([a1, d1, d2, "--out", str(tmp_path / "out3")])
    assert [c["label"] for c in res["configs"]] == ["lr_schedule=constant", "lr_schedule=cosine"]
    assert len(res["configs"][0]["runs"]) == 2


def test_not_a_run_is_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        compare.main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and f"{tmp_path / 'empty'} is not a training run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert "nowhere: no such directory" in capsys.readouterr().err


# ------------------------------------------------------------------ real tiny runs

def _train(root, log_dir, *extra):
    return train.main(["--data_root", root, "--log_dir", str(log_dir), "--cache_dir", str(log_dir.parent / "cache"),
                       *TINY, *extra])


@pytest.fixture(scope="module")
def tiny_runs(sim_root, tmp_path_factory):
    """Two configurations (lr) x two seeds; lr=0.01 seed 2 interrupted after one epoch and resumed;
    lr=0.002 seed 2 never tested."""
    base = tmp_path_factory.mktemp("cmp")
    runs = {}
    for lr in ("0.002", "0.01"):
        for seed in ("1", "2"):
            if (lr, seed) == ("0.01", "2"):
                first = _train(sim_root, base / f"lr{lr}" / f"seed{seed}", "--niter", "1", "--epoch_size", "2",
                               "--eval_every", "1", "--plot_every", "9", "--lr", lr, "--seed", seed)
                run = train.main(["--model_dir", first, "--niter", "2"])
            else:
                run = _train(sim_root, base / f"lr{lr}" / f"seed{seed}", *SHORT, "--lr", lr, "--seed", seed)
            if (lr, seed) != ("0.002", "2"):
                for mode in ("real", "shuffled"):
                    test_script.main(["--model_dir", run, "--cond_mode", mode, "--cache_dir", str(base / "cache")])
            runs[(lr, seed)] = run
    return base, runs


def _metrics(run):
    with open(os.path.join(run, "metrics.csv")) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_table_equals_the_files(tiny_runs, capsys):
    base, runs = tiny_runs
    order = [runs[k] for k in (("0.002", "1"), ("0.002", "2"), ("0.01", "1"), ("0.01", "2"))]
    res = compare.main(order + ["--out", str(base / "out")])
    out = capsys.readouterr().out
    assert [c["label"] for c in res["configs"]] == ["lr=0.002", "lr=0.01"] and res["differing"] == ["lr"]
    for (lr, cfg_row) in zip(("0.002", "0.01"), res["table"]):
        seeds = [runs[(lr, s)] for s in ("1", "2")]
        finals, bests, secs = [], [], []
        for run in seeds:
            rows = _metrics(run)
            vals = [float(r["val_psnr"]) for r in rows if r["val_psnr"]]
            finals.append(vals[-1])
            bests.append(max(vals))
            secs.append(sum(float(r["seconds"]) for r in rows) / float(rows[-1]["step"]))
            assert float(rows[-1]["step"]) == 4
        tests = [json.load(open(os.path.join(r, "test", "metrics.json")))["psnr"] for r in seeds
                 if os.path.isfile(os.path.join(r, "test", "metrics.json"))]
        assert cfg_row["n_seeds"] == 2
        assert cfg_row["val_final_mean"] == pytest.approx(np.mean(finals), abs=1e-4)
        assert cfg_row["val_final_spread"] == pytest.approx((max(finals) - min(finals)) / 2, abs=1e-4)
        assert cfg_row["val_best_mean"] == pytest.approx(np.mean(bests), abs=1e-4)
        assert cfg_row["test_psnr_mean"] == pytest.approx(np.mean(tests), abs=1e-9)
        assert cfg_row["test_psnr_n"] == len(tests)
        assert cfg_row["sec_per_iter_mean"] == pytest.approx(np.mean(secs), rel=1e-4)
        assert f"`lr={float(lr)}`" in out
    first, second = res["table"]
    assert first["test_psnr_n"] == 1 and "seed 2: no test" in first["notes"]
    assert "seed 2: resumed (epoch 1, step 2)" in second["notes"] and "no test" not in second["notes"]
    assert "shorter" not in first["notes"] + second["notes"]
    resumed = [r for c in res["configs"] for r in c["runs"] if r["resumes"]]
    assert len(resumed) == 1 and resumed[0]["args"]["niter"] == 2  # the override applied
    assert os.path.getsize(base / "out" / "compare.png") > 10000
    md = open(base / "out" / "compare.md").read()
    assert "(1 of 2)" in md and "no test" in md and "resumed" in md


@pytest.mark.slow
def test_experiment_set_runs_then_skips(sim_root, tmp_path, capsys):
    argv = ["annealing", "--seeds", "1", "--data_root", sim_root, "--log_dir", str(tmp_path / "exp"),
            *TINY, *SHORT, "--cache_dir", str(tmp_path / "cache")]
    res = experiments.main(argv)
    out = capsys.readouterr().out
    assert [d["label"] for d in res["runs"]] == ["kl_anneal_cyclical=False", "kl_anneal_cyclical=True"]
    assert [c["label"] for c in res["compare"]["configs"]] == ["kl_anneal_cyclical=False", "kl_anneal_cyclical=True"]
    for d in res["runs"]:
        assert d["run"].startswith(str(tmp_path / "exp" / "annealing" / d["label"] / "seed1") + os.sep)
        for sub in ("test", "test_shuffled"):
            assert os.path.isfile(os.path.join(d["run"], sub, "metrics.json"))
    assert "[annealing 1/2] kl_anneal_cyclical=False seed=1: trained" in out and " dB" in out
    assert os.path.isfile(tmp_path / "exp" / "annealing" / "compare.png")
    table = res["compare"]["table"]
    assert all(not math.isnan(r["test_psnr_mean"]) and r["notes"] == "" for r in table)
    # The set's time: the runs' training epochs (metrics.csv) and tests (metrics.json), written and printed.
    with open(tmp_path / "exp" / "annealing" / "timing.json") as f:
        timing = json.load(f)
    assert timing["runs"] == 2 and timing["train_seconds"] == pytest.approx(
        sum(float(r["seconds"]) for d in res["runs"] for r in _metrics(d["run"])), abs=0.2)
    assert 0 < timing["train_seconds"] + timing["test_seconds"] <= timing["wall_seconds_this_call"]
    assert "[annealing] 2 runs; this call" in out

    mtimes = [os.path.getmtime(os.path.join(d["run"], "last.pth")) for d in res["runs"]]
    res2 = experiments.main(argv)
    out = capsys.readouterr().out
    assert [d["status"] for d in res2["runs"]] == ["skipped (finished)"] * 2
    assert "[annealing 2/2] kl_anneal_cyclical=True seed=1: skipped (finished)" in out
    assert [os.path.getmtime(os.path.join(d["run"], "last.pth")) for d in res2["runs"]] == mtimes
    assert [r["test_psnr_mean"] for r in res2["compare"]["table"]] == [r["test_psnr_mean"] for r in table]

    # Another set sharing the base configuration: lr=0.002 is annealing's kl_anneal_cyclical=False run
    # (the same flags and seed), linked rather than trained again; lr=0.01 trains.
    res_lr = experiments.main(["lr", *argv[1:]])
    out = capsys.readouterr().out
    base_run, new_run = res_lr["runs"][0]["run"], res_lr["runs"][1]["run"]
    assert os.path.islink(base_run) and os.path.realpath(base_run) == os.path.realpath(res["runs"][0]["run"])
    assert "lr=0.002 seed=1: the same run as annealing" in out
    assert os.path.getmtime(os.path.join(res["runs"][0]["run"], "last.pth")) == mtimes[0]
    assert not os.path.islink(new_run) and os.path.isfile(os.path.join(new_run, "test", "metrics.json"))
    assert experiments.main(["lr", *argv[1:]])["runs"][0]["status"] == "skipped (finished)"

    # A longer --niter: each run resumes from its last.pth (not a fresh start) and ends at the new length.
    res3 = experiments.main(argv + ["--niter", "3"])
    assert "[annealing 1/2] kl_anneal_cyclical=False seed=1: resumed at epoch 2" in capsys.readouterr().out
    assert [d["run"] for d in res3["runs"]] == [d["run"] for d in res["runs"]]
    assert all(len(_metrics(d["run"])) == 3 for d in res3["runs"])
    assert all("resumed" in r["notes"] for r in res3["compare"]["table"])


def test_experiment_sets_listed_and_unknown_flags_refused(capsys, tmp_path):
    experiments.main(["--list"])
    out = capsys.readouterr().out
    for name in ("annealing", "teacher_forcing", "lr", "prior"):
        assert f"\n{name}: " in out
    assert "--tfr_decay_step 0.25" in out and "--lr 0.01" in out
    with pytest.raises(SystemExit) as e:
        experiments.main(["annealing", "--log_dir", str(tmp_path), "--no_such_flag", "3"])
    assert "does not accept --no_such_flag 3" in str(e.value.code)
    assert not os.path.exists(tmp_path / "annealing")


@pytest.mark.slow
def test_experiment_set_in_parallel(sim_root, tmp_path, capsys):
    # --jobs 2: the runs train in two worker processes at once, one thread each, their output in log.txt;
    # every run is trained and tested, the records come back in job order, and a second call skips them.
    # --n_samples 3 adds the best-of-3 test to each run and its columns to the table.
    argv = ["lr", "--seeds", "1", "--jobs", "2", "--n_samples", "3", "--data_root", sim_root,
            "--log_dir", str(tmp_path / "exp"), *TINY, *SHORT, "--cache_dir", str(tmp_path / "cache")]
    res = experiments.main(argv)
    out = capsys.readouterr().out
    assert [d["label"] for d in res["runs"]] == ["lr=0.002", "lr=0.01"]  # job order, whichever ends first
    assert "2 runs, 2 at a time with 1 thread(s) each" in out
    for d in res["runs"]:
        assert f"seed={d['seed']}: trained" in d["line"] and d["line"] in out
        assert len(_metrics(d["run"])) == 2
        assert os.path.isfile(os.path.join(d["run"], "test_shuffled", "metrics.json"))
        log = open(os.path.join(os.path.dirname(d["run"]), "log.txt")).read()
        assert "[epoch: 01]" in log and "test psnr" in log  # the run's output went to its log, not the terminal
    assert "[epoch: 01]" not in out
    assert res["timing"]["jobs"] == 2 and res["timing"]["threads"] == 1
    for row, d in zip(res["compare"]["table"], res["runs"]):
        with open(os.path.join(d["run"], "test_samples", "metrics.json")) as f:
            m = json.load(f)
        assert m["n_samples"] == 3 and row["best_psnr_mean"] == m["samples"]["psnr"]["best"]
        assert row["best_psnr_mean"] >= row["test_psnr_mean"] - 1e-9  # sample 0 is the graded prediction
    assert "best-of-3 test PSNR (dB)" in open(tmp_path / "exp" / "lr" / "compare.md").read()
    res2 = experiments.main(argv)
    assert [d["status"] for d in res2["runs"]] == ["skipped (finished)"] * 2


def test_experiments_fvd_retests_runs_whose_test_lacks_it(tmp_path):
    run = _fake_run(tmp_path / "r", ARGS, _rows(1, 10, [18.0]),
                    {"test": {"psnr": 20.0}, "test_shuffled": {"psnr": 19.0}})
    assert experiments.tests_needed(run) == [] and experiments.tests_needed(run, fvd=True) == ["real"]
    json.dump({"psnr": 20.0, "fvd": {}}, open(os.path.join(run, "test", "metrics.json"), "w"))
    assert experiments.tests_needed(run, fvd=True) == []
