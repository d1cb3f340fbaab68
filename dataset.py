"""BAIR robot pushing sequences in the course's `processed_data` layout -> (frames, conditions) tensors.

    <data_root>/<split>/traj_<a>_to_<b>.tfrecords/<k>/{0..29}.png, actions.csv, endeffector_positions.csv

Sequences are listed once, sorted by (trajectory shard, k), and addressed by index: any number of
DataLoader workers sees every sequence exactly once (no counter inside the Dataset). The first use of
a split decodes every PNG and CSV into a memory-mapped uint8/float32 cache, written atomically and
keyed by a fingerprint of the listing (paths, sizes, mtimes), so later runs skip PNG decoding.

    python dataset.py --data_root data/processed_data --split test   # validate a split, build its cache
"""
import argparse
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from multiprocessing import Pool

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

SEQ_LEN = 30  # frames per BAIR sequence
IMG_SIZE = 64
COND_FILES = (("actions.csv", 4), ("endeffector_positions.csv", 3))  # cond_t = [action_t, endeffector_t]
# --cond: which per-frame conditions the model gets, and so which files a sequence needs. "none" is the
# action-free model (SVG on BAIR): frames only, the CSV files are not read.
CONDITIONS = {"action_pos": COND_FILES, "action": COND_FILES[:1], "none": ()}
CACHE_VERSION = 1


class DataError(ValueError):
    """A sequence or split that does not follow the lab layout; the message names the file."""


def _natural_key(name):
    """traj_256_to_511.tfrecords -> (256, ...); '12' -> (12,): numeric order, not string order."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_sequences(split_dir):
    """Sorted sequence directories of one split (two levels below it)."""
    if not os.path.isdir(split_dir):
        raise DataError(f"{split_dir}: split directory not found; expected <data_root>/<split>/"
                        f"traj_<a>_to_<b>.tfrecords/<k>/ with 0.png..29.png and the two CSV files")
    seqs = []
    for traj in sorted(os.listdir(split_dir), key=_natural_key):
        tdir = os.path.join(split_dir, traj)
        if traj.startswith(".") or not os.path.isdir(tdir):
            continue
        for k in sorted(os.listdir(tdir), key=_natural_key):
            if os.path.isdir(os.path.join(tdir, k)):
                seqs.append(os.path.join(tdir, k))
    if not seqs:
        raise DataError(f"{split_dir}: empty split, no sequence directories <traj>/<k>/ found")
    return seqs


def required_files(seq_dir, cond_files=COND_FILES):
    return [os.path.join(seq_dir, f"{i}.png") for i in range(SEQ_LEN)] + \
           [os.path.join(seq_dir, name) for name, _ in cond_files]


def read_csv(path, n_cols):
    """A (30, n_cols) float32 array from an np.savetxt file; DataError naming the file otherwise."""
    try:
        arr = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except FileNotFoundError:
        raise DataError(f"{path}: missing file") from None
    except ValueError as e:
        raise DataError(f"{path}: not a comma-separated numeric table ({e})") from None
    if arr.shape != (SEQ_LEN, n_cols):
        raise DataError(f"{path}: expected {SEQ_LEN} rows x {n_cols} columns, found "
                        f"{arr.shape[0]} x {arr.shape[1] if arr.ndim > 1 else 1}")
    if not np.isfinite(arr).all():
        raise DataError(f"{path}: contains NaN or infinite values")
    return arr.astype(np.float32)


def read_png(path):
    """A (64, 64, 3) uint8 RGB frame; DataError naming the file otherwise (PIL decodes RGB, never BGR)."""
    try:
        with Image.open(path) as im:
            im.load()
            mode, size, arr = im.mode, im.size, np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"{path}: missing frame") from None
    except Exception as e:  # PIL raises several types for truncated or foreign files
        raise DataError(f"{path}: unreadable or corrupt image ({type(e).__name__}: {e})") from None
    if mode != "RGB":
        raise DataError(f"{path}: expected an RGB image, found mode {mode}")
    if size != (IMG_SIZE, IMG_SIZE):
        raise DataError(f"{path}: expected {IMG_SIZE}x{IMG_SIZE} pixels, found {size[0]}x{size[1]}")
    return arr


def load_sequence(seq_dir, cond_files=COND_FILES):
    """All 30 frames (30, 64, 64, 3) uint8 and conditions (30, 7) float32 of one sequence directory
    ((30, 4) with the actions only, (30, 0) without conditions)."""
    conds = np.concatenate([np.zeros((SEQ_LEN, 0), np.float32)] +
                           [read_csv(os.path.join(seq_dir, name), n) for name, n in cond_files], 1)
    frames = np.stack([read_png(os.path.join(seq_dir, f"{i}.png")) for i in range(SEQ_LEN)])
    return frames, conds




def _pad(messages, keep):
    """Align the cache's list of bad-sequence messages with its keep mask (one message per False)."""
    it = iter(messages)
    return [None if k else next(it) for k in keep]


def fingerprint(seqs, root, cond_files=COND_FILES):
    """Hash of every required file's relative path, size and mtime: any change invalidates the cache."""
    h = hashlib.sha1(f"v{CACHE_VERSION}".encode())
    for seq in seqs:
        for f in required_files(seq, cond_files):
            try:
                st = os.stat(f)
                h.update(f"{os.path.relpath(f, root)}:{st.st_size}:{st.st_mtime_ns};".encode())
            except FileNotFoundError:
                h.update(f"{os.path.relpath(f, root)}:missing;".encode())
    return h.hexdigest()[:20]


def _load_or_none(seq_dir, cond_files=COND_FILES):
    try:
        return load_sequence(seq_dir, cond_files), None
    except DataError as e:
        return None, str(e)


def build_cache(seqs, cache_path, workers=0, skip_bad=False, progress=True, cond_files=COND_FILES):
    """Decode every sequence into <cache_path>/{frames,conds}.npy + index.json, atomically.

    The arrays are written into a temporary directory beside the target and renamed into place only
    when complete, so an interrupted build never leaves a cache that looks valid.
    """
    parent = os.path.dirname(cache_path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".building-", dir=parent)
    try:
        n = len(seqs)
        frames = np.lib.format.open_memmap(os.path.join(tmp, "frames.npy"), "w+", np.uint8,
                                           (n, SEQ_LEN, IMG_SIZE, IMG_SIZE, 3))
        conds = np.zeros((n, SEQ_LEN, sum(c for _, c in cond_files)), np.float32)
        keep, bad = np.ones(n, bool), []
        pool = Pool(workers) if workers > 0 else None
        load = functools.partial(_load_or_none, cond_files=cond_files)
        results = pool.imap(load, seqs, chunksize=8) if pool else map(load, seqs)
        if progress:
            from tqdm import tqdm
            results = tqdm(results, total=n, desc=f"caching {os.path.basename(cache_path)}", leave=False)
        try:
            for i, (item, err) in enumerate(results):
                if err is not None:
                    if not skip_bad:
                        raise DataError(err + "  (pass --skip_bad_sequences to train on the other sequences)")
                    keep[i] = False
                    bad.append(err)
                    continue
                frames[i], conds[i] = item
        finally:
            if pool:
                pool.terminate()
        frames.flush()
        del frames
        np.save(os.path.join(tmp, "conds.npy"), conds)
        with open(os.path.join(tmp, "index.json"), "w") as f:
            json.dump({"version": CACHE_VERSION, "keep": keep.tolist(), "bad": bad}, f)
        try:
            os.rename(tmp, cache_path)
        except OSError:
            # Built concurrently by another process (the rename fails on a non-empty target, also when it
            # appeared after any check made here): keep theirs, which is complete, since it was renamed.
            if not os.path.isfile(os.path.join(cache_path, "index.json")):
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class bair_robot_pushing_dataset(Dataset):
    """One item per sequence of `<data_root>/<mode>`, in sorted order.

    Returns frames (T, 3, 64, 64) float32 in [0, 1] and conditions (T, 7) float32, where
    T = min(max(n_past + n_future, n_eval), 30). Reads the decoded cache unless args.no_cache.
    Optional args: cond (CONDITIONS: which CSV files are read; conditions (T, 0) with "none"), no_cache,
    cache_dir, skip_bad_sequences, num_workers (cache build), quiet.
    """

    def __init__(self, args, mode="train"):
        self.root = os.path.abspath(args.data_root)
        self.mode = mode
        self.seq_len = min(max(args.n_past + args.n_future, getattr(args, "n_eval", 0)), SEQ_LEN)
        skip_bad = getattr(args, "skip_bad_sequences", False)
        quiet = getattr(args, "quiet", False)
        self.cond_files = cond_files = CONDITIONS[getattr(args, "cond", "action_pos")]
        split_dir = os.path.join(self.root, mode)
        if not os.path.isdir(self.root):
            raise DataError(f"--data_root {args.data_root}: directory not found")
        seqs = list_sequences(split_dir)
        bad = {}  # sequence dir -> what is wrong with it
        # Missing files are found up front from the listing, so a training run does not die hours in.
        for seq in seqs:
            missing = [f for f in required_files(seq, cond_files) if not os.path.isfile(f)]
            if missing:
                bad[seq] = f"{missing[0]}: missing " + ("frame" if missing[0].endswith(".png") else "file")
                if not skip_bad:
                    raise DataError(bad[seq] + "  (pass --skip_bad_sequences to train on the other sequences)")
        good = [s for s in seqs if s not in bad]
        self.frames = self.conds = None
        if getattr(args, "no_cache", False):
            if skip_bad:  # content errors are only found by decoding; do it once here
                bad.update({s: m for s in good if (m := _load_or_none(s, cond_files)[1]) is not None})
                good = [s for s in good if s not in bad]
        else:
            cache_root = getattr(args, "cache_dir", "") or os.path.join(self.root, ".cache")
            self.cache_path = os.path.join(cache_root, f"{mode}-{fingerprint(seqs, self.root, cond_files)}")
            if not os.path.isdir(self.cache_path):
                build_cache(good, self.cache_path, getattr(args, "num_workers", 0), skip_bad, not quiet, cond_files)
            with open(os.path.join(self.cache_path, "index.json")) as f:
                index = json.load(f)
            keep = np.asarray(index["keep"], bool)
            bad.update({s: m for s, k, m in zip(good, keep, _pad(index["bad"], keep)) if not k})
            self.rows = np.flatnonzero(keep)  # cache rows of the good sequences
            good = [s for s, k in zip(good, keep) if k]
            self.conds = np.load(os.path.join(self.cache_path, "conds.npy"))
            self.frames = None  # memory-mapped lazily, once per worker process
        self.seqs, self.bad = good, list(bad.values())
        if self.bad and not quiet:
            print(f"[dataset] {mode}: skipping {len(self.bad)} bad sequence(s):\n  " + "\n  ".join(self.bad))
        if not self.seqs:
            raise DataError(f"{split_dir}: no usable sequences")

    def __len__(self):
        return len(self.seqs)

    def head(self, n):
        """Keep the first n sequences in sorted order (a cheaper, reproducible evaluation subset)."""
        self.seqs = self.seqs[:n]
        if self.conds is not None:
            self.rows = self.rows[:n]
        return self

    def _raw(self, index):
        if self.conds is None:
            return load_sequence(self.seqs[index], self.cond_files)
        if self.frames is None:
            self.frames = np.load(os.path.join(self.cache_path, "frames.npy"), mmap_mode="r")
        row = self.rows[index]
        return self.frames[row], self.conds[row]

    def __getitem__(self, index):
        frames, conds = self._raw(index)
        T = self.seq_len
        x = torch.from_numpy(np.array(frames[:T])).permute(0, 3, 1, 2).float().div_(255)  # (T, 3, 64, 64)
        return x, torch.from_numpy(np.array(conds[:T], dtype=np.float32))  # (T, 7)

    def cond_stats(self):
        """Per-column mean and std of the conditions over the split (for input standardisation)."""
        conds = self.conds[self.rows] if self.conds is not None else np.stack([self._raw(i)[1] for i in range(len(self))])
        flat = conds.reshape(int(np.prod(conds.shape[:-1])), conds.shape[-1]).astype(np.float64)  # (N * 30, cond_dim)
        return flat.mean(0).astype(np.float32), flat.std(0).astype(np.float32)


def get_args_parser():
    p = argparse.ArgumentParser("Validate a split of the lab layout and build its decoded cache",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_root", default="./data/processed_data", help="root holding train/validate/test")
    p.add_argument("--split", default="train", choices=["train", "validate", "test"], help="split to load")
    p.add_argument("--no_cache", action="store_true", help="decode PNGs on every access instead of caching")
    p.add_argument("--cache_dir", default="", help="where caches live (default: <data_root>/.cache)")
    p.add_argument("--skip_bad_sequences", action="store_true", help="list bad sequences and leave them out")
    p.add_argument("--num_workers", type=int, default=2, help="processes decoding PNGs for the cache")
    return p


if __name__ == "__main__":
    a = get_args_parser().parse_args()
    a.n_past, a.n_future, a.n_eval = 2, 10, 30
    try:
        ds = bair_robot_pushing_dataset(a, a.split)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    x, c = ds[0]
    mean, std = ds.cond_stats()
    print(f"{a.split}: {len(ds)} sequences, frames {tuple(x.shape)}, conds {tuple(c.shape)}")
    print("condition mean", np.round(mean, 4), "std", np.round(std, 4))
