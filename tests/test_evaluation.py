"""The evaluation over samples: noise per (seed, sequence, sample), best/mean/worst of N against a naive
loop, and scores that do not depend on the batch size."""
import argparse
import math

import pytest
import torch

import evaluation
import lpips_torch
from dataset import bair_robot_pushing_dataset
from models import CVAE, fast


def test_sequence_noise_depends_on_seed_sequence_and_sample_only():
    a = evaluation.sequence_noise([3, 4, 5], 11, 6, seed=2, device="cpu", sample=1)
    b = evaluation.sequence_noise([5], 11, 6, seed=2, device="cpu", sample=1)
    assert torch.equal(a[2], b[0])  # the same sequence in another batch
    c = evaluation.sequence_noise([5], 11, 6, seed=2, device="cpu", sample=2)
    d = evaluation.sequence_noise([5], 11, 6, seed=3, device="cpu", sample=1)
    assert not torch.equal(b, c) and not torch.equal(b, d)
    # Sample 0 is the graded noise, a function of seed * 1_000_003 + sequence.
    g = torch.Generator().manual_seed(2 * 1_000_003 + 5)
    assert torch.equal(evaluation.sequence_noise([5], 11, 6, 2, "cpu")[0], torch.randn(11, 6, generator=g))
    # With spatial latent levels: a list, the global noise unchanged, the levels per sequence as well.
    spatial = [(2, 8, 8), (2, 16, 16)]
    e = evaluation.sequence_noise([3, 4, 5], 11, 6, seed=2, device="cpu", sample=1, spatial=spatial)
    f = evaluation.sequence_noise([5], 11, 6, seed=2, device="cpu", sample=1, spatial=spatial)
    assert [n.shape for n in e] == [(3, 11, 6), (3, 11, 2, 8, 8), (3, 11, 2, 16, 16)]
    assert torch.equal(e[0], a) and all(torch.equal(x[2], y[0]) for x, y in zip(e, f))


def test_best_mean_worst_against_a_naive_loop():
    torch.manual_seed(0)
    values = torch.rand(7, 5, 4, dtype=torch.float64)  # (sequences, samples, frames)
    for higher in (True, False):
        got = evaluation.summarize_samples(values, higher_is_better=higher)
        best, worst, mean = [], [], []
        for seq in values:
            scores = [s.mean().item() for s in seq]
            pick = max if higher else min
            best.append(seq[scores.index(pick(scores))])
            worst.append(seq[scores.index((min if higher else max)(scores))])
            mean.append(seq.mean(0))
        for name, curves in (("best", best), ("mean", mean), ("worst", worst)):
            curves = torch.stack(curves)
            assert got[name] == pytest.approx(curves.mean().item())
            assert got[f"{name}_per_step"] == pytest.approx(curves.mean(0).tolist())
            per_seq = curves.mean(1)
            assert got[f"{name}_ci95"] == pytest.approx(1.96 * per_seq.std(unbiased=False).item() / math.sqrt(7))
        assert (got["best"] >= got["mean"] >= got["worst"]) == higher


@pytest.mark.parametrize("kw", [dict(prior="fixed"), dict(prior="learned"),
                                dict(prior="learned", latent_levels=3, cond_conv="condconv")])
def test_sampled_scores_do_not_depend_on_the_batch(sim_root, tmp_path, kw):
    args = argparse.Namespace(data_root=sim_root, n_past=2, n_future=4, n_eval=0, cache_dir=str(tmp_path), quiet=True)
    ds = bair_robot_pushing_dataset(args, "test")
    torch.manual_seed(0)
    model = CVAE(g_dim=8, z_dim=4, rnn_size=16, base_channels=4, cond_embed_dim=4, **kw)
    model.train()
    x, c = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    model(x[:, :6], c[:, :6], 2, batched=True)  # BatchNorm statistics that make samples differ visibly
    cpu = torch.device("cpu")
    # Batch sizes 1 and 3, and the samples one per rollout (sample_rows=1) or stacked three to a rollout.
    runs = [evaluation.evaluate(model, ds, 2, 4, cpu, batch_size=bs, n_samples=3, keep=(1,), sample_rows=rows)
            for bs, rows in ((1, 256), (3, 1), (3, 256))]
    one = evaluation.evaluate(model, ds, 2, 4, cpu, batch_size=2)
    for r in runs:
        assert r["psnr"] == pytest.approx(one["psnr"], abs=1e-6)  # sample 0 is the graded prediction
        for key, value in runs[0]["samples"]["psnr"].items():
            assert r["samples"]["psnr"][key] == pytest.approx(value, abs=1e-6), key
        assert r["samples"]["diversity_pixel_std"] > 0
        clip = r["clips"][1]
        assert clip["samples"].shape == (3, 4, 3, 64, 64) and clip["posterior"].shape == (4, 3, 64, 64)
    for r in runs[1:]:
        torch.testing.assert_close(runs[0]["clips"][1]["samples"], r["clips"][1]["samples"], atol=1e-6, rtol=0)
        assert r["samples"]["diversity_pixel_std"] == pytest.approx(runs[0]["samples"]["diversity_pixel_std"], abs=1e-7)
    s = runs[0]["samples"]["psnr"]
    assert s["best"] >= s["mean"] >= s["worst"]


def test_lpips_scores_and_diversity_against_a_naive_loop(sim_root, tmp_path):
    lpips = lpips_torch.load_lpips("cpu")
    args = argparse.Namespace(data_root=sim_root, n_past=2, n_future=4, n_eval=0, cache_dir=str(tmp_path), quiet=True)
    ds = bair_robot_pushing_dataset(args, "test")
    torch.manual_seed(0)
    model = CVAE(g_dim=8, z_dim=4, rnn_size=16, base_channels=4, cond_embed_dim=4, prior="learned")
    x, c = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    model(x[:, :6], c[:, :6], 2, batched=True)  # BatchNorm statistics that make samples differ visibly
    n = len(ds)
    res = evaluation.evaluate(model, ds, 2, 4, torch.device("cpu"), batch_size=3, n_samples=3, lpips=lpips,
                              keep=range(n))
    to_gt, pairs = [], []
    with torch.no_grad():
        for i in range(n):
            gt, samples = res["clips"][i]["gt"][2:6], res["clips"][i]["samples"]  # (4, C, H, W), (3, 4, C, H, W)
            to_gt.append(torch.stack([lpips(gt, s) for s in samples]))  # (3, 4)
            pairs.append(torch.stack([lpips(samples[a], samples[b]) for a in range(3) for b in range(a + 1, 3)]).mean())
    naive = evaluation.summarize_samples(torch.stack(to_gt).double(), higher_is_better=False)
    for key in ("best", "mean", "worst"):
        assert res["samples"]["lpips"][key] == pytest.approx(naive[key], abs=1e-6), key
    assert res["lpips"] == pytest.approx(torch.stack(to_gt)[:, 0].mean().item(), abs=1e-6)
    assert res["samples"]["diversity_lpips"] == pytest.approx(torch.stack(pairs).mean().item(), abs=1e-6)
    assert res["samples"]["diversity_lpips"] > 0


def test_measured_conv_algorithms_score_as_the_direct_ones(sim_root, tmp_path, monkeypatch):
    """evaluate(algorithms="auto") screens each 3x3 layer shape once per process, times the candidates left on
    the evaluation's own calls and returns its choice; the scores equal the direct algorithm's up to rounding
    and, once chosen, do not depend on the batch; "direct" and "rule" need no measurement; a new process reads
    the choice from the cache file."""
    monkeypatch.setattr(evaluation, "_MEASURED", {})
    monkeypatch.setattr(evaluation, "ALGORITHM_CACHE", str(tmp_path / "conv_algorithms.json"))
    monkeypatch.setattr(fast, "ALGORITHMS", None)
    args = argparse.Namespace(data_root=sim_root, n_past=2, n_future=10, n_eval=0, cache_dir=str(tmp_path), quiet=True)
    ds = bair_robot_pushing_dataset(args, "test")
    torch.manual_seed(0)
    model = CVAE(g_dim=8, z_dim=4, rnn_size=16, base_channels=8, cond_embed_dim=4).eval()
    cpu, measured, trials = torch.device("cpu"), [], []
    choose = fast.choose_inference_algorithms
    monkeypatch.setattr(fast, "choose_inference_algorithms", lambda *a, **k: measured.append(a[1].shape) or choose(*a, **k))
    init = fast.OnlineChoice.__init__
    monkeypatch.setattr(fast.OnlineChoice, "__init__", lambda self, *a, **k: trials.append(self) or init(self, *a, **k))
    auto = evaluation.evaluate(model, ds, 2, 10, cpu, batch_size=3)
    assert measured == [(3, 2, 3, 64, 64)] and "8->8@64x64" in auto["inference_algorithms"]
    assert set(auto["inference_algorithms"].values()) <= {"direct", "nnpack", "f4"}
    assert trials and all(t.result() is not None for t in trials)  # every timed shape decided in the first batch
    assert evaluation._MEASURED == auto["inference_algorithms"]  # ... and is kept
    assert auto["inference_algorithms_s"] >= sum(t.cost_s for t in trials) >= 0
    direct = evaluation.evaluate(model, ds, 2, 10, cpu, batch_size=3, algorithms="direct")
    assert direct["inference_algorithms"] == {} and direct["psnr"] == pytest.approx(auto["psnr"], abs=1e-4)
    again = evaluation.evaluate(model, ds, 2, 10, cpu, batch_size=2)
    assert again["inference_algorithms"] == auto["inference_algorithms"] and again["psnr"] == pytest.approx(auto["psnr"], abs=1e-4)
    assert fast.ALGORITHMS is None  # each evaluation's choice lasts only for that evaluation
    evaluation.evaluate(model, ds, 2, 10, cpu, batch_size=3, algorithms="rule")
    assert len(measured) == 2  # the second "auto" call only recorded the shapes, all known: nothing timed
    # a new process reads the choice from the cache file and times nothing; the scores do not depend on the batch
    monkeypatch.setattr(evaluation, "_MEASURED", {})
    timed, n_trials = [], len(trials)
    monkeypatch.setattr(fast, "best_time", lambda *a, **k: timed.append(1) or 1.0)
    later = evaluation.evaluate(model, ds, 2, 10, cpu, batch_size=3)
    assert later["inference_algorithms"] == auto["inference_algorithms"] and later["psnr"] == pytest.approx(again["psnr"], abs=1e-6)
    assert timed == [] and len(trials) == n_trials


def test_algorithms_decided_by_the_screen_alone_are_kept(sim_root, tmp_path, monkeypatch):
    """A layer shape whose screen leaves only the direct algorithm (no timing on the evaluation's calls) is
    kept like a timed one: in the process and in the cache file, so that the next evaluation screens nothing."""
    monkeypatch.setattr(evaluation, "_MEASURED", {})
    monkeypatch.setattr(evaluation, "ALGORITHM_CACHE", str(tmp_path / "conv_algorithms.json"))
    monkeypatch.setattr(fast, "ALGORITHMS", None)
    args = argparse.Namespace(data_root=sim_root, n_past=2, n_future=10, n_eval=4, cache_dir=str(tmp_path), quiet=True)
    ds = bair_robot_pushing_dataset(args, "test")
    model = CVAE(g_dim=8, z_dim=4, rnn_size=16, base_channels=8, cond_embed_dim=4).eval()
    choose = fast.choose_inference_algorithms
    monkeypatch.setattr(fast, "choose_inference_algorithms", lambda *a, **k: choose(*a, **{**k, "screen_loss": 0.0}))
    monkeypatch.setattr(fast, "_nnpack_available", lambda: False)  # NNPACK is never screened out
    first = evaluation.evaluate(model, ds, 2, 10, torch.device("cpu"), batch_size=2)
    assert first["inference_algorithms"] and set(first["inference_algorithms"].values()) == {"direct"}
    assert evaluation._MEASURED == first["inference_algorithms"]
    monkeypatch.setattr(evaluation, "_MEASURED", {})  # a new process: only the cache file
    timed = []
    monkeypatch.setattr(fast, "best_time", lambda *a, **k: timed.append(1) or 1.0)
    later = evaluation.evaluate(model, ds, 2, 10, torch.device("cpu"), batch_size=2)
    assert later["inference_algorithms"] == first["inference_algorithms"] and timed == []
