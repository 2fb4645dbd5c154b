"""`synthvlm` command line: one subcommand per stage, plus `compile` and `run`.

Every stage subcommand takes `--config FILE` (YAML of the stage's config) and `--set key=value`
(repeatable); `--preset demo|paper` starts from that preset's section for the stage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from synthvlm.errors import SynthVLMError

log = logging.getLogger("synthvlm")
PIPELINES = ["synthvlm", "stablellava", "train", "end-to-end"]


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", choices=["demo", "paper"], help="start from a preset (default: paper defaults)"
    )
    parser.add_argument("--config", metavar="FILE", help="YAML file with config fields")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a config field (repeatable)",
    )


def _stage_config(
    args: argparse.Namespace,
    cls: type,
    section: str,
    extra: dict[str, Any] | None = None,
    pipeline: str = "synthvlm",
):
    from synthvlm.config import build_config

    run_preset: dict[str, Any] = {}
    if args.preset:  # run_config imports every stage's config, torch's among them: only when needed
        from synthvlm.run_config import preset

        run_preset = preset(args.preset, pipeline)
    if section == "captions":  # the run config keeps the captions URI at top level
        base = {"captions": run_preset["captions"]} if "captions" in run_preset else {}
    else:
        base = dict(run_preset.get(section, {}))
    base.update(extra or {})
    return build_config(cls, preset=base, config_file=args.config, sets=args.sets)


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        rank, world = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard expects I/N (e.g. 0/8), got {text!r}") from None
    if world < 1 or not 0 <= rank < world:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= I < N")
    return rank, world


# What each stage command's --output must end with (its writer picks the format by the name): checked
# before any input is read, so a wrong name fails at once instead of after the work.
_MANIFEST = ("caption manifest", (".jsonl", ".parquet"))
OUTPUT_SUFFIXES: dict[str, tuple[str, tuple[str, ...]]] = {
    "captions": _MANIFEST,
    "curate": _MANIFEST,
    "score": _MANIFEST,
    "select": _MANIFEST,
    "report": ("HTML report", (".html",)),
    "stablellava-keywords": ("keywords JSON", (".json",)),
    "stablellava-prompts": ("prompt manifest", (".jsonl", ".parquet")),
    "stablellava-dialogues": ("dialogues JSONL", (".jsonl",)),
    "evaluate": ("results JSON", (".json",)),
    "compare-evals": ("HTML table", (".html",)),
}


def _check_arguments(args: argparse.Namespace) -> None:
    """Fail before any work on an output name with the wrong extension or a gs:// URI without a bucket."""
    from synthvlm import storage

    what, suffixes = OUTPUT_SUFFIXES.get(args.command, ("", ()))
    checks = [("--output", getattr(args, "output", None), what, suffixes)]
    if args.command == "curate":
        checks.append(("--rejects", args.rejects, "rejects file", (".jsonl",)))  # always written as JSONL
    for flag, value, kind, allowed in checks:
        if value and allowed and not value.endswith(allowed):
            raise SynthVLMError(
                f"{flag} {value}: `synthvlm {args.command}` writes a {kind}; its name must end with "
                + " or ".join(allowed)
            )
    for value in vars(args).values():  # every URI argument (strings and lists of strings)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and storage.is_gcs(item):
                storage.split_gcs(item)  # raises an InputError naming the URI the user typed


# ---------------------------------------------------------------- stage commands


def cmd_captions(args: argparse.Namespace) -> None:
    from synthvlm.stages.captions import CaptionsConfig, load_captions

    extra = {"captions": args.input} if args.input else {}
    config = _stage_config(args, CaptionsConfig, "captions", extra)
    print(load_captions(config, args.output))


def cmd_curate(args: argparse.Namespace) -> None:
    from synthvlm.stages.curate import CurateConfig, curate

    config = _stage_config(args, CurateConfig, "curate")
    rejects = args.rejects or args.output.rsplit(".", 1)[0] + ".rejects.jsonl"
    print(curate(config, args.input, args.output, rejects))


def cmd_generate(args: argparse.Namespace) -> None:
    from synthvlm.stages.generate import GenerateConfig, generate

    rank, world = args.shard
    print(generate(_stage_config(args, GenerateConfig, "generate"), args.input, args.output, rank, world))


def cmd_score(args: argparse.Namespace) -> None:
    from synthvlm.stages.clip_score import ScoreConfig, score

    print(score(_stage_config(args, ScoreConfig, "score"), args.input, args.output))


def cmd_select(args: argparse.Namespace) -> None:
    from synthvlm.stages.select import SelectConfig, select

    print(select(_stage_config(args, SelectConfig, "select"), args.input, args.output))


def cmd_export(args: argparse.Namespace) -> None:
    from synthvlm.stages.export_llava import ExportConfig, export_llava

    print(export_llava(_stage_config(args, ExportConfig, "export"), args.input, args.data_root, args.output))


def cmd_regenerate(args: argparse.Namespace) -> None:
    from synthvlm.regenerate import regenerate

    result = regenerate(args.manifest, args.id, args.output, check=args.check)
    status = {True: "byte-identical", False: "DIFFERENT", None: "not compared (original unreadable)"}
    print(f"{result.output}: {status[result.identical]}")


def cmd_report(args: argparse.Namespace) -> None:
    from synthvlm.stages.report import ReportConfig, write_report

    config = _stage_config(args, ReportConfig, "report")
    print(
        write_report(
            config, args.input, args.stage_outputs, args.output, all_scores_manifests=args.all_scores
        )
    )


def cmd_sl_keywords(args: argparse.Namespace) -> None:
    from synthvlm.stages.stablellava import KeywordsConfig, generate_keywords

    print(
        generate_keywords(
            _stage_config(args, KeywordsConfig, "keywords", pipeline="stablellava"), args.output
        )
    )


def cmd_sl_prompts(args: argparse.Namespace) -> None:
    from synthvlm.stages.stablellava import PromptsConfig, generate_prompts

    config = _stage_config(args, PromptsConfig, "prompts", pipeline="stablellava")
    print(generate_prompts(config, args.keywords, args.output))


def cmd_sl_dialogues(args: argparse.Namespace) -> None:
    from synthvlm.stages.stablellava import DialoguesConfig, generate_dialogues

    config = _stage_config(args, DialoguesConfig, "dialogues", pipeline="stablellava")
    print(generate_dialogues(config, args.prompts, args.output))


def cmd_sl_export(args: argparse.Namespace) -> None:
    from synthvlm.stages.stablellava import StableLLaVAExportConfig, export_stablellava

    config = _stage_config(args, StableLLaVAExportConfig, "export", pipeline="stablellava")
    print(export_stablellava(config, args.selected, args.dialogues, args.data_root, args.output))


def cmd_train(args: argparse.Namespace) -> None:
    from synthvlm.stages.train import TrainConfig, TrainDataset, train

    config = _stage_config(args, TrainConfig, args.stage, {"stage": args.stage}, pipeline="train")
    datasets = [TrainDataset.from_spec(spec) for spec in args.dataset]
    print(train(config, datasets, args.output))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from synthvlm.stages.evaluate import EvalConfig, evaluate

    config = _stage_config(args, EvalConfig, "eval", pipeline="train")
    print(evaluate(config, args.model, args.benchmark, args.output, model_name=args.name))


def cmd_compare_evals(args: argparse.Namespace) -> None:
    from synthvlm.evaluation.report import write_comparison

    print(write_comparison(args.results, args.output))


# ---------------------------------------------------------------- pipelines


def cmd_compile(args: argparse.Namespace) -> None:
    if args.max_parallel_gpus is not None:  # read when pipelines/common.py is imported, below
        os.environ["SYNTHVLM_MAX_PARALLEL_GPU_PODS"] = str(args.max_parallel_gpus)
    if args.image_registry or args.image_tag:
        from synthvlm.images import set_image_overrides

        set_image_overrides(args.image_registry, args.image_tag)
    from synthvlm.kfp_support import compile_all

    for path in compile_all(args.output_dir, args.pipelines or None):
        print(path)


# What a finished local run leaves, per pipeline (paths under the data root).
RUN_RESULTS = {
    "synthvlm": [
        ("LLaVA pretraining JSON", "export/llava_pretrain.json"),
        ("dataset manifest", "export/manifest.jsonl"),
        ("report", "report.html"),
    ],
    "stablellava": [
        ("LLaVA SFT JSON", "stablellava/export/stablellava_sft.json"),
        ("LLaVA pretraining JSON", "stablellava/export/stablellava_pretrain.json"),
        ("eval set", "stablellava/export/stablellava_eval.jsonl"),
        ("dataset manifest", "stablellava/export/manifest.jsonl"),
    ],
    "train": [
        ("SFT model", "train/sft/model"),
        ("eval results", "eval/sft.json"),
        ("eval table", "eval/sft.html"),
    ],
}
RUN_RESULTS["end-to-end"] = RUN_RESULTS["synthvlm"] + RUN_RESULTS["train"]


def _run_config(args: argparse.Namespace, data_root: str | None = None):
    from synthvlm.config import build_config
    from synthvlm.run_config import preset, run_config_class

    base = preset(args.preset, args.pipeline)
    if data_root is not None:
        base["data_root"] = data_root
    return build_config(run_config_class(args.pipeline), preset=base, config_file=args.config, sets=args.sets)


def cmd_run(args: argparse.Namespace) -> None:
    from synthvlm import storage
    from synthvlm.kfp_support import run_local
    from synthvlm.run_config import to_pipeline_arguments

    if not args.local:
        raise SynthVLMError(
            "only --local runs are started by `synthvlm run`; on a cluster, upload the pipeline and start it "
            "from the Kubeflow UI or with `synthvlm submit` (README: cluster workflow)"
        )
    output = os.path.abspath(args.output)
    config = _run_config(args, data_root=output)
    Path(output).mkdir(parents=True, exist_ok=True)
    if args.preset == "demo":
        print(
            "NOTE: the demo preset uses tiny RANDOM-WEIGHT SDXL and CLIP models built from configs and an\n"
            "      offline template LLM backend (nothing is downloaded or called): it runs every stage\n"
            "      end to end, but its images are noise, its scores meaningless and its text templated.\n"
            "      Use --preset paper for SDXL base 1.0, CLIP ViT-L-14 and a real LLM.",
            flush=True,
        )
    run_local(
        args.pipeline,
        to_pipeline_arguments(config),
        pipeline_root=os.path.join(output, "kfp-local"),
        verbose=args.verbose,
    )
    print("\nDone.")
    for label, path in RUN_RESULTS[args.pipeline]:
        print(f"  {label + ':':26} {storage.join(config.data_root, path)}")
    print(f"  {'images (--image_folder):':26} {config.data_root}")


# ---------------------------------------------------------------- cluster (Kubeflow Pipelines API)

_HOST_HELP = (
    "KFP API URL, e.g. http://localhost:8080 after `kubectl port-forward -n kubeflow svc/ml-pipeline-ui "
    "8080:80`; credentials from $KFP_EXISTING_TOKEN, $KF_PIPELINES_SA_TOKEN_PATH or $KFP_COOKIES"
)


def cmd_upload(args: argparse.Namespace) -> None:
    import tempfile

    from synthvlm.kfp_client import upload_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        package = args.package
        if package is None:  # compile now, so what is uploaded matches this code and image settings
            if args.image_registry or args.image_tag:
                from synthvlm.images import set_image_overrides

                set_image_overrides(args.image_registry, args.image_tag)
            from synthvlm.kfp_support import compile_all

            package = compile_all(tmp, [args.pipeline])[0]
        result = upload_pipeline(args.host, package, args.pipeline, args.namespace, args.version)
    if result["new_pipeline"]:
        print(f"uploaded new pipeline {result['pipeline_name']!r} (first version {result['version_name']!r})")
    else:
        print(f"uploaded version {result['version_name']!r} of pipeline {result['pipeline_name']!r}")
    print(f"  pipeline id: {result['pipeline_id']}  version id: {result['version_id']}")
    print(f"  {result['url']}")


def cmd_submit(args: argparse.Namespace) -> None:
    from synthvlm.config import build_config
    from synthvlm.kfp_client import submit_run
    from synthvlm.run_config import SynthVLMRunConfig, preset, to_pipeline_arguments

    config = build_config(
        SynthVLMRunConfig, preset=preset(args.preset), config_file=args.config, sets=args.sets
    )
    config.require_data_root()  # pods share nothing else: a gs:// prefix (or a mounted volume path)
    result = submit_run(
        args.host,
        args.pipeline,
        to_pipeline_arguments(config),
        experiment=args.experiment,
        namespace=args.namespace,
        run_name=args.run_name,
        version=args.version,
    )
    print(f"started run {result['run_name']!r} of {args.pipeline} version {result['version_name']!r}")
    print(f"  run id: {result['run_id']}")
    print(f"  {result['url']}")


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synthvlm", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], None], help_: str, config: bool = True):
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        if config:
            _config_args(p)
        return p

    p = add(
        "captions", cmd_captions, "validate a captions file (.jsonl/.csv/.parquet) into a caption manifest"
    )
    p.add_argument("--input", help="captions file or URI (default: the config's `captions`)")
    p.add_argument("--output", required=True, help="caption manifest to write (.jsonl or .parquet)")

    p = add(
        "curate", cmd_curate, "curate captions (SynthVLM §3.1): heuristics, dedup, LLM judge, raw-image CLIP"
    )
    p.add_argument(
        "--input", required=True, help="caption manifest (records with image_uri get the raw-image filter)"
    )
    p.add_argument("--output", required=True, help="curated caption manifest to write")
    p.add_argument("--rejects", help="rejects JSONL (default: <output>.rejects.jsonl)")

    p = add("generate", cmd_generate, "generate images for one shard of a manifest with SDXL")
    p.add_argument("--input", required=True, help="caption manifest")
    p.add_argument(
        "--output", required=True, help="data root (folder or gs:// prefix) for images and shard manifests"
    )
    p.add_argument(
        "--shard", type=_parse_shard, default=(0, 1), metavar="I/N", help="this shard of N (default 0/1)"
    )

    p = add(
        "regenerate",
        cmd_regenerate,
        "rebuild one image exactly from its manifest record (its generation provenance)",
        config=False,
    )
    p.add_argument(
        "--manifest", required=True, help="manifest holding the record (shard, scored, selected, export)"
    )
    p.add_argument("--id", required=True, help="record id")
    p.add_argument("--output", required=True, help="image file to write; extension as recorded (e.g. .jpg)")
    p.add_argument("--check", action="store_true", help="exit non-zero unless byte-identical to the original")

    p = add("score", cmd_score, "CLIP-score image/caption pairs of a manifest")
    p.add_argument("--input", required=True, help="manifest with image_uri")
    p.add_argument("--output", required=True, help="scored manifest to write")

    p = add(
        "select", cmd_select, "select pairs by top-k, top fraction or threshold over one or more manifests"
    )
    p.add_argument("--input", required=True, nargs="+", help="scored manifest(s), e.g. one per shard")
    p.add_argument("--output", required=True, help="selected manifest to write")

    p = add("export", cmd_export, "export selected pairs as LLaVA pretraining JSON + dataset manifest")
    p.add_argument("--input", required=True, help="selected manifest")
    p.add_argument("--data-root", required=True, help="image root; LLaVA `image` paths are relative to it")
    p.add_argument("--output", required=True, help="output folder or gs:// prefix")

    p = add("report", cmd_report, "write the HTML report (sample grid, score histogram, counts per stage)")
    p.add_argument("--input", required=True, help="selected manifest")
    p.add_argument(
        "--stage-outputs", nargs="*", default=[], help="finished stage outputs, for counts per stage"
    )
    p.add_argument(
        "--all-scores", nargs="*", default=[], help="scored manifests before selection (histogram)"
    )
    p.add_argument("--output", required=True, help="HTML file to write")

    p = add("stablellava-keywords", cmd_sl_keywords, "StableLLaVA: LLM keyword banks per ability")
    p.add_argument("--output", required=True, help="keywords JSON to write")
    p = add("stablellava-prompts", cmd_sl_prompts, "StableLLaVA: SD prompts per ability (Fig. 4) + filters")
    p.add_argument("--keywords", required=True, help="keywords JSON from stablellava-keywords")
    p.add_argument("--output", required=True, help="prompt manifest to write (.jsonl)")
    p = add("stablellava-dialogues", cmd_sl_dialogues, "StableLLaVA: dialogues from the prompts")
    p.add_argument("--prompts", required=True, help="prompt manifest")
    p.add_argument("--output", required=True, help="dialogues JSONL to write")
    p = add("stablellava-export", cmd_sl_export, "StableLLaVA: LLaVA pretrain/SFT JSON + eval set")
    p.add_argument("--selected", required=True, help="manifest of prompts whose images passed the CLIP check")
    p.add_argument("--dialogues", required=True, help="dialogues JSONL")
    p.add_argument("--data-root", required=True, help="image root; LLaVA `image` paths are relative to it")
    p.add_argument("--output", required=True, help="output folder")

    p = add(
        "train", cmd_train, "train LLaVA-1.5: stage 1 pretrain (projector) or stage 2 SFT (projector + LLM)"
    )
    p.add_argument("--stage", choices=["pretrain", "sft"], required=True)
    p.add_argument(
        "--dataset", action="append", required=True, metavar="SPEC",
        help="LLaVA JSON, or json=URI,images=DIR,ratio=R (repeatable: a mixture)",
    )  # fmt: skip
    p.add_argument(
        "--output", required=True, help="output folder or gs:// prefix (model under <output>/model)"
    )
    p = add("evaluate", cmd_evaluate, "evaluate a LLaVA model on benchmark JSONLs or lmms_eval:<task>")
    p.add_argument("--model", required=True, help="HF LLaVA model folder, gs:// URI or hub name")
    p.add_argument("--benchmark", action="append", required=True, help="benchmark JSONL or lmms_eval:<task>")
    p.add_argument("--name", help="model name in the results (default: from --model)")
    p.add_argument("--output", required=True, help="results JSON to write")
    p = add("compare-evals", cmd_compare_evals, "HTML table comparing evaluation results", config=False)
    p.add_argument("results", nargs="+", help="results JSON files from `synthvlm evaluate`")
    p.add_argument("--output", required=True, help="HTML file to write")

    p = add("compile", cmd_compile, "compile pipelines to KFP YAML", config=False)
    p.add_argument("--output-dir", required=True, help="folder for <pipeline>.yaml")
    p.add_argument(
        "--pipeline", dest="pipelines", action="append", help="compile only this pipeline (repeatable)"
    )
    p.add_argument("--image-registry", help="override the component image registry")
    p.add_argument("--image-tag", help="override the component image tag")
    p.add_argument(
        "--max-parallel-gpus",
        type=int,
        metavar="N",
        help="most GPU pods generating at once (ParallelFor; default 8)",
    )

    p = add("run", cmd_run, "run a pipeline (locally with --local, through kfp.local)")
    p.add_argument("pipeline", choices=PIPELINES, help="pipeline name")
    p.add_argument("--local", action="store_true", help="run on this machine with kfp.local.SubprocessRunner")
    p.add_argument("--output", required=True, help="local output folder (the data root)")

    upload_help = "compile a pipeline and upload it to Kubeflow Pipelines (a new version if it exists)"
    p = add("upload", cmd_upload, upload_help, config=False)
    p.add_argument("--host", required=True, help=_HOST_HELP)
    p.add_argument("--namespace", help="Kubeflow profile namespace (multi-user deployments)")
    p.add_argument(
        "--pipeline", default="synthvlm", choices=PIPELINES, help="pipeline to upload; its name there"
    )
    p.add_argument("--package", metavar="FILE", help="upload this compiled YAML instead of compiling")
    p.add_argument("--version", help="name of the new version (default: UTC time + content hash)")
    p.add_argument("--image-registry", help="override the component image registry")
    p.add_argument("--image-tag", help="override the component image tag")

    p = add("submit", cmd_submit, "start a run of an uploaded pipeline on Kubeflow Pipelines")
    p.add_argument("pipeline", choices=PIPELINES, help="pipeline name (as uploaded)")
    p.add_argument("--host", required=True, help=_HOST_HELP)
    p.add_argument("--namespace", help="Kubeflow profile namespace (required on multi-user deployments)")
    p.add_argument("--experiment", default="synthvlm", help="experiment to run in (created if missing)")
    p.add_argument("--run-name", help="run name (default: pipeline name + UTC time)")
    p.add_argument("--version", help="pipeline version name (default: the newest)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        _check_arguments(args)
        args.func(args)
    except SynthVLMError as exc:
        _print_error(str(exc))
        return exc.exit_code  # 2 (bad input); a local run's failed task can say 1
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        # A wrong path is bad input too: name it, without a traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        _print_error(f"{where}{exc.strerror}" if exc.strerror else str(exc))
        return 2
    except RuntimeError as exc:
        # kfp.local raises RuntimeError when a task fails outside run_local's handling.
        _print_error(str(exc))
        return 1
    return 0


def _print_error(message: str) -> None:
    from synthvlm.console import strip_ansi

    sys.stdout.flush()  # the error must come after everything already printed (the last line)
    print(f"error: {strip_ansi(message)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
