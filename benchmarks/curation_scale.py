"""Caption curation at scale: the one-pod stage vs the sharded path (filter shards -> dedup partitions ->
merge), on synthetic captions generated here (not shipped), with planted exact and near duplicates.

    .venv/bin/python benchmarks/curation_scale.py --records 1000000 [--shards 5] [--mode both]

Every task runs in its own process, as it would in its own pod; each reports its wall time and peak RSS
(ru_maxrss). The steps are those that need no model or LLM (heuristics, dedup, sample to half the pool):
the models' per-caption work only divides over more shards. Prints one JSON object:
records/s of the one-pod run, of the sharded tasks run one after another (total pod-seconds), and of the
sharded critical path (slowest shard + slowest partition + merge: all pods of a step at once); peak RSS of
the one pod and the largest of any sharded task; whether both kept the same captions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = [
    "red",
    "blue",
    "green",
    "yellow",
    "small",
    "large",
    "old",
    "new",
    "wooden",
    "stone",
    "glass",
    "metal",
    "dog",
    "cat",
    "horse",
    "bird",
    "car",
    "boat",
    "bus",
    "house",
    "tree",
    "river",
    "street",
    "park",
    "beach",
    "mountain",
    "city",
    "table",
    "chair",
    "window",
    "door",
    "lamp",
    "book",
    "cup",
    "plate",
    "child",
    "woman",
    "man",
    "chef",
    "player",
    "dancer",
    "sunny",
    "rainy",
    "foggy",
    "night",
    "morning",
    "evening",
    "under",
    "over",
    "beside",
    "near",
    "behind",
    "with",
    "without",
    "running",
    "sitting",
    "standing",
    "walking",
    "holding",
    "looking",
    "playing",
]


def generate(path: Path, n: int, seed: int = 0) -> None:
    """n captions: ~10% exact copies (case and punctuation changed), ~10% near copies (one word changed)."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    with open(path, "w", encoding="utf-8") as out:
        bases: list[str] = []
        for i in range(n):
            roll = rng.random()
            if len(bases) > 100 and roll < 0.1:
                caption = bases[int(rng.integers(0, len(bases)))].upper() + "!"
            elif len(bases) > 100 and roll < 0.2:
                tokens = bases[int(rng.integers(0, len(bases)))].split()
                tokens[int(rng.integers(1, len(tokens)))] = str(words[int(rng.integers(0, len(words)))])
                caption = " ".join(tokens)
            else:
                caption = "A " + " ".join(words[rng.integers(0, len(words), int(rng.integers(12, 22)))]) + "."
                if len(bases) < 200_000:
                    bases.append(caption)
                else:
                    bases[int(rng.integers(0, len(bases)))] = caption
            out.write(json.dumps({"id": f"c{i:09d}", "caption": caption}) + "\n")


def config(n: int):
    from synthvlm.stages.curate import CurateConfig

    return CurateConfig.model_validate(
        {
            "judge": {"enabled": False},
            "clip": {"enabled": False},
            "sample_size": n // 2,
        }
    )


def task(args: argparse.Namespace) -> None:
    """One task in this process; prints {"seconds", "peak_rss_mb", "output"}."""
    from synthvlm.curation import sharded
    from synthvlm.stages.curate import curate

    cfg = config(args.records)
    work = args.work
    anon = AnonPeak()
    started = time.perf_counter()
    if args.task == "single":
        out = curate(cfg, args.input, os.path.join(work, "single", "curated.jsonl"))
    elif args.task == "shard":
        out = sharded.curate_shard(cfg, args.input, os.path.join(work, "sharded"), args.rank, args.shards)
    elif args.task == "dedup":
        outs = json.loads(Path(args.list).read_text())
        out = sharded.dedup_partition(cfg, outs, os.path.join(work, "sharded"), args.rank, args.shards)
    else:
        lists = json.loads(Path(args.list).read_text())
        out = sharded.merge(
            cfg, lists["shards"], lists["pairs"], os.path.join(work, "sharded", "curated.jsonl")
        )
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "peak_anon_mb": anon.stop(), "output": out}))


class AnonPeak:
    """Peak anonymous memory (RssAnon, sampled every 10 ms): what a pod cannot give back. Peak RSS also
    counts the pages of memory-mapped files, which the kernel drops under pressure."""

    def __init__(self) -> None:
        import threading

        self.peak, self.done = 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _read(self) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
        return 0

    def _sample(self) -> None:
        while not self.done.wait(0.01):
            self.peak = max(self.peak, self._read())

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return round(max(self.peak, self._read()) / 1024, 1)


def run_task(base: list[str], *extra: str) -> dict:
    proc = subprocess.run([*base, *extra], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=0, help="0: records / 200K (the default shard size)")
    parser.add_argument("--mode", choices=("both", "single", "sharded"), default="both")
    parser.add_argument("--work", default="")
    parser.add_argument("--task", choices=("single", "shard", "dedup", "merge"), help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--list", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.task:
        task(args)
        return

    from synthvlm.curation.sharded import num_shards

    shards = args.shards or num_shards(args.records, 200_000, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        source = Path(work) / "captions.jsonl"
        started = time.perf_counter()
        generate(source, args.records)
        result: dict = {
            "records": args.records,
            "shards": shards,
            "generate_seconds": round(time.perf_counter() - started, 1),
            "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start",
        }
        base = [
            sys.executable,
            __file__,
            "--records",
            str(args.records),
            "--work",
            work,
            "--input",
            str(source),
        ]
        if args.mode in ("both", "single"):
            single = run_task(base, "--task", "single")
            result["single_pod"] = {
                "seconds": round(single["seconds"], 1),
                "records_per_s": round(args.records / single["seconds"]),
                "peak_rss_mb": round(single["peak_rss_mb"]),
                "peak_anon_mb": single["peak_anon_mb"],
            }
        if args.mode in ("both", "sharded"):
            common = ["--shards", str(shards)]
            shard_runs = [run_task(base, "--task", "shard", "--rank", str(r), *common) for r in range(shards)]
            listing = Path(work) / "shards.json"
            listing.write_text(json.dumps([s["output"] for s in shard_runs]))
            dedup_runs = [
                run_task(base, "--task", "dedup", "--rank", str(p), "--list", str(listing), *common)
                for p in range(shards)
            ]
            listing.write_text(
                json.dumps(
                    {"shards": [s["output"] for s in shard_runs], "pairs": [d["output"] for d in dedup_runs]}
                )
            )
            merged = run_task(base, "--task", "merge", "--list", str(listing), *common)
            total = sum(r["seconds"] for r in [*shard_runs, *dedup_runs, merged])
            critical = max(r["seconds"] for r in shard_runs) + max(r["seconds"] for r in dedup_runs)
            critical += merged["seconds"]
            result["sharded"] = {
                "pod_seconds": round(total, 1),
                "records_per_s_one_pod_at_a_time": round(args.records / total),
                "critical_path_seconds": round(critical, 1),
                "records_per_s_all_pods_at_once": round(args.records / critical),
                "peak_rss_mb": {
                    "shard_max": round(max(r["peak_rss_mb"] for r in shard_runs)),
                    "dedup_partition_max": round(max(r["peak_rss_mb"] for r in dedup_runs)),
                    "merge": round(merged["peak_rss_mb"]),
                },
                "peak_anon_mb": {
                    "shard_max": max(r["peak_anon_mb"] for r in shard_runs),
                    "dedup_partition_max": max(r["peak_anon_mb"] for r in dedup_runs),
                    "merge": merged["peak_anon_mb"],
                },
                "seconds": {
                    "shard_max": round(max(r["seconds"] for r in shard_runs), 1),
                    "dedup_partition_max": round(max(r["seconds"] for r in dedup_runs), 1),
                    "merge": round(merged["seconds"], 1),
                },
            }
            if args.mode == "both":
                same = Path(single["output"]).read_bytes() == Path(merged["output"]).read_bytes()
                result["same_kept_set"] = same
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
