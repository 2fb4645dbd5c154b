"""The benchmark scripts still run (at a tiny size) and print what their docstrings promise. Nothing here
depends on how fast they are: the numbers belong in the scripts' own output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run_json(*argv: str) -> dict:
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{") :])


@pytest.mark.slow
def test_cpu_stages_benchmark_runs_and_select_equals_the_pyarrow_sort() -> None:
    result = run_json(str(BENCHMARKS / "cpu_stages.py"), "--records", "3000", "--shards", "4", "--k", "300")
    assert result["identical_output"] is True
    assert result["read_scores"]["scores"] == 3000
    for step in ("select", "baseline", "export", "read_scores"):
        assert result[step]["seconds"] > 0 and result[step]["peak_rss_mib"] > 0
    assert not any(entry["torch_imported"] for entry in result["import"].values())


@pytest.mark.slow
def test_curation_scale_benchmark_runs_and_both_paths_keep_the_same_captions() -> None:
    result = run_json(str(BENCHMARKS / "curation_scale.py"), "--records", "3000", "--shards", "3")
    assert result["same_kept_set"] is True
    sharded = result["sharded"]
    assert set(sharded["peak_anon_mb"]) == {"shard_max", "dedup_partition_max", "merge"}
    assert all(value > 0 for value in sharded["peak_anon_mb"].values())
    assert result["single_pod"]["records_per_s"] > 0
