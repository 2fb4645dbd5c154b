"""Bad input gets a clean error, never a traceback: exit code 2, a message naming the file, the line (or
record) and the field, no `<output>.done` marker, and nothing already produced lost.

Each case was found by a user; the tests go through the CLI (`main`, or a subprocess for `run --local`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthvlm.cli import main
from synthvlm.errors import TaskFailedError
from synthvlm.kfp_support import one_line, strip_ansi, task_failure

REPO = Path(__file__).resolve().parents[1]


def fails_cleanly(argv: list[str], capsys, *words: str) -> str:
    """Run the CLI: exit 2, every word in the error, no traceback; returns stderr."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err
    return err


def done_markers(root: Path) -> list[Path]:
    return sorted(root.rglob("*.done")) if root.exists() else []


def test_directory_as_captions_file(tmp_path: Path, capsys):
    folder = tmp_path / "captions"
    folder.mkdir()
    out = tmp_path / "out"
    argv = ["captions", "--input", str(folder), "--output", str(out)]
    fails_cleanly(argv, capsys, f"{folder}: is a directory")
    assert done_markers(tmp_path) == []


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_parquet_captions(tmp_path: Path, capsys, damage: str):
    src = tmp_path / "caps.parquet"
    if damage == "garbage":
        src.write_bytes(b"PAR1 this is not parquet")
    else:
        pq.write_table(pa.Table.from_pylist([{"id": "c1", "caption": "a cat"}] * 50), src)
        src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    out = tmp_path / "out"
    fails_cleanly(
        ["captions", "--input", str(src), "--output", str(out)], capsys, f"{src}: not a readable Parquet file"
    )
    assert done_markers(tmp_path) == []


def test_gcs_without_credentials(tmp_path: Path, capsys, no_gcp_credentials):
    out = tmp_path / "out"
    fails_cleanly(
        ["captions", "--input", "gs://my-bucket/caps.jsonl", "--output", str(out)],
        capsys,
        "cannot access gs://my-bucket: no Google Cloud credentials found",
        "no Google Cloud credentials found",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "Workload Identity",
    )
    assert done_markers(tmp_path) == []


@pytest.mark.parametrize(
    "where, uri", [("--input", "gs:///x/captions.jsonl"), ("--output", "gs:///x/captions")]
)
def test_gcs_uri_without_bucket(tmp_path: Path, capsys, where: str, uri: str):
    args = {"--input": str(tmp_path / "caps.jsonl"), "--output": str(tmp_path / "out")}
    args[where] = uri
    fails_cleanly(
        ["captions", *(a for item in args.items() for a in item)],
        capsys,
        f"{uri}: not a gs:// URI with a bucket name",
    )


@pytest.mark.parametrize(
    "argv, written",
    [
        (["captions", "--input", "IN.jsonl", "--output", "O/captions.jsonl"], "captions.jsonl"),
        (["captions", "--input", "IN.jsonl", "--output", "O/captions.parquet"], "captions.jsonl"),
        (["curate", "--input", "IN.jsonl", "--output", "O/curated.jsonl"], "curated.jsonl"),
        (["score", "--input", "IN.jsonl", "--output", "O/scored.csv"], "scored.jsonl"),
        (["select", "--input", "IN.jsonl", "--output", "O/selected.json"], "selected.jsonl"),
        (["report", "--input", "IN.jsonl", "--output", "O/report.html"], "report.html"),
        (["evaluate", "--model", "m", "--benchmark", "IN.jsonl", "--output", "O/r.json"], "results.json"),
        (["stablellava-keywords", "--output", "O/keywords.json"], "keywords.json"),
        (["stablellava-prompts", "--keywords", "IN.json", "--output", "O/p.jsonl"], "prompts.jsonl"),
        (["stablellava-dialogues", "--prompts", "IN.jsonl", "--output", "O/d.jsonl"], "dialogues.jsonl"),
        (["compare-evals", "IN.json", "--output", "O/table.html"], "comparison.html"),
        (["regenerate", "--manifest", "IN.jsonl", "--id", "c1", "--output", "O/again.JPG"], "its files"),
        (["regenerate", "--manifest", "IN.jsonl", "--id", "c1", "--output", "O/again.webp"], "its files"),
    ],
)  # fmt: skip
def test_file_valued_output_fails_before_reading_input(tmp_path: Path, capsys, argv, written):
    # IN.* does not exist: an error about the input would mean the input was read first.
    argv = [str(tmp_path / a) if a.startswith(("IN.", "O/")) else a for a in argv]
    command, output = argv[0], argv[argv.index("--output") + 1]
    err = fails_cleanly(
        argv,
        capsys,
        f"--output {output}: --output is a folder for every command;",
        f"`synthvlm {command}` writes {written} inside it",
        f"(for example --output {tmp_path / 'O'})",  # the new form
    )
    assert "not found" not in err and "No such file" not in err
    assert not (tmp_path / "O").exists()


def test_removed_rejects_flag_names_the_new_form(tmp_path: Path, capsys):
    argv = ["curate", "--input", str(tmp_path / "IN.jsonl"), "--output", str(tmp_path / "O")]
    err = fails_cleanly(
        [*argv, "--rejects", str(tmp_path / "O" / "r.jsonl")],
        capsys,
        "--rejects",
        "no longer taken",
        "writes rejects.jsonl beside curated.jsonl in the --output folder",
    )
    assert "not found" not in err and not (tmp_path / "O").exists()


def test_existing_file_as_output_folder(tmp_path: Path, capsys):
    existing = tmp_path / "captions"  # a file without a suffix
    existing.write_text("keep me")
    argv = ["captions", "--input", str(tmp_path / "IN.jsonl"), "--output", str(existing)]
    fails_cleanly(argv, capsys, f"--output {existing}: is a file; --output must be a folder")
    assert existing.read_text() == "keep me"


def test_id_too_long_in_bytes_fails_at_captions(tmp_path: Path, capsys):
    src = tmp_path / "caps.csv"
    src.write_text("id,caption\nok,a cat\n" + "文" * 100 + ",a dog\n", encoding="utf-8")
    out = tmp_path / "out"
    fails_cleanly(
        ["captions", "--input", str(src), "--output", str(out)],
        capsys,
        f"{src}, line 3, field 'id'",
        "id is longer than 192 bytes in UTF-8 (300 bytes, 100 characters)",
    )
    assert done_markers(tmp_path) == []


@pytest.mark.parametrize(
    "content, words",
    [
        ("id,caption,caption\nc1,a cat,a dog\n", "line 1, field 'caption': duplicate column"),
        ('id,caption\nc1,a cat\nc2,"a dog\nc3,a cow\nc4,a pig\n', "line 3: unterminated quoted field"),
    ],
)
def test_bad_csv_structure(tmp_path: Path, capsys, content: str, words: str):
    src = tmp_path / "caps.csv"
    src.write_text(content)
    out = tmp_path / "out"
    fails_cleanly(["captions", "--input", str(src), "--output", str(out)], capsys, f"{src}, {words}")
    assert done_markers(tmp_path) == []


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".nan"])
def test_non_finite_config_numbers(tmp_path: Path, capsys, value: str):
    out = str(tmp_path / "out")
    argv = ["select", "--set", "select.mode=threshold", "--set", f"select.threshold={value}"]
    argv += ["--input", "x.jsonl"]
    fails_cleanly([*argv, "--output", out], capsys, "config field 'threshold'", "finite number")
    # The run config too, with the dotted field name, before anything runs.
    run = ["run", "synthvlm", "--local", "--output", str(tmp_path / "run")]
    run += ["--set", f"select.threshold={value}"]
    fails_cleanly(run, capsys, "config field 'select.threshold'", "finite number")
    assert done_markers(tmp_path) == []


def test_jsonl_captions_with_a_bom_are_accepted(tmp_path: Path, capsys):
    src = tmp_path / "caps.jsonl"
    src.write_bytes(b'\xef\xbb\xbf{"id": "c1", "caption": "a cat"}\n{"id": "c2", "caption": "a dog"}\n')
    out = tmp_path / "out"
    assert main(["captions", "--input", str(src), "--output", str(out)]) == 0
    written = (out / "captions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in written] == ["c1", "c2"]


def test_bad_input_after_a_good_run_loses_nothing(tmp_path: Path, capsys):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.csv"
    good.write_text('{"id": "c1", "caption": "a cat"}\n')
    bad.write_text("id,caption,caption\nc1,a,b\n")
    out = tmp_path / "out"
    assert main(["captions", "--input", str(good), "--output", str(out)]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    fails_cleanly(["captions", "--input", str(bad), "--output", str(out)], capsys, "duplicate column")
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # no new marker, nothing overwritten or removed


# ---------------------------------------------------------------- `synthvlm run --local`: the last line


def test_task_failure_repeats_the_tasks_own_message(tmp_path: Path):
    log = tmp_path / "errors.jsonl"
    kfp = RuntimeError(
        "Pipeline \x1b[95m'synthvlm'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m. "
        "Inner task failed: \x1b[96m'load-captions'\x1b[0m."
    )
    records = [
        {"function": "validate_synthvlm_config", "message": "unrelated", "bad_input": False},
        {"function": "load_captions", "message": "2 problem(s):\n  f, line 2: x\n  f, line 3: y"},
    ]
    records[1]["bad_input"] = True
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"torn')  # + a torn last line
    err = task_failure(kfp, str(log))
    assert isinstance(err, TaskFailedError) and err.exit_code == 2
    assert str(err) == "task 'load-captions' failed: 2 problem(s): f, line 2: x; f, line 3: y"
    # Not found (no record): the task name and kfp's message, without colour codes, exit 1.
    err = task_failure(kfp, str(tmp_path / "missing.jsonl"))
    assert err.exit_code == 1 and str(err).startswith("task 'load-captions' failed: Pipeline 'synthvlm'")
    assert "\x1b" not in str(err)
    assert strip_ansi("\x1b[96m'x'\x1b[0m") == "'x'" and one_line("a:\n  b\n  c") == "a: b; c"


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHVLM_")}
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.mark.slow  # a kfp.local run (~30 s: the failing task is the first real one)
def test_local_run_ends_with_the_failed_tasks_error(tmp_path: Path):
    bad = tmp_path / "caps.csv"
    bad.write_text("id,caption\nok,a cat\n../x,a dog\n")
    root = tmp_path / "run"
    cmd = [sys.executable, "-m", "synthvlm.cli", "run", "synthvlm", "--local", "--preset", "demo"]
    cmd += ["--output", str(root), "--set", f"captions={bad}"]
    # stderr into stdout: the last line is judged as a terminal shows both.
    merged = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    proc = subprocess.run(cmd, **merged, env=_clean_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:]
    last = proc.stdout.rstrip("\n").splitlines()[-1]
    assert last == (
        f"error: task 'load-captions' failed: 1 problem(s) in the captions input: "
        f"{bad}, line 3, field 'id': id '../x' contains a path separator"
    )
    assert "\x1b" not in last
    # The task's log ends with its error, not a traceback; nothing is marked complete.
    assert "synthvlm error: 1 problem(s) in the captions input:" in proc.stdout
    assert "Traceback" not in proc.stdout
    assert done_markers(root) == []
