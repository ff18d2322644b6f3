"""UDAT_TEST_SHARD (tests/conftest.py): the shards of a test run partition it, in order, and a
malformed value is refused."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "tests", "test_validation.py")


def _collected(shard=None):
    env = {k: v for k, v in os.environ.items() if k != "UDAT_TEST_SHARD"}
    if shard is not None:
        env["UDAT_TEST_SHARD"] = shard
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                          "no:cacheprovider", SAMPLE], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    return res, [line for line in res.stdout.splitlines() if "::" in line]


def test_shards_partition_the_run_in_order():
    _, everything = _collected()
    assert len(everything) > 7
    shards = [_collected(f"{i}/3")[1] for i in range(3)]
    assert all(shards)
    assert sum(shards, []) == everything


def test_a_malformed_shard_is_refused():
    for bad in ("3/3", "1", "a/b"):
        res, _ = _collected(bad)
        assert res.returncode != 0
        assert "UDAT_TEST_SHARD" in res.stdout + res.stderr
