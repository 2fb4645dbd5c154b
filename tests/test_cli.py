"""The `synthvlm` CLI: every subcommand has --help, the stages chain by hand, and errors exit non-zero."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synthvlm.cli import build_parser, main
from synthvlm.records import read_manifest

COMMANDS = [
    "captions", "curate", "generate", "score", "select", "export", "report",
    "stablellava-keywords", "stablellava-prompts", "stablellava-dialogues", "stablellava-export",
    "train", "evaluate", "compare-evals", "compile", "run", "upload", "submit",
]  # fmt: skip


def test_every_subcommand_has_help(capsys):
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        assert f"usage: synthvlm {command}" in capsys.readouterr().out
    assert set(build_parser()._subparsers._group_actions[0].choices) >= set(COMMANDS)


def test_stages_chain_by_hand(tmp_path: Path, capsys):
    root = str(tmp_path / "root")
    caps, scored, selected = f"{root}/captions", f"{root}/score", f"{root}/select"
    small = ["--preset", "demo", "--set", "generate.steps=2", "--set", "generate.height=64"]
    small += ["--set", "width=64"]  # the older bare stage key still works
    assert main(["captions", "--preset", "demo", "--set", "max_captions=4", "--output", caps]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("captions.jsonl")
    assert len(read_manifest(f"{caps}/captions.jsonl")) == 4
    generate = ["generate", "--input", f"{caps}/captions.jsonl", "--output", root, "--shard", "0/1"]
    assert main([*generate, *small]) == 0
    shard = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["score", "--preset", "demo", "--input", shard, "--output", scored]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.endswith("scored.jsonl") and Path(printed).is_file()
    select = ["select", "--preset", "demo", "--set", "select.k=2", "--input", f"{scored}/scored.jsonl"]
    assert main([*select, "--output", selected]) == 0
    selected = f"{selected}/selected.jsonl"
    assert main(["export", "--input", selected, "--data-root", root, "--output", f"{root}/export"]) == 0
    assert main(["report", "--input", selected, "--stage-outputs", f"{caps}/captions.jsonl", shard,
                 f"{scored}/scored.jsonl", selected, "--output", root]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("report.html")
    dataset = json.loads(Path(root, "export", "llava_pretrain.json").read_text())
    assert [s["id"] for s in dataset] == [r.id for r in read_manifest(selected)]
    assert len(dataset) == 2 and all(Path(root, s["image"]).is_file() for s in dataset)
    report = Path(root, "report.html").read_text()
    kept_grid = report.split("<h2>Kept images</h2>")[1].split("<h2>")[0]
    assert kept_grid.count("<img") == 2


@pytest.mark.parametrize("key", ["mode", "select.mode"])  # the older bare stage key, the run's dotted key
def test_bad_value_exits_2_naming_the_field(tmp_path: Path, capsys, key: str):
    code = main(["select", "--set", f"{key}=best", "--input", "x.jsonl", "--output", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "config field 'mode'" in err and "'threshold'" in err


def test_bad_captions_exit_2_and_write_nothing(tmp_path: Path, capsys):
    src = tmp_path / "caps.csv"
    src.write_bytes(b"id,caption\nok,a cat\n../x,a dog\n")
    out = tmp_path / "out"
    assert main(["captions", "--input", str(src), "--output", str(out)]) == 2
    assert f"{src}, line 3, field 'id'" in capsys.readouterr().err
    assert not out.exists()


def test_bad_shard_argument(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--input", "m.jsonl", "--output", "o", "--shard", "3/2"])
    assert "need 0 <= I < N" in capsys.readouterr().err


def test_run_without_local_points_to_the_cluster_workflow(tmp_path: Path, capsys):
    assert main(["run", "synthvlm", "--output", str(tmp_path)]) == 2
    assert "Kubeflow" in capsys.readouterr().err


def test_upload_then_submit_through_the_cli(capsys):
    from synthvlm.testing.fake_kfp_server import FakeKFPServer

    with FakeKFPServer() as server:
        assert main(["upload", "--host", server.host]) == 0
        assert "uploaded new pipeline 'synthvlm'" in capsys.readouterr().out
        sets = ["--set", "data_root=gs://b/run1", "--set", "select.k=50"]
        assert main(["submit", "synthvlm", "--host", server.host, *sets]) == 0
        [run] = server.requests_to("POST", "/apis/v2beta1/runs")
        params = run.json()["runtime_config"]["parameters"]
        assert params["data_root"] == "gs://b/run1"
        assert params["select_k"] == 50  # a typed run-form parameter, not inside select_config
        assert "k" not in json.loads(params["select_config"])
        assert run.json()["service_account"] == "synthvlm-runner"  # the account with the bucket rights
        # a bad value is refused before anything is sent to the cluster
        assert main(["submit", "synthvlm", "--host", server.host, "--set", "select.k=0"]) == 2
        assert len(server.requests_to("POST", "/apis/v2beta1/runs")) == 1
        # another account (e.g. a multi-user profile's default-editor), and a StableLLaVA run
        assert (
            main(
                [
                    "submit",
                    "stablellava",
                    "--host",
                    server.host,
                    "--set",
                    "data_root=gs://b/sl",
                    "--service-account",
                    "default-editor",
                ]
            )
            == 2
        )  # not uploaded yet: a clear error
        assert "upload it first" in capsys.readouterr().err
        assert main(["upload", "--host", server.host, "--pipeline", "stablellava"]) == 0
        assert (
            main(
                [
                    "submit",
                    "stablellava",
                    "--host",
                    server.host,
                    "--set",
                    "data_root=gs://b/sl",
                    "--service-account",
                    "default-editor",
                    "--set",
                    "prompts_per_ability=5",
                ]
            )
            == 2
        )
        assert "'prompts_per_ability': unknown field" in capsys.readouterr().err  # run keys are dotted
        assert (
            main(
                [
                    "submit",
                    "stablellava",
                    "--host",
                    server.host,
                    "--set",
                    "data_root=gs://b/sl",
                    "--service-account",
                    "default-editor",
                    "--set",
                    "prompts.prompts_per_ability=5",
                ]
            )
            == 0
        )
        sl_run = server.requests_to("POST", "/apis/v2beta1/runs")[-1].json()
        assert sl_run["service_account"] == "default-editor"
        assert sl_run["runtime_config"]["parameters"]["prompts_per_ability"] == 5


def test_train_and_evaluate_by_hand(tmp_path: Path, capsys):
    """Tiny LLaVA: pretrain on a LLaVA JSON through the CLI, evaluate it, compare two result files."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    samples = []
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        Image.new("RGB", (32, 32), colour).save(images / f"{i}.png")
        conv = [
            {"from": "human", "value": "<image>\nDescribe."},
            {"from": "gpt", "value": f"A {colour} square."},
        ]
        samples.append({"id": str(i), "image": f"images/{i}.png", "conversations": conv})
    data = tmp_path / "data.json"
    data.write_text(json.dumps(samples))
    out = tmp_path / "pretrain"
    spec = f"json={data},images={tmp_path}"
    assert (
        main(["train", "--preset", "demo", "--stage", "pretrain", "--dataset", spec, "--output", str(out)])
        == 0
    )
    model = capsys.readouterr().out.strip().splitlines()[-1]
    assert Path(model, "config.json").is_file()
    bench = "bundled:eval_fixtures/colors.jsonl"
    results = [str(tmp_path / f"eval{i}" / "results.json") for i in (1, 2)]
    for name, result in zip(("a", "b"), results, strict=True):
        assert main(["evaluate", "--preset", "demo", "--model", model, "--benchmark", bench,
                     "--name", name, "--output", str(Path(result).parent)]) == 0  # fmt: skip
        printed = Path(capsys.readouterr().out.strip().splitlines()[-1])  # the file written
        assert printed.name == "results.json" and printed.read_bytes() == Path(result).read_bytes()
    assert main(["compare-evals", *results, "--output", str(tmp_path / "cmp")]) == 0
    printed = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed.name == "comparison.html" and printed.is_file()
    table = (tmp_path / "cmp" / "comparison.html").read_text()
    assert ">a<" in table and ">b<" in table


# ---------------------------------------------------------------- one config for `run` and the stage commands


def _config_show(capsys, *argv: str) -> str:
    assert main(["config", "show", *argv]) == 0
    return capsys.readouterr().out


def test_run_config_layout_is_known_to_the_cli():
    """The CLI knows the run config's sections and settings without importing run_config (torch)."""
    from pydantic import BaseModel

    from synthvlm.cli import RUN_SECTIONS, RUN_SETTINGS
    from synthvlm.run_config import RUN_CONFIGS

    sections, settings = set(), set()
    for cls in RUN_CONFIGS.values():
        for name, field in cls.model_fields.items():
            kind = field.annotation
            is_section = isinstance(kind, type) and issubclass(kind, BaseModel)
            (sections if is_section else settings).add(name)
    assert (sections, settings) == (set(RUN_SECTIONS), set(RUN_SETTINGS))


def test_one_run_yaml_drives_run_and_the_stage_commands(tmp_path: Path, capsys):
    from synthvlm.cli import _run_config
    from synthvlm.records import Record, write_manifest

    yaml_text = _config_show(
        capsys, "synthvlm", "--preset", "demo", "--set", "select.k=2", "--set", "max_captions=3"
    )
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml_text)
    # `run`'s config builder takes it as it is ...
    run_args = build_parser().parse_args(
        ["run", "synthvlm", "--local", "--config", str(run_yaml), "--output", str(tmp_path / "run")]
    )
    config = _run_config(run_args)
    assert (config.select.k, config.max_captions) == (2, 3)
    assert config.captions == "bundled:demo_captions.jsonl"
    # ... and so does each stage command, reading its own section (or, for captions, the run's captions
    # settings): 3 of the bundled demo captions, the 2 best of 4 scored records.
    assert main(["captions", "--config", str(run_yaml), "--output", str(tmp_path / "captions")]) == 0
    captions = read_manifest(str(tmp_path / "captions" / "captions.jsonl"))
    assert len(captions) == 3 and all(
        r.provenance["source"].endswith("demo_captions.jsonl") for r in captions
    )
    scored = str(tmp_path / "scored.jsonl")
    write_manifest(scored, [Record(id=f"r{i}", caption=f"c {i}", scores={"clip": i / 10}) for i in range(4)])
    assert (
        main(["select", "--config", str(run_yaml), "--input", scored, "--output", str(tmp_path / "sel")]) == 0
    )
    assert [r.id for r in read_manifest(str(tmp_path / "sel" / "selected.jsonl"))] == ["r3", "r2"]
    # --set on top of the file, with the run's dotted key
    argv = ["select", "--config", str(run_yaml), "--set", "select.k=1", "--input", scored]
    assert main([*argv, "--output", str(tmp_path / "sel1")]) == 0
    assert [r.id for r in read_manifest(str(tmp_path / "sel1" / "selected.jsonl"))] == ["r3"]


def test_config_show_round_trips(tmp_path: Path, capsys):
    shown = _config_show(capsys, "synthvlm", "--preset", "demo", "--set", "select.k=3")
    assert "\n  k: 3\n" in shown
    saved = tmp_path / "run.yaml"
    saved.write_text(shown)
    assert _config_show(capsys, "synthvlm", "--config", str(saved)) == shown


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"synthvlm {version('synthvlm')}\n"


def test_verbose_after_the_subcommand(capsys):
    assert main(["config", "show", "synthvlm", "-v"]) == 0
    assert "select:" in capsys.readouterr().out
    assert build_parser().parse_args(["-v", "config", "show", "synthvlm"]).verbose  # before it, too
    assert not build_parser().parse_args(["config", "show", "synthvlm"]).verbose


def test_every_help_ends_with_examples_that_parse():
    import shlex

    from synthvlm.cli import EXAMPLES, _check_arguments

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(EXAMPLES) == {"main", *commands}
    for name, sub in [("main", parser), *commands.items()]:
        help_text = sub.format_help().rstrip("\n")
        block = help_text.split("\n\n")[-1].splitlines()
        assert block[0] == "examples:", f"{name}: {help_text[-300:]}"
        assert [line.strip() for line in block[1:]] == EXAMPLES[name]
        for example in EXAMPLES[name]:  # each example is a valid command line (not run)
            words = shlex.split(example.split(" > ")[0])
            assert words[0] == "synthvlm", example
            args = parser.parse_args(words[1:])
            assert name in ("main", "config") or args.command == name, example
            _check_arguments(args)  # e.g. no file-valued --output


def test_set_takes_a_list_value(capsys):
    import yaml

    shown = _config_show(capsys, "stablellava", "--set", "keywords.abilities=[colour, animal]")
    assert yaml.safe_load(shown)["keywords"]["abilities"] == ["colour", "animal"]


def test_stage_command_refuses_another_sections_key(tmp_path: Path, capsys):
    argv = ["select", "--set", "generate.steps=2", "--input", "x.jsonl", "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'generate'" in err and "'select'" in err and "select.KEY=VALUE" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()
