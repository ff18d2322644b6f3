"""benchmarks/gpu_check.sh on a machine without a GPU: every stage says what it could not do, the
measured-against-modelled table still closes the log ("not measured"), one stage budget fits
five minutes, and only files git does not track are removed from the output folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import udat_kernels as uk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def test_the_stage_budget_fits_five_minutes():
    text = open(SCRIPT).read()
    table = re.search(r'STAGES="\n(.*?)"\n', text, re.S).group(1)
    rows = [line.split() for line in table.splitlines() if line.strip()]
    reserve = int(re.search(r"RESERVE_S=(\d+)", text).group(1))
    assert [r[0] for r in rows][:1] == ["build"]
    assert sum(int(r[2]) for r in rows) + reserve <= 300, rows
    assert all(int(r[1]) <= int(r[2]) for r in rows)


@pytest.mark.skipif(not uk._C_loader.available(), reason="the extension is not built")
def test_runs_without_a_gpu_and_keeps_committed_files(tmp_path):
    repo = tmp_path / "results"
    docs = repo / "docs" / "gpu"
    (docs / "cuda").mkdir(parents=True)
    (docs / "cuda" / "committed.md").write_text("a committed GPU result\n")
    git = ["git", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "r"],
                   check=True)
    (docs / "cuda" / "stale.jsonl").write_text("{}\n")  # left over from an earlier run
    env = {**os.environ, "GPU_CHECK_DOCS": str(docs), "GPU_CHECK_SKIP_BUILD": "1",
           "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "GPU_CHECK_BUDGET_S": "200",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("OUT", None)
    res = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (docs / "cuda" / "committed.md").read_text() == "a committed GPU result\n"
    assert not (docs / "cuda" / "stale.jsonl").exists()
    log = (docs / "gpu_check.log").read_text()
    assert "| build | ok |" in log
    for stage in ("selfcheck", "new-tests", "correctness", "paper", "large", "end-to-end"):
        assert f"| {stage} | nothing measured (no CUDA device) |" in log, log[-3000:]
    tail = log[log.index("=== summary"):]
    assert "measured against modelled" in tail
    assert tail.rstrip().splitlines()[-1].endswith("| not measured |")
