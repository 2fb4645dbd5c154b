"""The CPU stages at scale: `select` (global top-k over scored shards) and `export` (LLaVA JSON), against a
plain pyarrow sort over the same shards with the same output.

Generates N synthetic scored records (default 1M, SynthVLM §3.2's pool) in 64 JSONL shards under a
temporary folder (generated, never shipped): records as generate + clip_score write them (id, caption,
seed, image_uri under the data root, scores clip + llm, provenance with the generation settings and the
scorer), clip scores rounded to 3 decimals so that many records tie and the id decides. Then, each step in
a fresh Python process (so that its peak RSS is its own and imports are counted):

- select: `synthvlm.stages.select.select`, top-k (default 100K), through the stage runner (input
  fingerprints included: the shards have no completion markers, so their bytes are hashed);
- baseline: a plain pyarrow pass: read_json of each shard, one sort by (score descending, id ascending),
  the top k's lines written out; the output is compared byte for byte with select's;
- export: `synthvlm.stages.export_llava.export_llava` of the selection, with its defaults: LLaVA JSON,
  manifest, WebDataset shards and dataset card (each selected image is one small JPEG, written before
  the step and not timed: the shards copy image bytes);
- read_scores: `synthvlm.manifest_table.read_scores` over all shards (what the report reads to draw the
  histogram of all scores);
- import: `import synthvlm.stages.<stage>` alone, and whether torch got imported.

Prints one JSON object: seconds (imports excluded: they are the "import" steps) and peak RSS (MiB,
ru_maxrss, imports included) per step, select / baseline, whether the outputs are identical.

    .venv/bin/python benchmarks/cpu_stages.py                      # 1M records, 64 shards, top 100K
    .venv/bin/python benchmarks/cpu_stages.py --records 200000     # smaller
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORDS = (
    "a",
    "photo",
    "of",
    "the",
    "red",
    "blue",
    "green",
    "small",
    "large",
    "old",
    "young",
    "dog",
    "cat",
    "tree",
    "car",
    "house",
    "street",
    "sky",
    "river",
    "mountain",
    "woman",
    "man",
    "child",
    "playing",
    "sitting",
    "standing",
    "next",
    "to",
    "with",
    "on",
    "in",
    "under",
    "near",
    "bright",
    "dark",
)


def generate(folder: Path, records: int, shards: int, seed: int = 0) -> list[str]:
    """Write `records` scored records round-robin into `shards` JSONL shards; returns the shard paths."""
    from synthvlm.records import Record

    rng = random.Random(seed)
    generation = {
        "model": "stabilityai/stable-diffusion-xl-base-1.0",
        "revision": "462165984030d82259a11f4367a4eed129e94a7b",
        "scheduler": "euler",
        "steps": 60,
        "guidance_scale": 7.5,
        "height": 1024,
        "width": 1024,
        "dtype": "bfloat16",
        "negative_prompt": None,
        "global_seed": 0,
    }
    scorer = {"model": "ViT-L-14", "pretrained": "openai", "form": "cosine"}
    images = folder / "data" / "images"
    bodies: list[list[str]] = [[] for _ in range(shards)]
    for i in range(records):
        rec_id = f"cap{i:09d}"
        caption = " ".join(rng.choices(WORDS, k=rng.randint(8, 24)))
        record = Record.model_construct(
            id=rec_id,
            caption=caption,
            seed=rng.getrandbits(31),
            image_uri=str(images / f"{rec_id}.jpg"),
            scores={"clip": round(rng.gauss(0.3, 0.05), 3), "llm": rng.random()},
            provenance={
                "source_id": rec_id,
                "generation": {**generation, "seed_repeat": 0, "batch": {"index": i // 8, "size": 8}},
                "clip_scorer": scorer,
            },
        )
        bodies[i % shards].append(record.model_dump_json())
    paths = []
    for n, lines in enumerate(bodies):
        path = folder / "scored" / f"scored-{n:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        paths.append(str(path))
    return paths


def baseline(shards: list[str], k: int, output: str) -> None:
    """A plain pyarrow pass: read every shard, sort once by (score desc, id asc), write the top k lines."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj

    parts = []
    for path in shards:
        raw = Path(path).read_bytes()
        table = pj.read_json(pa.BufferReader(raw))
        ends = np.flatnonzero(np.frombuffer(raw, np.uint8) == ord("\n")) + 1
        offsets = pa.py_buffer(np.concatenate(([0], ends)).astype(np.int64))
        lines = pa.Array.from_buffers(pa.large_binary(), len(ends), [None, offsets, pa.py_buffer(raw)])
        parts.append(
            pa.table({"score": pc.struct_field(table["scores"], "clip"), "id": table["id"], "line": lines})
        )
    table = pa.concat_tables(parts)
    order = pc.sort_indices(table, sort_keys=[("score", "descending"), ("id", "ascending")])
    top = table.take(order[:k])
    Path(output).write_bytes(b"".join(top["line"].to_pylist()))


def run_step(step: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One step in this process; returns its seconds and peak RSS."""
    shards = json.loads((work / "shards.json").read_text()) if step != "generate" else []
    # Each run writes into a folder of its own: the stage runner would reuse an earlier run's output.
    fresh = Path(tempfile.mkdtemp(prefix=f"{step.replace(':', '-')}-", dir=work))
    if not step.startswith("import:"):  # imports are timed on their own (the "import" steps)
        import pyarrow.json  # noqa: F401

        import synthvlm.manifest_table
        import synthvlm.stages.export_llava
        import synthvlm.stages.select  # noqa: F401
    started = time.perf_counter()
    out: dict[str, Any] = {}
    if step == "generate":
        shards = generate(work, args.records, args.shards)
        (work / "shards.json").write_text(json.dumps(shards))
        out["input_mib"] = round(sum(os.path.getsize(p) for p in shards) / 2**20, 1)
    elif step == "select":
        from synthvlm.stages.select import SelectConfig, select

        versioned = select(SelectConfig(mode="top_k", k=args.k), shards, str(fresh / "selected.jsonl"))
        (work / "selected.txt").write_text(versioned)
    elif step == "baseline":
        baseline(shards, args.k, str(fresh / "baseline.jsonl"))
        (work / "baseline.txt").write_text(str(fresh / "baseline.jsonl"))
    elif step == "images":  # setup for export, not a stage: one small JPEG written per selected image
        import io

        from PIL import Image

        from synthvlm.records import read_manifest

        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (120, 80, 40)).save(buffer, "JPEG")
        for record in read_manifest((work / "selected.txt").read_text()):
            image = Path(
                record.image_uri if record.image_uri.startswith("/") else work / "data" / record.image_uri
            )
            if not image.exists():
                image.parent.mkdir(parents=True, exist_ok=True)
                image.write_bytes(buffer.getvalue())
    elif step == "export":
        from synthvlm.stages.export_llava import ExportConfig, export_llava

        selected = (work / "selected.txt").read_text()
        exported = export_llava(ExportConfig(), selected, str(work / "data"), str(fresh / "export"))
        (work / "export.txt").write_text(exported)
    elif step == "compare":
        selected, plain = ((work / f"{name}.txt").read_text() for name in ("selected", "baseline"))
        out["identical"] = Path(selected).read_bytes() == Path(plain).read_bytes()
    elif step == "read_scores":
        from synthvlm.manifest_table import read_scores

        out["scores"] = sum(len(read_scores(uri, "clip")) for uri in shards)
    elif step.startswith("import:"):
        __import__(f"synthvlm.stages.{step.split(':', 1)[1]}")
        out["torch_imported"] = "torch" in sys.modules
    else:
        raise SystemExit(f"unknown step {step}")
    out["seconds"] = round(time.perf_counter() - started, 3)
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def in_child(step: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    # A child of a fresh interpreter: ru_maxrss survives fork + exec, so this parent stays small.
    argv = [sys.executable, __file__, "--step", step, "--work", str(work), "--k", str(args.k)]
    argv += ["--records", str(args.records), "--shards", str(args.shards)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"step {step} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=1_000_000, help="SynthVLM §3.2: 1M generated pairs")
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--k", type=int, default=100_000, help="SynthVLM §3.2: keep the top 100K")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it; reuses shards found there")
    parser.add_argument("--repeat", type=int, default=1, help="runs per step; the fastest is reported")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(run_step(args.step, Path(args.work), args)))
        return
    with tempfile.TemporaryDirectory(prefix="cpu_stages-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        result: dict[str, Any] = {"records": args.records, "shards": args.shards, "k": args.k}
        if not (work / "shards.json").exists():
            generated = in_child("generate", work, args)
            result["input_mib"], result["generate_seconds"] = generated["input_mib"], generated["seconds"]
        result["cpus"] = os.cpu_count()
        result["repeat"] = args.repeat
        for step in ("select", "baseline", "export", "read_scores"):
            if step == "export":
                in_child("images", work, args)  # the export packs image bytes into WebDataset shards
            runs = [in_child(step, work, args) for _ in range(args.repeat)]
            result[step] = min(runs, key=lambda run: run["seconds"])  # the least disturbed run
        result["select_vs_baseline"] = round(result["select"]["seconds"] / result["baseline"]["seconds"], 2)
        result["identical_output"] = in_child("compare", work, args)["identical"]
        result["import"] = {
            stage: in_child(f"import:{stage}", work, args)
            for stage in ("captions", "select", "export_llava", "report")
        }
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
