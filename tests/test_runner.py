"""The stage runner: fingerprints, skip/redo, versioned outputs, publishing, markers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from pydantic import Field

from synthvlm import runner, storage
from synthvlm.config import StageConfig
from synthvlm.errors import ConfigError
from synthvlm.runner import Stage, StageRun, run_stage
from synthvlm.stage import StageStats, done_uri


class CountConfig(StageConfig):
    factor: int = 2
    batch_size: int = Field(4, ge=1)  # excluded: cannot change the output
    cutoff: float = 0.5


CALLS: list[str] = []


def _double(config: CountConfig, run: StageRun) -> StageStats:
    CALLS.append(run.fingerprint)
    numbers = [int(x) for x in Path(run.inputs["numbers"]).read_text().split()]
    out = [n * config.factor for n in numbers]
    Path(run.output).parent.mkdir(parents=True, exist_ok=True)
    Path(run.output).write_text(" ".join(map(str, out)))
    Path(run.dir, "side.txt").write_text(f"made with factor {config.factor}")
    return StageStats("double", count_in=len(numbers), count_out=len(out))


DOUBLE = Stage(
    name="double",
    process=_double,
    excluded={"batch_size": "only groups the work"},
    sidecars=("side.txt",),
)


def _plus_one(config: CountConfig, run: StageRun) -> StageStats:
    CALLS.append("plus_one")
    numbers = [int(x) for x in Path(run.inputs["doubled"]).read_text().split()]
    Path(run.output).parent.mkdir(parents=True, exist_ok=True)
    Path(run.output).write_text(" ".join(str(n + 1) for n in numbers))
    return StageStats("plus_one", count_in=len(numbers), count_out=len(numbers))


PLUS_ONE = Stage(name="plus_one", process=_plus_one)


@pytest.fixture(autouse=True)
def _reset_calls():
    CALLS.clear()


def _setup(tmp_path: Path, text: str = "1 2 3") -> tuple[str, str]:
    src = tmp_path / "numbers.txt"
    src.write_text(text)
    return str(src), str(tmp_path / "out" / "doubled.txt")


def test_same_fingerprint_skips_with_one_log_line(tmp_path, caplog):
    src, out = _setup(tmp_path)
    first = run_stage(DOUBLE, CountConfig(), {"numbers": src}, out)
    with caplog.at_level(logging.INFO, logger="synthvlm.runner"):
        second = run_stage(DOUBLE, CountConfig(batch_size=64), {"numbers": src}, out)  # excluded field
    assert first == second and len(CALLS) == 1
    skips = [r.getMessage() for r in caplog.records if "unchanged" in r.getMessage()]
    assert len(skips) == 1 and "double" in skips[0]


def test_changed_setting_recomputes_into_a_new_folder_and_keeps_the_old(tmp_path):
    src, out = _setup(tmp_path)
    first = run_stage(DOUBLE, CountConfig(factor=2), {"numbers": src}, out)
    second = run_stage(DOUBLE, CountConfig(factor=3), {"numbers": src}, out)
    assert first != second and len(CALLS) == 2
    assert Path(first).read_text() == "2 4 6"  # the first version is still readable
    assert Path(second).read_text() == "3 6 9"
    assert Path(out).read_text() == "3 6 9"  # the stable path holds the latest complete version
    assert Path(out).parent.joinpath("side.txt").read_text() == "made with factor 3"
    marker = json.loads(Path(done_uri(out)).read_text())
    assert marker["settings"] == {"factor": 3, "cutoff": 0.5}  # batch_size excluded
    assert marker["published_from"] == second
    assert marker["excluded_from_fingerprint"] == {"batch_size": "only groups the work"}
    # Going back to the first settings reuses the first version and republishes it.
    assert run_stage(DOUBLE, CountConfig(factor=2), {"numbers": src}, out) == first
    assert len(CALLS) == 2 and Path(out).read_text() == "2 4 6"


def test_changed_input_propagates_downstream(tmp_path):
    src, out = _setup(tmp_path)
    final = str(tmp_path / "out" / "final.txt")
    doubled = run_stage(DOUBLE, CountConfig(), {"numbers": src}, out)
    run_stage(PLUS_ONE, CountConfig(), {"doubled": doubled}, final)
    assert CALLS[-1] == "plus_one" and len(CALLS) == 2
    # Unchanged: both skip.
    run_stage(
        PLUS_ONE, CountConfig(), {"doubled": run_stage(DOUBLE, CountConfig(), {"numbers": src}, out)}, final
    )
    assert len(CALLS) == 2
    # New input bytes under the same name: both recompute.
    Path(src).write_text("5")
    doubled = run_stage(DOUBLE, CountConfig(), {"numbers": src}, out)
    run_stage(PLUS_ONE, CountConfig(), {"doubled": doubled}, final)
    assert len(CALLS) == 4 and Path(final).read_text() == "11"


def test_a_failed_run_publishes_nothing_and_leaves_the_old_version(tmp_path):
    src, out = _setup(tmp_path)
    run_stage(DOUBLE, CountConfig(factor=2), {"numbers": src}, out)
    Path(src).write_text("1 x")
    with pytest.raises(ValueError):
        run_stage(DOUBLE, CountConfig(factor=2), {"numbers": src}, out)
    marker = json.loads(Path(done_uri(out)).read_text())
    assert Path(out).read_text() == "2 4 6" and Path(marker["published_from"]).read_text() == "2 4 6"
    versions = sorted(p.name for p in Path(out).parent.iterdir() if p.is_dir())
    complete = [v for v in versions if Path(out).parent.joinpath(v, "doubled.txt.done").exists()]
    assert versions == complete and len(complete) == 1  # the failed run left no folder


def test_non_finite_settings_are_rejected_before_any_work(tmp_path):
    src, out = _setup(tmp_path)
    config = CountConfig.model_construct(factor=2, batch_size=4, cutoff=float("nan"))
    with pytest.raises(ConfigError, match="cutoff"):
        run_stage(DOUBLE, config, {"numbers": src}, out)
    assert CALLS == [] and not Path(out).parent.exists()


def test_interrupted_write_temp_files_are_cleaned(tmp_path):
    src, out = _setup(tmp_path)
    config = CountConfig(factor=5)
    fingerprint_dir = None
    run_stage(DOUBLE, config, {"numbers": src}, out)
    fingerprint_dir = Path(json.loads(Path(done_uri(out)).read_text())["published_from"]).parent
    # Simulate a kill mid-write in the same fingerprint's folder, then a rerun that must redo the work.
    Path(done_uri(str(fingerprint_dir / "doubled.txt"))).unlink()
    tmp = fingerprint_dir / ".doubled.txt.abc123.tmp"
    tmp.write_text("half")
    run_stage(DOUBLE, config, {"numbers": src}, out)
    assert not tmp.exists() and len(CALLS) == 2


def test_the_fingerprint_covers_format_version_and_params(tmp_path):
    src, out = _setup(tmp_path)
    base = run_stage(DOUBLE, CountConfig(), {"numbers": src}, out)
    v2 = Stage(name="double", process=_double, excluded=DOUBLE.excluded, sidecars=DOUBLE.sidecars, version=2)
    assert run_stage(v2, CountConfig(), {"numbers": src}, out) != base
    with_param = run_stage(DOUBLE, CountConfig(), {"numbers": src}, out, params={"data_root": "/x"})
    assert with_param != base and len(CALLS) == 3


def test_describe_shows_fingerprint_and_settings(tmp_path):
    src, out = _setup(tmp_path)
    versioned = run_stage(DOUBLE, CountConfig(factor=7), {"numbers": src}, out)
    info = runner.describe(versioned)
    assert info["stage"] == "double" and info["settings"]["factor"] == 7
    assert Path(versioned).parent.name == f"double-{info['fingerprint'][:16]}"
    assert info["inputs"]["numbers"]["fingerprint"].startswith("sha256:")


# --- glob sidecars -----------------------------------------------------------------------------------------


def _parts(config: CountConfig, run: StageRun) -> StageStats:
    """Writes one part file per number (how many: known only once it ran), then the main output."""
    CALLS.append(run.fingerprint)
    numbers = [int(x) for x in Path(run.inputs["numbers"]).read_text().split()]
    for i, n in enumerate(numbers):
        storage.write_text(run.path(f"parts/part-{i}.txt"), str(n * config.factor))
    storage.write_text(run.path("parts/notes.md"), "not a part")  # not matched: stays in the version
    storage.write_text(run.output, str(len(numbers)))
    return StageStats("parts", count_in=len(numbers), count_out=len(numbers))


PARTS = Stage(name="parts", process=_parts, sidecars=("parts/part-*.txt",))


def _stable_parts(out: str) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((Path(out).parent / "parts").iterdir())}


def test_glob_sidecars_are_linked_and_stale_matches_removed(tmp_path):
    src, out = _setup(tmp_path, "1 2 3")
    first = Path(run_stage(PARTS, CountConfig(factor=2), {"numbers": src}, out))
    assert _stable_parts(out) == {"part-0.txt": "2", "part-1.txt": "4", "part-2.txt": "6"}
    stable = Path(out).parent / "parts"
    assert all((stable / name).samefile(first.parent / "parts" / name) for name in _stable_parts(out))

    Path(src).write_text("5 6")  # fewer parts: part-2 of the first version must not pass for the new one's
    second = Path(run_stage(PARTS, CountConfig(factor=2), {"numbers": src}, out))
    assert _stable_parts(out) == {"part-0.txt": "10", "part-1.txt": "12"}
    assert (first.parent / "parts" / "part-2.txt").read_text() == "6"  # the old version is untouched
    assert (first.parent / "parts" / "part-0.txt").read_text() == "2"  # the link was replaced, not written
    assert json.loads(Path(done_uri(out)).read_text())["published_from"] == str(second)

    Path(src).write_text("1 2 3")  # back to the first input: the skip republishes the first version
    assert run_stage(PARTS, CountConfig(factor=2), {"numbers": src}, out) == str(first) and len(CALLS) == 2
    assert _stable_parts(out) == {"part-0.txt": "2", "part-1.txt": "4", "part-2.txt": "6"}


def test_glob_sidecars_are_published_between_the_markers(tmp_path, monkeypatch):
    """While the parts are linked and the stale ones deleted, the stable path has no marker."""
    src, out = _setup(tmp_path, "1 2 3")
    run_stage(PARTS, CountConfig(factor=2), {"numbers": src}, out)
    seen: list[bool] = []
    link, delete = storage.link_or_copy, storage.delete

    def spy_link(source: str, target: str) -> None:
        seen.append(Path(done_uri(out)).exists())
        link(source, target)

    def spy_delete(uri: str) -> None:
        if "/parts/" in uri:
            seen.append(Path(done_uri(out)).exists())
        delete(uri)

    monkeypatch.setattr(storage, "link_or_copy", spy_link)
    monkeypatch.setattr(storage, "delete", spy_delete)
    Path(src).write_text("7 8")
    run_stage(PARTS, CountConfig(factor=2), {"numbers": src}, out)
    assert seen == [False, False, False]  # two links, one stale part deleted: none with a marker
    assert Path(done_uri(out)).exists() and _stable_parts(out) == {"part-0.txt": "14", "part-1.txt": "16"}


def test_glob_sidecar_temp_files_of_a_killed_publish_are_removed(tmp_path):
    src, out = _setup(tmp_path, "1 2")
    first = Path(run_stage(PARTS, CountConfig(factor=2), {"numbers": src}, out))
    left = [
        Path(out).parent / "parts" / ".part-0.txt.abc123.tmp",
        first.parent / "parts" / ".part-1.txt.x1.tmp",
    ]
    for path in left:
        path.write_text("half")
    Path(done_uri(str(first))).unlink()  # the version must be redone, and published again
    run_stage(PARTS, CountConfig(factor=2), {"numbers": src}, out)
    assert not any(path.exists() for path in left)
    assert _stable_parts(out) == {"part-0.txt": "2", "part-1.txt": "4"}


def test_glob_sidecars_are_matched_in_one_folder_without_placeholders():
    for pattern in ("*/part.txt", "parts/{name}-*.txt"):
        with pytest.raises(ValueError, match="glob"):
            Stage(name="bad", process=_parts, sidecars=(pattern,))
    plan = runner.plan_stage(PARTS, CountConfig(), {}, "/d/out/n.txt")
    assert plan.sidecars == [] and plan.globs == ["parts/part-*.txt"]
