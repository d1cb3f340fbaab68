"""make_sim_dataset.py: lab layout, file formats, determinism, action semantics, and that things move."""
import argparse
import json
import os
import re
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
BAIR_REAL = os.path.join(REPO, "..", "shared", "bair_real")

import make_sim_dataset as sim  # noqa: E402

COUNTS = dict(n_train=3, n_validate=2, n_test=2)
FLOAT = r"-?\d\.\d{18}e[+-]\d{2,3}"  # np.savetxt's default %.18e


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim") / "data"
    sim.generate(str(root), seed=0, workers=0, progress=False, **COUNTS)
    return root


def seq_dirs(root):
    return sorted(p for p in root.glob("*/*.tfrecords/*") if p.is_dir())


def data_files(root):
    """Relative path -> bytes of every PNG and CSV under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.suffix in (".png", ".csv")}


def load_all(root):
    acts = np.stack([np.loadtxt(d / "actions.csv", delimiter=",") for d in seq_dirs(root)])
    pos = np.stack([np.loadtxt(d / "endeffector_positions.csv", delimiter=",") for d in seq_dirs(root)])
    return acts, pos


def test_layout_and_file_names(root):
    assert sorted(os.listdir(root)) == ["dataset_info.json", "test", "train", "validate"]
    assert os.listdir(root / "train") == ["traj_0_to_2.tfrecords"]
    assert os.listdir(root / "validate") == ["traj_256_to_257.tfrecords"]
    assert os.listdir(root / "test") == ["traj_0_to_1.tfrecords"]
    assert sorted(os.listdir(root / "train" / "traj_0_to_2.tfrecords")) == ["0", "1", "2"]
    expected = sorted([f"{t}.png" for t in range(30)] + ["actions.csv", "endeffector_positions.csv"])
    for d in seq_dirs(root):
        assert sorted(os.listdir(d)) == expected, d
    info = json.loads((root / "dataset_info.json").read_text())
    assert info["counts"] == {"train": 3, "validate": 2, "test": 2}
    assert info["seed"] == 0 and info["image_size"] == [64, 64, 3]
    for key in ("actions", "endeffector_positions"):
        stats = info["train_stats"][key]
        assert set(stats) == {"mean", "std", "min", "max"} and len(stats["mean"]) == (4 if key == "actions" else 3)
    assert set(info["realism_test"]) >= {"mean_abs_change", "changed_fraction", "copy_last_psnr"}


def test_shards_of_256_like_bair():
    plan = sim.split_plan("train", 600)
    assert [s for s in dict.fromkeys(shard for _, shard, _ in plan)] == [
        "traj_0_to_255.tfrecords", "traj_256_to_511.tfrecords", "traj_512_to_599.tfrecords"]
    assert plan[255][1:] == ("traj_0_to_255.tfrecords", 255) and plan[256][1:] == ("traj_256_to_511.tfrecords", 0)
    assert [s for s in dict.fromkeys(shard for _, shard, _ in sim.split_plan("validate", 300))] == [
        "traj_256_to_511.tfrecords", "traj_512_to_555.tfrecords"]
    assert sim.split_plan("test", 256)[-1][1:] == ("traj_0_to_255.tfrecords", 255)


def test_png_frames_are_64x64_rgb_uint8(root):
    for d in seq_dirs(root)[:3]:
        for t in (0, 17, 29):
            img = Image.open(d / f"{t}.png")
            assert img.mode == "RGB" and img.size == (64, 64)
            arr = np.asarray(img)
            assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8


def test_csv_format_is_numpy_savetxt(root):
    for d in seq_dirs(root):
        for name, cols in (("actions.csv", 4), ("endeffector_positions.csv", 3)):
            text = (d / name).read_text()
            lines = text.splitlines()
            assert len(lines) == 30 and text.endswith("\n")
            line_re = re.compile(rf"^{FLOAT}(,{FLOAT}){{{cols - 1}}}$")
            assert all(line_re.match(line) for line in lines), f"{d / name}: {lines[0]!r}"
            arr = np.loadtxt(d / name, delimiter=",")
            assert arr.shape == (30, cols)


def test_same_seed_same_bytes_whatever_the_workers(root, tmp_path):
    again = tmp_path / "again"
    sim.generate(str(again), seed=0, workers=2, progress=False, **COUNTS)
    a, b = data_files(root), data_files(again)
    assert len(a) == 7 * 32 and a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    info_a = json.loads((root / "dataset_info.json").read_text())
    info_b = json.loads((again / "dataset_info.json").read_text())
    info_a.pop("wall_time_s"), info_b.pop("wall_time_s")
    assert info_a == info_b


def test_other_seed_other_data(root, tmp_path):
    other = tmp_path / "other"
    sim.generate(str(other), seed=1, workers=0, progress=False, n_train=1, n_validate=1, n_test=1)
    a, b = data_files(root), data_files(other)
    for name in ("train/traj_0_to_0.tfrecords/0/0.png", "train/traj_0_to_0.tfrecords/0/actions.csv"):
        assert b[name] != a[name.replace("traj_0_to_0", "traj_0_to_2")]


def test_actions_look_like_bair(root):
    acts, _ = load_all(root)
    assert np.abs(acts[..., :2]).max() <= 0.1
    assert acts[..., :2].std() > 0.01  # the arm does move
    assert np.array_equal(acts[:, 0::2], acts[:, 1::2])  # each row held for 2 frames
    for col, top in ((2, 2), (3, 1)):
        assert np.array_equal(acts[..., col], np.round(acts[..., col]))
        assert acts[..., col].min() >= 0 and acts[..., col].max() <= top


def test_actions_move_the_end_effector(root):
    acts, pos = load_all(root)
    a = acts[:, :-1, :2].reshape(-1, 2)  # action t acts between frame t and t+1
    d = np.diff(pos, axis=1)[..., :2].reshape(-1, 2)
    for c in range(2):
        assert np.corrcoef(a[:, c], d[:, c])[0, 1] > 0.95
    X = np.c_[a, np.ones(len(a))]
    coef, *_ = np.linalg.lstsq(X, d, rcond=None)
    r2 = 1 - ((d - X @ coef) ** 2).sum(0) / ((d - d.mean(0)) ** 2).sum(0)
    assert (r2 > 0.9).all(), r2
    # The height command sets the next frame's z.
    z_cmd = np.asarray(sim.Z_LEVELS)[acts[:, :-1, 2].astype(int)]
    assert np.abs(pos[:, 1:, 2] - z_cmd).mean() < 0.01


def test_end_effector_ranges_resemble_bair(root):
    _, pos = load_all(root)
    lo, hi = pos.reshape(-1, 3).min(0), pos.reshape(-1, 3).max(0)
    assert (lo >= [0.42, -0.27, 0.18]).all() and (hi <= [0.76, 0.17, 0.33]).all(), (lo, hi)


def test_frames_change_over_time(root):
    stats = sim.realism_stats(str(root / "test"))
    assert stats["sequences"] == 2
    assert 0.003 < stats["mean_abs_change"] < 0.08, stats
    assert stats["changed_fraction"] > 0.005, stats
    assert stats["copy_last_psnr"] < 35, stats


@pytest.mark.skipif(not os.path.isdir(BAIR_REAL), reason="../shared/bair_real not present")
def test_realism_stats_of_the_real_sequences():
    for name, path in (("lab_layout/175", "lab_layout/test"), ("actions_only/0", "actions_only/test")):
        got = sim.realism_stats(os.path.join(BAIR_REAL, path))
        ref = sim.REAL_BAIR_REFERENCE[name]
        for key in ref:
            assert got[key] == pytest.approx(ref[key], abs=2e-3 if key == "copy_last_psnr" else 1e-4), (name, key)


def test_refuses_to_overwrite_without_flag(root, capsys):
    with pytest.raises(FileExistsError, match="--overwrite"):
        sim.generate(str(root), n_train=1, n_validate=1, n_test=1, workers=0, progress=False)
    with pytest.raises(SystemExit, match="--overwrite"):
        sim.main(sim.get_args_parser().parse_args(["--data_root", str(root), "--workers", "0"]))


def test_overwrite_replaces_the_splits(tmp_path):
    out = tmp_path / "o"
    for _ in range(2):
        sim.generate(str(out), n_train=1, n_validate=1, n_test=1, workers=0, progress=False, overwrite=True)
    assert os.listdir(out / "train") == ["traj_0_to_0.tfrecords"]


@pytest.mark.parametrize("flags, message", [
    (["--n_test", "0"], "--n_test must be >= 1"),
    (["--n_train", "-3"], "--n_train must be >= 1"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--seed", "-1"], "--seed must be >= 0"),
])
def test_bad_flags_are_named(tmp_path, flags, message):
    args = sim.get_args_parser().parse_args(["--data_root", str(tmp_path / "x"), *flags])
    with pytest.raises(SystemExit, match=re.escape(message)):
        sim.main(args)
    assert not (tmp_path / "x").exists()


def test_montage(tmp_path):
    img = sim.make_montage(str(tmp_path / "m.png"), n_seq=1, frames=(0, 2))
    assert img.shape == (128, 2 * (64 * 2 + 2), 3)
    assert Image.open(tmp_path / "m.png").size == (img.shape[1], img.shape[0])


def test_the_repo_loader_reads_the_set(root):
    dataset = pytest.importorskip("dataset")
    if not hasattr(dataset, "bair_robot_pushing_dataset"):
        pytest.skip("dataset.py has no bair_robot_pushing_dataset")
    args = argparse.Namespace(data_root=str(root), n_past=2, n_future=10, n_eval=30, no_cache=True,
                              skip_bad_sequences=False)
    ds = dataset.bair_robot_pushing_dataset(args, "test")
    assert len(ds) == 2
    frames, conds = ds[0]
    assert tuple(frames.shape) == (30, 3, 64, 64)
    assert float(frames.min()) >= 0 and float(frames.max()) <= 1 and frames.is_floating_point()
    seq = root / "test" / "traj_0_to_1.tfrecords" / "0"
    want = np.concatenate([np.loadtxt(seq / "actions.csv", delimiter=","),
                           np.loadtxt(seq / "endeffector_positions.csv", delimiter=",")], 1).astype(np.float32)
    assert str(conds.dtype) == "torch.float32" and tuple(conds.shape) == (30, 7)
    np.testing.assert_array_equal(conds.numpy(), want)
    png = np.asarray(Image.open(seq / "5.png"), np.float32) / 255
    np.testing.assert_allclose(frames[5].numpy().transpose(1, 2, 0), png, atol=1e-6)
