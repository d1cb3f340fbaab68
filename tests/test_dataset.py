"""The lab-layout loader: parsing, the decoded cache, order with workers, and errors naming the file."""
import argparse
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import BAIR_REAL, seq_dirs, write_png
from dataset import DataError, bair_robot_pushing_dataset


def _args(root, tmp_path, **kw):
    base = dict(data_root=root, n_past=2, n_future=10, n_eval=30, no_cache=False,
                cache_dir=str(tmp_path / "cache"), skip_bad_sequences=False, num_workers=0, quiet=True)
    return argparse.Namespace(**{**base, **kw})


def test_reads_sim_set_and_cache_equals_png(sim_root, tmp_path):
    png = bair_robot_pushing_dataset(_args(sim_root, tmp_path, no_cache=True), "test")
    cached = bair_robot_pushing_dataset(_args(sim_root, tmp_path), "test")
    assert len(png) == len(cached) == 5
    for i in range(len(png)):
        (x1, c1), (x2, c2) = png[i], cached[i]
        assert x1.shape == (30, 3, 64, 64) and c1.shape == (30, 7) and c1.dtype == torch.float32
        assert 0 <= x1.min() and x1.max() <= 1
        assert torch.equal(x1, x2) and torch.equal(c1, c2)
    seq = seq_dirs(sim_root, "test")[2]
    expected = np.concatenate([np.loadtxt(os.path.join(seq, "actions.csv"), delimiter=","),
                               np.loadtxt(os.path.join(seq, "endeffector_positions.csv"), delimiter=",")], 1)
    np.testing.assert_allclose(cached[2][1].numpy(), expected, rtol=1e-6)


def test_every_sequence_once_in_order_with_workers(sim_root, tmp_path):
    args = _args(sim_root, tmp_path, n_eval=0)  # T = n_past + n_future = 12
    ds = bair_robot_pushing_dataset(args, "train")
    ref = torch.stack([ds[i][1] for i in range(len(ds))])
    got = torch.cat([c for _, c in DataLoader(ds, batch_size=3, num_workers=2)])
    assert got.shape == (8, 12, 7) and torch.equal(got, ref)


def test_cache_is_rebuilt_when_a_file_changes(sim_copy, tmp_path):
    ds = bair_robot_pushing_dataset(_args(sim_copy, tmp_path), "test")
    seq = seq_dirs(sim_copy, "test")[0]
    write_png(os.path.join(seq, "5.png"), np.zeros((64, 64, 3)))
    ds2 = bair_robot_pushing_dataset(_args(sim_copy, tmp_path), "test")
    assert ds2.cache_path != ds.cache_path
    assert ds2[0][0][5].max() == 0 and ds[0][0][5].max() > 0


def test_cache_built_concurrently_keeps_the_first(sim_root, tmp_path, monkeypatch):
    # Two runs started at once (experiments.py --jobs 2) build the same cache: the one that finishes second
    # finds the target already renamed into place and must read that one, not fail or leave its build behind.
    import dataset
    rename = os.rename

    def rename_after_another_build(src, dst):
        if os.path.basename(src).startswith(".building-") and not os.path.exists(dst):
            monkeypatch.setattr(dataset.os, "rename", rename)  # the other process's own build renames normally
            bair_robot_pushing_dataset(_args(sim_root, tmp_path), "test")
        rename(src, dst)

    monkeypatch.setattr(dataset.os, "rename", rename_after_another_build)
    ds = bair_robot_pushing_dataset(_args(sim_root, tmp_path), "test")
    assert len(ds) == 5 and ds[0][0].shape == (30, 3, 64, 64)
    assert os.listdir(tmp_path / "cache") == [os.path.basename(ds.cache_path)]


def _listing(root):
    return sorted((d, tuple(sorted(f))) for d, _, f in os.walk(root))


@pytest.mark.skipif(not os.path.isdir(BAIR_REAL), reason="../shared/bair_real not present")
def test_real_bair_sequences(tmp_path):
    before = _listing(BAIR_REAL)
    ds = bair_robot_pushing_dataset(_args(os.path.join(BAIR_REAL, "lab_layout"), tmp_path), "test")  # cached
    x, c = ds[0]
    assert x.shape == (30, 3, 64, 64) and c.shape == (30, 7)
    assert torch.equal(c[0::2, :4], c[1::2, :4])  # BAIR holds each action for two frames
    with pytest.raises(DataError, match="endeffector_positions.csv: missing file"):
        bair_robot_pushing_dataset(_args(os.path.join(BAIR_REAL, "actions_only"), tmp_path), "test")
    # The conditions a model does not use are not required: the actions alone, or frames alone.
    actions = bair_robot_pushing_dataset(_args(os.path.join(BAIR_REAL, "actions_only"), tmp_path, cond="action"), "test")
    frames_only = bair_robot_pushing_dataset(_args(os.path.join(BAIR_REAL, "actions_only"), tmp_path, cond="none"), "test")
    assert actions[0][1].shape == (30, 4) and frames_only[0][1].shape == (30, 0)
    assert torch.equal(actions[0][0], frames_only[0][0])
    assert _listing(BAIR_REAL) == before  # the caches went to --cache_dir: nothing written into the data


def test_read_only_data_root(sim_copy, tmp_path):
    """A data root the user cannot write (a shared BAIR copy) works with the cache elsewhere."""
    for d, _, files in os.walk(sim_copy):
        for f in files:
            os.chmod(os.path.join(d, f), 0o444)
        os.chmod(d, 0o555)
    before = _listing(sim_copy)
    try:
        ds = bair_robot_pushing_dataset(_args(sim_copy, tmp_path), "test")
        assert len(ds) == 5 and ds[4][0].shape == (30, 3, 64, 64)
        assert _listing(sim_copy) == before and ds.cache_path.startswith(str(tmp_path / "cache"))
    finally:
        for d, _, _ in os.walk(sim_copy):
            os.chmod(d, 0o755)


def _break(seq, what):
    if what == "corrupt png":
        open(os.path.join(seq, "3.png"), "wb").write(b"\x89PNG\r\n\x1a\n garbage")
        return "3.png: unreadable or corrupt image"
    if what == "missing frame":
        os.remove(os.path.join(seq, "7.png"))
        return "7.png: missing frame"
    if what == "grayscale":
        write_png(os.path.join(seq, "0.png"), np.zeros((64, 64)))
        return "0.png: expected an RGB image, found mode L"
    if what == "wrong size":
        write_png(os.path.join(seq, "1.png"), np.zeros((32, 48, 3)))
        return "1.png: expected 64x64 pixels, found 48x32"
    path = os.path.join(seq, "actions.csv")
    rows = open(path).read().splitlines()
    if what == "truncated csv":
        open(path, "w").write("\n".join(rows[:12]) + "\n")
        return "actions.csv: expected 30 rows x 4 columns, found 12 x 4"
    if what == "nan":
        rows[4] = "nan,0,0,0"
    elif what == "text":
        rows[4] = "a,b,c,d"
    open(path, "w").write("\n".join(rows) + "\n")
    return "actions.csv: contains NaN" if what == "nan" else "actions.csv: not a comma-separated numeric table"


@pytest.mark.parametrize("what", ["corrupt png", "missing frame", "grayscale", "wrong size", "truncated csv",
                                  "nan", "text"])
@pytest.mark.parametrize("no_cache", [False, True])
def test_bad_data_names_the_file(sim_copy, tmp_path, what, no_cache):
    seq = seq_dirs(sim_copy, "test")[1]
    msg = _break(seq, what)
    with pytest.raises(DataError) as err:
        ds = bair_robot_pushing_dataset(_args(sim_copy, tmp_path, no_cache=no_cache), "test")
        [ds[i] for i in range(len(ds))]  # with no_cache, content is checked on access
    assert seq in str(err.value) and msg in str(err.value)
    ds = bair_robot_pushing_dataset(_args(sim_copy, tmp_path, no_cache=no_cache, skip_bad_sequences=True), "test")
    assert len(ds) == 4 and seq not in ds.seqs and len(ds.bad) == 1 and msg in ds.bad[0]
    assert all(torch.isfinite(ds[i][1]).all() for i in range(len(ds)))


def test_empty_or_missing_split(tmp_path):
    (tmp_path / "root" / "test").mkdir(parents=True)
    with pytest.raises(DataError, match="empty split"):
        bair_robot_pushing_dataset(_args(str(tmp_path / "root"), tmp_path), "test")
    with pytest.raises(DataError, match="split directory not found"):
        bair_robot_pushing_dataset(_args(str(tmp_path / "root"), tmp_path), "train")
