"""`synthvlm` command line: a subcommand per stage, plus `run`, `config show`, `compile`, `upload`, `submit`.

Every command reads the same settings: `--config FILE` (a run config YAML, as `synthvlm config show` prints;
a stage command reads its own section of it) and `--set key=value` with the run's dotted keys
(`--set generate.steps=2`); `--preset demo|paper` starts from a preset. `--output` is always a folder:
the files a command writes inside it have fixed names.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from synthvlm.errors import SynthVLMError

log = logging.getLogger("synthvlm")
PIPELINES = ["synthvlm", "stablellava", "train", "end-to-end", "stablellava-end-to-end"]


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", choices=["demo", "paper"], help="start from a preset (default: paper defaults)"
    )
    parser.add_argument("--config", metavar="FILE", help="run config YAML (as `synthvlm config show` prints)")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a config field with the run's dotted key, e.g. generate.steps=2; lists and mappings as "
        "JSON/YAML, e.g. 'keywords.abilities=[colour, animal]' (repeatable)",
    )


# The layout of every pipeline's run config (synthvlm.run_config), known here without importing it (it
# imports every stage, torch among them): stage commands read their section of a run config YAML and
# take the run's dotted keys. tests/test_cli.py checks this against run_config.
RUN_SECTIONS = frozenset(
    {"curate", "generate", "score", "select", "export", "report", "keywords", "prompts", "dialogues",
     "pretrain", "sft", "eval"}
)  # fmt: skip
RUN_SETTINGS = frozenset(
    {"data_root", "num_shards", "gpu_node_selector", "gpu_tolerations", "llm_secret", "captions",
     "max_captions", "curate_captions", "gpus_per_node", "num_nodes", "pretrain_datasets", "sft_datasets",
     "benchmarks", "sft_on_synthetic", "synthetic_ratio", "pretrain_on_synthetic"}
)  # fmt: skip
# The captions stage's fields live at the top level of a run config, under run names.
CAPTIONS_FROM_RUN = {"captions": "captions", "max_captions": "max_records"}


def _stage_layer(
    command: str, section: str, data: dict[str, Any], source: str, own: frozenset[str]
) -> dict[str, Any]:
    """A stage's settings from a mapping that is either a run config (sections) or the stage's own config
    (`own`: the stage's field names, which win where a run setting has the same name)."""
    from synthvlm.errors import ConfigError

    run_keys = RUN_SECTIONS | RUN_SETTINGS
    if set(data) <= own or not set(data) & run_keys:  # the stage's own config (the older form): as it is
        return data
    unknown = sorted(set(data) - run_keys)
    if unknown:
        raise ConfigError(
            f"{source}: {', '.join(unknown)}: not run config keys (a run config has sections "
            f"{', '.join(sorted(RUN_SECTIONS))} and settings {', '.join(sorted(RUN_SETTINGS))})"
        )
    if section == "captions":
        return {field: data[key] or None for key, field in CAPTIONS_FROM_RUN.items() if key in data}
    layer = data.get(section) or {}
    if not isinstance(layer, dict):
        raise ConfigError(f"{source}: section '{section}' must be a mapping")
    return layer


def _stage_sets(command: str, section: str, sets: Sequence[str], own: frozenset[str]) -> list[str]:
    """`--set` with the run's dotted keys (`generate.steps=2`) -> the stage's keys (`steps=2`)."""
    from synthvlm.errors import ConfigError

    stage_sets = []
    for item in sets:
        key, sep, value = item.partition("=")
        head, dot, rest = key.strip().partition(".")
        if section == "captions" and not dot and head in CAPTIONS_FROM_RUN:
            stage_sets.append(f"{CAPTIONS_FROM_RUN[head]}{sep}{value}")
        elif head == section and dot:
            stage_sets.append(f"{rest}{sep}{value}")
        elif not dot and head in own:  # a stage field named like a run setting (train's num_nodes)
            stage_sets.append(item)
        elif head in RUN_SECTIONS | RUN_SETTINGS:
            raise ConfigError(
                f"--set {item}: `synthvlm {command}` reads the run config's '{section}' settings "
                f"({section}.KEY=VALUE), not '{head}'"
            )
        else:  # a bare stage key (the older form)
            stage_sets.append(item)
    return stage_sets


def _stage_config(
    args: argparse.Namespace,
    cls: type,
    section: str,
    extra: dict[str, Any] | None = None,
    pipeline: str = "synthvlm",
):
    from synthvlm.config import build_config, deep_merge, load_yaml

    run_preset: dict[str, Any] = {}
    if args.preset:  # run_config imports every stage's config, torch's among them: only when needed
        from synthvlm.run_config import preset

        run_preset = preset(args.preset, pipeline)
    own = frozenset(cls.model_fields)
    base = _stage_layer(args.command, section, run_preset, f"preset {args.preset}", own)
    if args.config:
        base = deep_merge(base, _stage_layer(args.command, section, load_yaml(args.config), args.config, own))
    base.update(extra or {})
    return build_config(cls, preset=base, sets=_stage_sets(args.command, section, args.sets, own))


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        rank, world = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard expects I/N (e.g. 0/8), got {text!r}") from None
    if world < 1 or not 0 <= rank < world:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= I < N")
    return rank, world


# The file each command writes inside its --output folder (fixed names, as the pipelines' tasks use).
OUTPUT_FILES: dict[str, str] = {
    "captions": "captions.jsonl",
    "curate": "curated.jsonl",
    "score": "scored.jsonl",
    "select": "selected.jsonl",
    "report": "report.html",
    "stablellava-keywords": "keywords.json",
    "stablellava-prompts": "prompts.jsonl",
    "stablellava-dialogues": "dialogues.jsonl",
    "evaluate": "results.json",
    "compare-evals": "comparison.html",
}
REJECTS_FILE = "rejects.jsonl"  # curate's rejects, beside curated.jsonl
# --output used to name a file for these commands: such a value is rejected with the new form.
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".html", ".jpg", ".jpeg", ".png", ".webp")


def _output_file(args: argparse.Namespace, name: str | None = None) -> str:
    from synthvlm import storage

    return storage.join(args.output, name or OUTPUT_FILES[args.command])


def _check_arguments(args: argparse.Namespace) -> None:
    """Fail before any work on an --output that names a file, or a gs:// / s3:// URI without a bucket."""
    from synthvlm import storage

    output = getattr(args, "output", None)
    if output and output.lower().endswith(_FILE_SUFFIXES):
        name = OUTPUT_FILES.get(args.command, "its files")
        parent = os.path.dirname(output.rstrip("/")) or "."
        raise SynthVLMError(
            f"--output {output}: --output is a folder for every command; `synthvlm {args.command}` writes "
            f"{name} inside it (for example --output {parent})"
        )
    if output and not storage.is_remote(output) and os.path.isfile(output):
        raise SynthVLMError(f"--output {output}: is a file; --output must be a folder (created if missing)")
    if getattr(args, "rejects", None):
        raise SynthVLMError(
            f"--rejects {args.rejects}: no longer taken; `synthvlm curate` writes {REJECTS_FILE} beside "
            f"{OUTPUT_FILES['curate']} in the --output folder"
        )
    for value in vars(args).values():  # every URI argument (strings and lists of strings)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and storage.is_remote(item):
                storage.split_remote(item)  # raises an InputError naming the URI the user typed


# ---------------------------------------------------------------- stage commands


def cmd_captions(args: argparse.Namespace) -> None:
    from synthvlm.stages.captions import CaptionsConfig, load_captions

    extra = {"captions": args.input} if args.input else {}
    config = _stage_config(args, CaptionsConfig, "captions", extra)
    print(load_captions(config, _output_file(args)))


def cmd_curate(args: argparse.Namespace) -> None:
    from synthvlm.stages.curate import CurateConfig, curate

    config = _stage_config(args, CurateConfig, "curate")
    print(curate(config, args.input, _output_file(args), _output_file(args, REJECTS_FILE)))


def cmd_generate(args: argparse.Namespace) -> None:
    from synthvlm.stages.generate import GenerateConfig, generate

    rank, world = args.shard
    print(generate(_stage_config(args, GenerateConfig, "generate"), args.input, args.output, rank, world))


def cmd_score(args: argparse.Namespace) -> None:
    from synthvlm.stages.clip_score import ScoreConfig, score

    print(score(_stage_config(args, ScoreConfig, "score"), args.input, _output_file(args)))


def cmd_select(args: argparse.Namespace) -> None:
    from synthvlm.stages.select import SelectConfig, select

    print(select(_stage_config(args, SelectConfig, "select"), args.input, _output_file(args)))


def cmd_export(args: argparse.Namespace) -> None:
    from synthvlm.stages.export_llava import ExportConfig, export_llava

    print(export_llava(_stage_config(args, ExportConfig, "export"), args.input, args.data_root, args.output))


def cmd_regenerate(args: argparse.Namespace) -> None:
    from synthvlm import storage
    from synthvlm.regenerate import EXTENSIONS, find_record, generation_provenance, regenerate

    image_format = generation_provenance(find_record(args.manifest, args.id), args.manifest)["image_format"]
    name = args.id.replace("/", "_") + EXTENSIONS.get(image_format, (".img",))[0]
    result = regenerate(args.manifest, args.id, storage.join(args.output, name), check=args.check)
    status = {True: "byte-identical", False: "DIFFERENT", None: "not compared (original unreadable)"}
    print(f"{result.output}: {status[result.identical]}")


def cmd_report(args: argparse.Namespace) -> None:
    from synthvlm.stages.report import ReportConfig, write_report

    config = _stage_config(args, ReportConfig, "report")
    print(
        write_report(
            config, args.input, args.stage_outputs, _output_file(args), all_scores_manifests=args.all_scores
        )
    )


def cmd_sl_keywords(args: argparse.Namespace) -> None:
    from synthvlm.stages.stablellava import KeywordsConfig, generate_keywords

    print(
        generate_keywords(
            _stage_config(args, KeywordsConfig, "keywords", pipeline="stablellava"), _output_file(args)
        )
    )


def cmd_sl_prompts(args: argparse.Namespace) -> None:
    from synthvlm.stages.stablellava import PromptsConfig, generate_prompts

    config = _stage_config(args, PromptsConfig, "prompts", pipeline="stablellava")
    print(generate_prompts(config, args.keywords, _output_file(args)))


def cmd_sl_dialogues(args: argparse.Namespace) -> None:
    from synthvlm.stages.stablellava import DialoguesConfig, generate_dialogues

    config = _stage_config(args, DialoguesConfig, "dialogues", pipeline="stablellava")
    print(generate_dialogues(config, args.prompts, _output_file(args)))


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
    print(evaluate(config, args.model, args.benchmark, _output_file(args), model_name=args.name))


def cmd_compare_evals(args: argparse.Namespace) -> None:
    from synthvlm.evaluation.report import write_comparison

    print(write_comparison(args.results, _output_file(args)))


# ---------------------------------------------------------------- pipelines


def _parse_resources(text: str) -> tuple[str, list[str | None]]:
    kind, sep, size = text.partition("=")
    parts = size.split(",")
    if not sep or len(parts) not in (2, 3) or not all(parts):
        raise argparse.ArgumentTypeError(
            f"--resources expects KIND=CPU,MEMORY[,MEMORY_LIMIT] (e.g. generate=8,48Gi,64Gi), got {text!r}"
        )
    return kind, [*parts, None][:3]


def _compile_options(args: argparse.Namespace) -> None:
    """Compile-time settings, read when pipelines/common.py is imported (so: before compiling)."""
    if args.max_parallel_gpus is not None:
        os.environ["SYNTHVLM_MAX_PARALLEL_GPU_PODS"] = str(args.max_parallel_gpus)
    if args.resources:
        # checked against pipelines/common.py TASK_RESOURCES when the pipelines are imported
        os.environ["SYNTHVLM_TASK_RESOURCES"] = json.dumps(dict(args.resources))
    if args.data_pvc:
        name, _, mount = args.data_pvc.partition(":")
        os.environ["SYNTHVLM_DATA_PVC"] = name
        if mount:
            os.environ["SYNTHVLM_DATA_MOUNT"] = mount
    if args.model_cache_pvc:
        os.environ["SYNTHVLM_MODEL_CACHE_PVC"] = args.model_cache_pvc
    if args.s3_endpoint:
        os.environ["SYNTHVLM_S3_ENDPOINT"] = args.s3_endpoint
    if args.s3_secret:
        os.environ["SYNTHVLM_S3_SECRET"] = args.s3_secret
    if args.image_registry or args.image_tag:
        from synthvlm.images import set_image_overrides

        set_image_overrides(args.image_registry, args.image_tag)


def _compile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-registry", help="override the component image registry")
    p.add_argument("--image-tag", help="override the component image tag")
    p.add_argument(
        "--max-parallel-gpus",
        type=int,
        metavar="N",
        help="most GPU pods generating at once (ParallelFor; default 8)",
    )
    p.add_argument(
        "--resources",
        type=_parse_resources,
        action="append",
        default=[],
        metavar="KIND=CPU,MEM[,LIMIT]",
        help="CPU and memory of a kind of task (light, llm, records, generate, score, train, eval); "
        "defaults and their reasons in pipelines/common.py (repeatable)",
    )
    p.add_argument(
        "--data-pvc",
        metavar="NAME[:PATH]",
        help="mount this PersistentVolumeClaim in every task at PATH (default /data), so data_root can be "
        "a path on it",
    )
    p.add_argument(
        "--model-cache-pvc",
        metavar="NAME",
        help="mount this PVC at /models in every model-loading task, with HF_HOME=/models/huggingface "
        "(fill it once: README, model cache)",
    )
    p.add_argument("--s3-endpoint", metavar="URL", help="AWS_ENDPOINT_URL of every task (s3:// data roots)")
    p.add_argument(
        "--s3-secret",
        metavar="NAME[:ACCESS,SECRET]",
        help="Secret with the S3 credentials and its two keys (default: AWS_ACCESS_KEY_ID,"
        "AWS_SECRET_ACCESS_KEY; KFP's MinIO: mlpipeline-minio-artifact:accesskey,secretkey)",
    )


def cmd_compile(args: argparse.Namespace) -> None:
    _compile_options(args)
    from synthvlm.kfp_support import compile_all

    for path in compile_all(args.output_dir, args.pipelines or None):
        print(path)


# What a finished local run leaves, per pipeline (paths under the data root).
RUN_RESULTS = {
    "synthvlm": [
        ("LLaVA pretraining JSON", "export/llava_pretrain.json"),
        ("dataset manifest", "export/manifest.jsonl"),
        ("WebDataset shards", "export/webdataset/"),
        ("dataset card", "export/README.md"),
        ("report", "report.html"),
    ],
    "stablellava": [
        ("LLaVA SFT JSON", "stablellava/export/stablellava_sft.json"),
        ("LLaVA pretraining JSON", "stablellava/export/stablellava_pretrain.json"),
        ("LLaVA SFT JSON, interleaved", "stablellava/export/stablellava_sft_interleaved.json"),
        ("eval set", "stablellava/export/stablellava_eval.jsonl"),
        ("which file for which trainer", "stablellava/export/README.md"),
        ("dataset manifest", "stablellava/export/manifest.jsonl"),
        ("WebDataset shards", "stablellava/export/webdataset/"),
        ("report", "stablellava/report.html"),
    ],
    "train": [
        ("SFT model", "train/sft/model"),
        ("eval results", "eval/sft.json"),
        ("eval table", "eval/sft.html"),
    ],
}
RUN_RESULTS["end-to-end"] = RUN_RESULTS["synthvlm"] + RUN_RESULTS["train"]
RUN_RESULTS["stablellava-end-to-end"] = RUN_RESULTS["stablellava"] + [
    ("SFT model", "train/sft/model"),
    ("eval results", "eval/sft.json"),
    ("comparison table", "eval/comparison.html"),
]


def _run_config(args: argparse.Namespace, data_root: str | None = None):
    from synthvlm.config import build_config
    from synthvlm.run_config import preset, run_config_class

    base = preset(args.preset, args.pipeline)
    if "report" in run_config_class(args.pipeline).model_fields:  # the report's header names them
        base["report"] = {**base.get("report", {}), "pipeline": args.pipeline, "preset": args.preset}
    if data_root is not None:
        base["data_root"] = data_root
    return build_config(run_config_class(args.pipeline), preset=base, config_file=args.config, sets=args.sets)


def cmd_config(args: argparse.Namespace) -> None:
    from synthvlm.config import dump_yaml

    print(dump_yaml(_run_config(args)), end="")


def cmd_prefetch(args: argparse.Namespace) -> None:
    from synthvlm.prefetch import models_of, prefetch

    refs = models_of(_run_config(args))
    if not refs:
        print("no model to download (built-in tiny models or local folders only)")
    for ref in refs:
        print(f"{ref.used_by:10} {ref.kind:9} {ref.name}" + (f" ({ref.revision})" if ref.revision else ""))
    if args.dry_run:
        return
    for item in prefetch(refs):
        print(f"cached {item['model']}: {item['path']}")


def cmd_run(args: argparse.Namespace) -> None:
    import shutil
    import tempfile

    from synthvlm import storage
    from synthvlm.kfp_support import run_local
    from synthvlm.run_config import to_pipeline_arguments

    if not args.local:
        raise SynthVLMError(
            "only --local runs are started by `synthvlm run`; on a cluster, upload the pipeline and start it "
            "from the Kubeflow UI or with `synthvlm submit` (README: cluster workflow)"
        )
    remote = storage.is_remote(args.output)  # gs:// or s3://: the tasks read and write there
    output = args.output if remote else os.path.abspath(args.output)
    config = _run_config(args, data_root=output)
    # kfp.local's own task outputs need a local folder: beside a local data root, else a temp folder.
    local_root = tempfile.mkdtemp(prefix="synthvlm-kfp-local-") if remote else output
    Path(local_root).mkdir(parents=True, exist_ok=True)
    if args.preset == "demo":
        print(
            "NOTE: the demo preset uses tiny RANDOM-WEIGHT SDXL and CLIP models built from configs and an\n"
            "      offline template LLM backend (nothing is downloaded or called): it runs every stage\n"
            "      end to end, but its images are noise, its scores meaningless and its text templated.\n"
            "      Use --preset paper for SDXL base 1.0, CLIP ViT-L-14 and a real LLM.",
            flush=True,
        )
    try:
        run_local(
            args.pipeline,
            to_pipeline_arguments(config),
            pipeline_root=os.path.join(local_root, "kfp-local"),
            verbose=args.verbose,
        )
    finally:
        if remote:
            shutil.rmtree(local_root, ignore_errors=True)
    print("\nDone.")
    for label, path in RUN_RESULTS[args.pipeline]:
        print(f"  {label + ':':30} {storage.join(config.data_root, path)}")
    print(f"  {'images (--image_folder):':30} {config.data_root}")


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
            _compile_options(args)
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
    from synthvlm.run_config import preset, run_config_class, to_pipeline_arguments

    config = build_config(
        run_config_class(args.pipeline),
        preset=preset(args.preset, args.pipeline),
        config_file=args.config,
        sets=args.sets,
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
        service_account=args.service_account,
    )
    print(f"started run {result['run_name']!r} of {args.pipeline} version {result['version_name']!r}")
    print(f"  run id: {result['run_id']}")
    print(f"  {result['url']}")


# ---------------------------------------------------------------- parser

DEFAULT_SERVICE_ACCOUNT = "synthvlm-runner"  # manifests/rbac: the account with the bucket rights

# The examples each --help ends with.
EXAMPLES: dict[str, list[str]] = {
    "main": ["synthvlm run synthvlm --local --preset demo --output runs/demo",
             "synthvlm config show synthvlm --preset paper --set select.k=50000 > run.yaml"],
    "captions": ["synthvlm captions --input my_captions.csv --output runs/x/captions",
                 "synthvlm captions --config run.yaml --set max_captions=1000 --output runs/x/captions"],
    "curate": ["synthvlm curate --input runs/x/captions/captions.jsonl --output runs/x/curate --preset demo"],
    "generate": ["synthvlm generate --input runs/x/captions/captions.jsonl --output runs/x --shard 0/8 "
                 "--set generate.steps=30"],
    "regenerate": ["synthvlm regenerate --manifest runs/x/export/manifest.jsonl --id cap-0001 "
                   "--output /tmp/again --check"],
    "score": ["synthvlm score --input runs/x/generate/shards/shard-00000-of-00001.jsonl "
              "--output runs/x/score"],
    "select": ["synthvlm select --input runs/x/scores/*.jsonl --output runs/x/select --set select.k=1000",
               "synthvlm select --input scored.jsonl --output out --set select.mode=threshold "
               "--set select.threshold=0.3"],
    "export": ["synthvlm export --input runs/x/select/selected.jsonl --data-root runs/x "
               "--output runs/x/export"],
    "report": ["synthvlm report --input runs/x/select/selected.jsonl --all-scores runs/x/scores/*.jsonl "
               "--output runs/x"],
    "stablellava-keywords": ["synthvlm stablellava-keywords --preset demo --output runs/sl"],
    "stablellava-prompts": ["synthvlm stablellava-prompts --keywords runs/sl/keywords.json --output runs/sl "
                            "--set 'prompts.abilities=[colour, animal]'"],
    "stablellava-dialogues": ["synthvlm stablellava-dialogues --prompts runs/sl/prompts.jsonl "
                              "--output runs/sl"],
    "stablellava-export": ["synthvlm stablellava-export --selected runs/sl/select/selected.jsonl "
                           "--dialogues runs/sl/dialogues.jsonl --data-root runs/sl --output runs/sl/export"],
    "train": ["synthvlm train --stage pretrain --dataset runs/x/export/llava_pretrain.json "
              "--output runs/x/pt",
              "synthvlm train --stage sft --dataset json=llava_665k.json,images=/data/coco,ratio=1 "
              "--output runs/x/sft --set sft.learning_rate=1e-5"],
    "evaluate": ["synthvlm evaluate --model runs/x/sft/model --benchmark lmms_eval:mme "
                 "--output runs/x/eval"],
    "compare-evals": ["synthvlm compare-evals runs/a/eval/results.json runs/b/eval/results.json "
                      "--output cmp"],
    "config": ["synthvlm config show synthvlm --preset demo > run.yaml",
               "synthvlm run synthvlm --local --config run.yaml --output runs/mine"],
    "prefetch-models": ["synthvlm prefetch-models synthvlm --preset paper",
                        "synthvlm prefetch-models end-to-end --preset paper --dry-run"],
    "run": ["synthvlm run synthvlm --local --preset demo --output runs/demo",
            "synthvlm run stablellava --local --preset demo --set generate.steps=2 --output runs/sl"],
    "compile": ["synthvlm compile --output-dir pipelines/compiled --max-parallel-gpus 16"],
    "upload": ["synthvlm upload --host http://localhost:8080 --pipeline synthvlm"],
    "submit": ["synthvlm submit synthvlm --host http://localhost:8080 --config run.yaml "
               "--set data_root=gs://bucket/run-1 --service-account synthvlm-runner"],
}  # fmt: skip


def _examples(command: str) -> str:
    lines = EXAMPLES.get(command, [])
    return "examples:\n" + "\n".join(f"  {line}" for line in lines) if lines else ""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("synthvlm")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synthvlm",
        description=__doc__.splitlines()[0],
        epilog=_examples("main"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, every log line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], None], help_: str, config: bool = True):
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=_examples(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        # -v after the subcommand too; SUPPRESS keeps a -v given before it
        p.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
        )
        if config:
            _config_args(p)
        return p

    p = add(
        "captions", cmd_captions, "validate a captions file (.jsonl/.csv/.parquet) into a caption manifest"
    )
    p.add_argument("--input", help="captions file or URI (default: the config's `captions`)")
    p.add_argument("--output", required=True, help="output folder: writes captions.jsonl")

    p = add(
        "curate", cmd_curate, "curate captions (SynthVLM §3.1): heuristics, dedup, LLM judge, raw-image CLIP"
    )
    p.add_argument(
        "--input", required=True, help="caption manifest (records with image_uri get the raw-image filter)"
    )
    p.add_argument("--output", required=True, help="output folder: writes curated.jsonl and rejects.jsonl")
    p.add_argument("--rejects", help=argparse.SUPPRESS)  # removed: rejected with a message

    p = add("generate", cmd_generate, "generate images for one shard of a manifest with SDXL")
    p.add_argument("--input", required=True, help="caption manifest")
    p.add_argument(
        "--output", required=True, help="data root (folder, gs:// or s3:// prefix): images, shard manifests"
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
    p.add_argument("--output", required=True, help="output folder: writes <id>.<ext> (format as recorded)")
    p.add_argument("--check", action="store_true", help="exit non-zero unless byte-identical to the original")

    p = add("score", cmd_score, "CLIP-score image/caption pairs of a manifest")
    p.add_argument("--input", required=True, help="manifest with image_uri")
    p.add_argument("--output", required=True, help="output folder: writes scored.jsonl")

    p = add(
        "select", cmd_select, "select pairs by top-k, top fraction or threshold over one or more manifests"
    )
    p.add_argument("--input", required=True, nargs="+", help="scored manifest(s), e.g. one per shard")
    p.add_argument("--output", required=True, help="output folder: writes selected.jsonl")

    p = add("export", cmd_export, "export selected pairs as LLaVA pretraining JSON + dataset manifest")
    p.add_argument("--input", required=True, help="selected manifest")
    p.add_argument("--data-root", required=True, help="image root; LLaVA `image` paths are relative to it")
    p.add_argument("--output", required=True, help="output folder, gs:// or s3:// prefix")

    p = add("report", cmd_report, "write the HTML report (sample grid, score histogram, counts per stage)")
    p.add_argument("--input", required=True, help="selected manifest")
    p.add_argument(
        "--stage-outputs", nargs="*", default=[], help="finished stage outputs, for counts per stage"
    )
    p.add_argument(
        "--all-scores", nargs="*", default=[], help="scored manifests before selection (histogram)"
    )
    p.add_argument("--output", required=True, help="output folder: writes report.html")

    p = add("stablellava-keywords", cmd_sl_keywords, "StableLLaVA: LLM keyword banks per ability")
    p.add_argument("--output", required=True, help="output folder: writes keywords.json")
    p = add("stablellava-prompts", cmd_sl_prompts, "StableLLaVA: SD prompts per ability (Fig. 4) + filters")
    p.add_argument("--keywords", required=True, help="keywords JSON from stablellava-keywords")
    p.add_argument("--output", required=True, help="output folder: writes prompts.jsonl")
    p = add("stablellava-dialogues", cmd_sl_dialogues, "StableLLaVA: dialogues from the prompts")
    p.add_argument("--prompts", required=True, help="prompt manifest")
    p.add_argument("--output", required=True, help="output folder: writes dialogues.jsonl")
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
        "--output", required=True, help="output folder, gs:// or s3:// prefix (model under <output>/model)"
    )
    p = add("evaluate", cmd_evaluate, "evaluate a LLaVA model on benchmark JSONLs or lmms_eval:<task>")
    p.add_argument("--model", required=True, help="HF LLaVA model folder, gs:// or s3:// URI, or hub name")
    p.add_argument("--benchmark", action="append", required=True, help="benchmark JSONL or lmms_eval:<task>")
    p.add_argument("--name", help="model name in the results (default: from --model)")
    p.add_argument("--output", required=True, help="output folder: writes results.json")
    p = add("compare-evals", cmd_compare_evals, "HTML table comparing evaluation results", config=False)
    p.add_argument("results", nargs="+", help="results JSON files from `synthvlm evaluate`")
    p.add_argument("--output", required=True, help="output folder: writes comparison.html")

    p = add("compile", cmd_compile, "compile pipelines to KFP YAML", config=False)
    p.add_argument("--output-dir", required=True, help="folder for <pipeline>.yaml")
    p.add_argument(
        "--pipeline",
        dest="pipelines",
        action="append",
        choices=PIPELINES,
        help="compile only this pipeline (repeatable)",
    )
    _compile_args(p)

    p = add(
        "config", cmd_config, "print a pipeline's effective run config as YAML (presets, --config, --set)"
    )
    p.add_argument("action", choices=["show"], help="show: print the config")
    p.add_argument("pipeline", choices=PIPELINES, help="pipeline name")

    p = add(
        "prefetch-models",
        cmd_prefetch,
        "download every model a run config names into HF_HOME (fill a model-cache volume once)",
    )
    p.add_argument("pipeline", choices=PIPELINES, help="pipeline name")
    p.add_argument("--dry-run", action="store_true", help="list the models, download nothing")

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
    _compile_args(p)

    p = add("submit", cmd_submit, "start a run of an uploaded pipeline on Kubeflow Pipelines")
    p.add_argument("pipeline", choices=PIPELINES, help="pipeline name (as uploaded)")
    p.add_argument("--host", required=True, help=_HOST_HELP)
    p.add_argument("--namespace", help="Kubeflow profile namespace (required on multi-user deployments)")
    p.add_argument("--experiment", default="synthvlm", help="experiment to run in (created if missing)")
    p.add_argument("--run-name", help="run name (default: pipeline name + UTC time)")
    p.add_argument("--version", help="pipeline version name (default: the newest)")
    p.add_argument(
        "--service-account",
        default=DEFAULT_SERVICE_ACCOUNT,
        help="Kubernetes service account the run's pods use; it carries the bucket rights "
        f"(manifests/README.md; default {DEFAULT_SERVICE_ACCOUNT}; '' = the namespace's default)",
    )
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
