"""tools/gpu_check.sh --device cpu: the GPU check's dry run (tiny sizes) runs every section and prints its figures."""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_gpu_check_dry_run(sim_root, tmp_path):
    out = tmp_path / "check"
    res = subprocess.run(["bash", os.path.join(REPO, "tools", "gpu_check.sh"), "--device", "cpu", "--out", str(out),
                          "--data_root", sim_root, "--python", sys.executable, "--fp32_seconds", "0"],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    assert summary in res.stdout.replace("\n\n", "\n") or all(line in res.stdout for line in summary.splitlines())
    assert re.search(r"^python [\d.]+, torch [^,]+, CUDA ", summary, re.M) and "device: cpu" in summary
    assert "cuda tests: ok" in summary and "bench (dry run: --help only): ok" in summary
    m = re.search(r"^train bf16 \(batch 12, cpu\): (\d+\.\d+) it/s \((\d+\.\d) ms/it\) over (\d+) iterations .*"
                  r"projected 180k-iteration schedule: (\d+\.\d+) h \((\d+) s", summary, re.M)
    assert m, summary
    ips, ms, iters, seconds = float(m.group(1)), float(m.group(2)), int(m.group(3)), int(m.group(5))
    assert ips > 0 and iters == 6  # epochs 1 and 2 of 3 epochs of 3 iterations: epoch 0 (start-up) left out
    assert abs(seconds - 180 * ms) <= 180 * 0.05 + 1  # 180,000 iterations x ms/it (printed to 0.1 ms)
    assert "train fp32: skipped" in summary and "all sections passed" in summary
