"""tools/ab_commits.py: a recipe at two commits, alternating, end to end (tiny model, tiny data)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY

sys.path.insert(0, os.path.join(REPO, "tools"))
import ab_commits  # noqa: E402


def test_runs_alternate_base_head_head_base():
    assert ab_commits.order(1) == ["base", "head"]
    assert ab_commits.order(3) == ["base", "head", "head", "base", "base", "head"]


def test_a_revision_that_names_no_commit_is_refused(capsys):
    if ab_commits.resolve("HEAD") is None:
        pytest.skip("not a git checkout")
    with pytest.raises(SystemExit):
        ab_commits.main(["--base", "no-such-revision-x", "--no_peak"])
    assert "--base no-such-revision-x: not a commit" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ab_commits.main(["--base", "HEAD", "--rounds", "0"])
    assert "--rounds 0: must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_two_commits_side_by_side(sim_root, tmp_path):
    if ab_commits.resolve("HEAD") is None:
        pytest.skip("not a git checkout")
    out = tmp_path / "ab.json"
    flags = TINY + ["--amp", "off", "--niter", "2", "--epoch_size", "2", "--warmup", "1", "--eval_every", "2", "--plot_every", "2"]
    ab_commits.main(["--base", "HEAD", "--head", "HEAD", "--rounds", "1", "--no_peak", "--data_root", sim_root,
                     "--work", str(tmp_path / "work"), "--out", str(out), "--", *flags])
    res = json.loads(out.read_text())
    assert [r["commit"] for r in res["runs"]] == ["base", "head"]
    assert all(r["iterations"] == 4 and r["s_per_iteration"] > 0 and r["train_s"] > 0 for r in res["runs"])
    assert res["commits"]["base"] == res["commits"]["head"]
    s = res["summary"]
    assert s["train_s"]["base / head"] == pytest.approx(s["train_s"]["base"] / s["train_s"]["head"])
    # the same commit, the same seed: the same test scores
    assert s["test_psnr"]["base"] == pytest.approx(s["test_psnr"]["head"], abs=1e-6)
    trees = subprocess.run(["git", "worktree", "list"], cwd=REPO, capture_output=True, text=True).stdout
    assert str(tmp_path) not in trees  # the worktrees are removed, the runs kept
    assert (tmp_path / "work" / "runs" / "base1.log").is_file()
