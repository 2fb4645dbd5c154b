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
    caps, scored, selected = f"{root}/captions.jsonl", f"{root}/scored.jsonl", f"{root}/selected.jsonl"
    small = ["--preset", "demo", "--set", "steps=2", "--set", "height=64", "--set", "width=64"]
    assert main(["captions", "--preset", "demo", "--set", "max_records=4", "--output", caps]) == 0
    assert main(["generate", "--input", caps, "--output", root, "--shard", "0/1", *small]) == 0
    shard = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["score", "--preset", "demo", "--input", shard, "--output", scored]) == 0
    assert main(["select", "--preset", "demo", "--set", "k=2", "--input", scored, "--output", selected]) == 0
    assert main(["export", "--input", selected, "--data-root", root, "--output", f"{root}/export"]) == 0
    assert main(["report", "--input", selected, "--stage-outputs", caps, shard, scored, selected,
                 "--output", f"{root}/report.html"]) == 0  # fmt: skip
    dataset = json.loads(Path(root, "export", "llava_pretrain.json").read_text())
    assert [s["id"] for s in dataset] == [r.id for r in read_manifest(selected)]
    assert len(dataset) == 2 and all(Path(root, s["image"]).is_file() for s in dataset)
    assert Path(root, "report.html").read_text().count("<img") == 2


def test_bad_value_exits_2_naming_the_field(tmp_path: Path, capsys):
    code = main(["select", "--set", "mode=best", "--input", "x.jsonl", "--output", str(tmp_path / "o.jsonl")])
    assert code == 2
    err = capsys.readouterr().err
    assert "config field 'mode'" in err and "'threshold'" in err


def test_bad_captions_exit_2_and_write_nothing(tmp_path: Path, capsys):
    src = tmp_path / "caps.csv"
    src.write_bytes(b"id,caption\nok,a cat\n../x,a dog\n")
    out = tmp_path / "out" / "captions.jsonl"
    assert main(["captions", "--input", str(src), "--output", str(out)]) == 2
    assert f"{src}, line 3, field 'id'" in capsys.readouterr().err
    assert not out.parent.exists()


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
        assert json.loads(params["select_config"])["k"] == 50
        # a bad value is refused before anything is sent to the cluster
        assert main(["submit", "synthvlm", "--host", server.host, "--set", "select.k=0"]) == 2
        assert len(server.requests_to("POST", "/apis/v2beta1/runs")) == 1


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
    results = [str(tmp_path / f"eval{i}.json") for i in (1, 2)]
    for name, result in zip(("a", "b"), results, strict=True):
        assert main(["evaluate", "--preset", "demo", "--model", model, "--benchmark", bench,
                     "--name", name, "--output", result]) == 0  # fmt: skip
    assert main(["compare-evals", *results, "--output", str(tmp_path / "cmp.html")]) == 0
    table = (tmp_path / "cmp.html").read_text()
    assert ">a<" in table and ">b<" in table
