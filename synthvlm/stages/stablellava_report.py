"""The StableLLaVA report: one self-contained HTML page about a `stablellava` run.

What it shows, read from the stages' outputs, markers and rejects files (nothing is recomputed):
- a header naming the pipeline, preset, date, data root, models (image generator, CLIP scorer, the LLM of
  each LLM stage) and the export's fingerprint, with a banner when the models are random or the LLM text
  comes from the offline template backend;
- per ability, the counts through every step: keywords, prompts, images, the CLIP check, dialogues and the
  exported samples, with what each step dropped;
- the stage table (aggregated over shards, per-shard rows folded away);
- LLM requests, tokens and cost per stage, and the GPU time of generation and scoring with its price;
- the billed-time cost table of the SynthVLM report (synthvlm.billing): every stage's pods x the GPUs or
  vCPUs they request, split into load, work and idle, and the LLM tokens priced per model, prices printed;
- the CLIP scores with the gamma line;
- every reject reason with its count and a few examples;
- exported samples: their image(s) with the SD prompt each was painted from and the dialogue, several
  images of one sample shown together, `<image>` tokens shown where they stand in the turns.

Records are read defensively: a sample's `image` may be a path or a list of paths, files the export may or
may not write are looked for, not assumed. Like the SynthVLM report, the page has no scripts and no external
assets, and every piece of user or LLM text is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from synthvlm import storage
from synthvlm.billing import Prices, cost_line, cost_table_html
from synthvlm.records import Record, read_manifest
from synthvlm.runner import Stage, StageRun, run_stage
from synthvlm.stage import StageStats, require_done
from synthvlm.stages.report import STYLE as BASE_STYLE
from synthvlm.stages.report import (
    RejectGroup,
    banner_html,
    compute_histogram,
    first_marker,
    generate_rejects_uri,
    header_rows_html,
    histogram_svg,
    image_html,
    model_lines,
    preset_text,
    random_test_models,
    read_jsonl_rows,
    read_markers,
    rejects_table_html,
    selection_cut,
    short_text,
    stage_devices,
    stages_table_html,
    written_at,
)

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
_LLM_STAGES = ("stablellava_keywords", "stablellava_prompts", "stablellava_dialogues")
# Dialogue kinds shown first among the samples: those with several images or turns are the rarest.
_KIND_ORDER = ("interleaved", "multi_image", "multi_turn", "qa", "caption", "eval")


class StableLLaVAReportConfig(Prices):
    """Settings of the StableLLaVA HTML report; the prices of its cost (gpu_hour_usd, cpu_hour_usd,
    llm_prices) come from `Prices`, as in the SynthVLM report."""

    # our choice: enough samples to see every ability and dialogue kind; bounds the HTML size.
    max_samples: int = Field(default=24, ge=0)
    # our choice: longer side in pixels; several images of a sample sit side by side at this size.
    thumbnail_size: int = Field(default=192, ge=16)
    histogram_bins: int = Field(default=20, ge=1)  # our choice, as in the SynthVLM report
    score_key: str = "clip"  # the key the CLIP scoring stage writes (the v2 §4.4 alignment check)
    max_reject_examples: int = Field(default=3, ge=0)  # our choice: examples per (stage, reason)
    # Named in the header; markers do not record them, so whoever starts the run fills them in.
    pipeline: str = "stablellava"
    preset: str | None = None


# ---- reading -------------------------------------------------------------------------------------------


def rejects_file(output_uri: str) -> str:
    """The StableLLaVA stages' rejects sidecar: '.../prompts.jsonl' -> '.../prompts.rejects.jsonl'."""
    stem = output_uri.removesuffix(".jsonl").removesuffix(".json")
    return f"{stem}.rejects.jsonl"


def images_of(sample: Mapping[str, Any]) -> list[str]:
    """A sample's image paths: `image` may be one path, a list of paths, or absent (text only)."""
    image = sample.get("image")
    if isinstance(image, str):
        return [image] if image else []
    if isinstance(image, list):
        return [str(i) for i in image if i]
    return []


def resolve_image(path: str, data_root: str) -> str:
    """An exported image path (relative to the data root, or already absolute) as a URI to read."""
    if storage.is_remote(path) or path.startswith("/") or not data_root:
        return path
    return storage.join(data_root, path)


@dataclass
class Sample:
    """One exported sample (a LLaVA conversation or an eval item) and where it was found."""

    id: str
    file: str
    images: list[str]  # as exported (relative to the data root)
    turns: list[tuple[str, str]]  # (speaker, text)
    kind: str = ""
    ability: str = ""


def _sample_of(row: Mapping[str, Any], file: str) -> Sample | None:
    if not isinstance(row, Mapping) or "id" not in row:
        return None
    turns: list[tuple[str, str]] = []
    if isinstance(row.get("conversations"), list):
        for turn in row["conversations"]:
            if isinstance(turn, Mapping):
                turns.append((str(turn.get("from", "?")), str(turn.get("value", ""))))
    elif "question" in row:  # an eval item
        turns = [("human", str(row.get("question", ""))), ("gpt", str(row.get("answer", "")))]
        if row.get("answers"):
            turns.append(("reference keywords", ", ".join(map(str, row["answers"]))))
    else:
        return None
    ability = str(row.get("ability") or "")
    return Sample(str(row["id"]), file, images_of(row), turns, "eval" if "question" in row else "", ability)


def read_samples(export_dir: str) -> list[Sample]:
    """Every sample in the export folder's JSON (a list of LLaVA samples) and JSONL (eval items) files,
    first file first; an id in two files is shown once, naming the first."""
    samples: dict[str, Sample] = {}
    prefix = export_dir.rstrip("/") + "/"
    for uri in storage.list_uris(export_dir):
        name = uri[len(prefix) :] if uri.startswith(prefix) else uri.rpartition("/")[2]
        if "/" in name or name.endswith((".rejects.jsonl", ".done")) or name == "manifest.jsonl":
            continue  # only the folder's own files; rejects and the record manifest are not samples
        rows: list[Any] = []
        if name.endswith(".json"):
            try:
                data = json.loads(storage.read_text(uri))
            except json.JSONDecodeError as exc:
                log.warning("report: %s is not JSON (%s): skipped", uri, exc)
                continue
            rows = data if isinstance(data, list) else []
        elif name.endswith(".jsonl"):
            rows = read_jsonl_rows(uri)
        for row in rows:
            sample = _sample_of(row, name)
            if sample is not None and sample.id not in samples:
                samples[sample.id] = sample
    return list(samples.values())


@dataclass
class RunData:
    """What the report reads from a run."""

    markers: list[dict[str, Any]]
    by_stage: dict[str, dict[str, Any]]  # first marker of each stage
    banks: dict[str, list[str]]
    prompts: dict[str, Record]
    generated: list[Record]
    scored: list[Record]
    selected: dict[str, Record]
    dialogues: dict[str, dict[str, Any]]
    samples: list[Sample]
    data_root: str
    rejects: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # step -> rows


def _read_banks(uri: str) -> dict[str, list[str]]:
    try:
        data = json.loads(storage.read_text(uri))
    except json.JSONDecodeError:
        return {}
    banks = data.get("abilities", data) if isinstance(data, dict) else {}
    return {str(k): list(v) for k, v in banks.items() if isinstance(v, list)}


def read_run(inputs: Mapping[str, Any]) -> RunData:
    """Markers, manifests, rejects files and exported samples of the outputs in `inputs`
    (write_stablellava_report's arguments)."""
    generated_uris, scored_uris = list(inputs["generated"]), list(inputs["scored"])
    order = [
        inputs["keywords"],
        inputs["prompts"],
        inputs["dialogues"],
        *generated_uris,
        *scored_uris,
        inputs["selected"],
        inputs["exported"],
    ]
    markers = read_markers(order)
    by_stage: dict[str, dict[str, Any]] = {}
    for marker in markers:
        by_stage.setdefault(str(marker.get("stage", "?")), marker)
    export = markers[-1]
    export_output = str(export.get("output") or inputs["exported"])
    data_root = str((export.get("params") or {}).get("data_root") or export.get("data_root") or "")
    dialogues = {str(row.get("id")): row for row in read_jsonl_rows(inputs["dialogues"])}
    generated = [rec for uri in generated_uris for rec in read_manifest(uri)]
    rejects: dict[str, list[dict[str, Any]]] = {}
    for step, uri in (
        ("keywords", rejects_file(inputs["keywords"])),
        ("prompts", rejects_file(inputs["prompts"])),
        ("dialogues", rejects_file(inputs["dialogues"])),
    ):
        rejects[step] = read_jsonl_rows(uri)
    export_dir = export_output.rpartition("/")[0]
    rejects["export"] = [
        row
        for uri in storage.list_uris(export_dir, ".rejects.jsonl")
        if uri.rpartition("/")[0] == export_dir
        for row in read_jsonl_rows(uri)
    ]
    rejects["generate"] = [
        row
        for marker in markers
        if marker.get("stage") == "generate" and marker.get("output")
        for row in read_jsonl_rows(generate_rejects_uri(str(marker["output"])))
    ]
    return RunData(
        markers=markers,
        by_stage=by_stage,
        banks=_read_banks(inputs["keywords"]),
        prompts={rec.id: rec for rec in read_manifest(inputs["prompts"])},
        generated=generated,
        scored=[rec for uri in scored_uris for rec in read_manifest(uri)],
        selected={rec.id: rec for rec in read_manifest(inputs["selected"])},
        dialogues=dialogues,
        samples=read_samples(export_dir),
        data_root=data_root,
        rejects=rejects,
    )


# ---- per ability ---------------------------------------------------------------------------------------


def _ability(record: Record | None) -> str:
    return str((record.provenance.get("ability") if record else None) or "?")


def _source_id(record_id: str) -> str:
    return record_id.split("~", 1)[0]  # generate's "{id}~{n}" image variants


class Abilities:
    """Ability of a prompt record, image, dialogue or sample."""

    def __init__(self, data: RunData):
        self.data = data
        self.by_image_uri = {rec.image_uri: rec for rec in data.selected.values() if rec.image_uri}

    def of_record(self, record_id: str) -> str:
        record = self.data.prompts.get(record_id) or self.data.prompts.get(_source_id(record_id))
        return _ability(record)

    def record_of_image(self, path: str) -> Record | None:
        uri = resolve_image(path, self.data.data_root)
        record = self.by_image_uri.get(uri)
        if record is None:  # exported under another root: match the file name (the image id)
            stem = path.rpartition("/")[2].rsplit(".", 1)[0]
            record = self.data.selected.get(stem)
        return record

    def of_sample(self, sample: Sample) -> str:
        dialogue = self.data.dialogues.get(sample.id)
        if dialogue and dialogue.get("ability"):
            return str(dialogue["ability"])
        if sample.ability:
            return sample.ability
        for path in sample.images:
            record = self.record_of_image(path)
            if record is not None:
                return _ability(record)
        return "?"


def _count_rows(rows: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> Counter[str]:
    return Counter(str(key(row) or "?") for row in rows)


def ability_table(data: RunData, abilities: Abilities) -> tuple[str, list[str]]:
    """Counts per ability through every step (HTML table) and the abilities in order."""
    kept_ids = set(data.selected)
    generated_ids = {rec.id for rec in data.generated}
    columns: list[tuple[str, str, Counter[str]]] = [
        ("keywords", "in the bank", Counter({k: len(v) for k, v in data.banks.items()})),
        ("keywords", "rejected", _count_rows(data.rejects["keywords"], lambda r: r.get("ability"))),
        ("prompts", "accepted", Counter(_ability(rec) for rec in data.prompts.values())),
        ("prompts", "rejected", _count_rows(data.rejects["prompts"], lambda r: r.get("ability"))),
        ("images", "made", Counter(abilities.of_record(i) for i in generated_ids)),
        (
            "images",
            "rejected",
            Counter(abilities.of_record(str(r.get("id"))) for r in data.rejects["generate"]),
        ),
        ("CLIP check", "passed", Counter(abilities.of_record(r.id) for r in data.scored if r.id in kept_ids)),
        (
            "CLIP check",
            "failed",
            Counter(abilities.of_record(r.id) for r in data.scored if r.id not in kept_ids),
        ),
        ("dialogues", "written", _count_rows(list(data.dialogues.values()), lambda r: r.get("ability"))),
        ("dialogues", "rejected", _count_rows(data.rejects["dialogues"], lambda r: r.get("ability"))),
        ("exported", "samples", Counter(abilities.of_sample(s) for s in data.samples)),
        ("exported", "dropped", _count_rows(data.rejects["export"], lambda r: r.get("ability"))),
    ]
    names = list(data.banks)
    for _, _, counts in columns:
        names += sorted(name for name in counts if name not in names)
    groups: list[tuple[str, int]] = []
    for step, _, _ in columns:
        if groups and groups[-1][0] == step:
            groups[-1] = (step, groups[-1][1] + 1)
        else:
            groups.append((step, 1))
    head1 = "".join(f"<th colspan='{n}'>{html.escape(step)}</th>" for step, n in groups)
    head2 = "".join(
        f"<th class='{'bad' if sub in _BAD else ''}'>{html.escape(sub)}</th>" for _, sub, _ in columns
    )
    rows = [
        "<table class='stages abilities'><thead>"
        f"<tr><th rowspan='2'>ability</th>{head1}</tr><tr>{head2}</tr></thead><tbody>"
    ]
    for name in names:
        cells = "".join(_count_cell(counts.get(name, 0), sub) for _, sub, counts in columns)
        rows.append(f"<tr class='ability'><td>{html.escape(name)}</td>{cells}</tr>")
    totals = "".join(_count_cell(sum(counts.values()), sub) for _, sub, counts in columns)
    rows.append(f"<tr class='total'><td>all abilities</td>{totals}</tr></tbody></table>")
    return "".join(rows), names


_BAD = frozenset({"rejected", "failed", "dropped"})


def _count_cell(count: int, sub: str) -> str:
    cls = " class='bad'" if sub in _BAD and count else ""
    return f"<td{cls}>{count:,}</td>"


# ---- LLM usage -------------------------------------------------------------------------------------------


def _llm_name(marker: Mapping[str, Any]) -> str:
    llm = marker.get("llm")
    if isinstance(llm, Mapping):
        return f"{llm.get('backend', '?')} / {llm.get('model', '?')}"
    return str(marker.get("llm_model") or "-")


def llm_table(markers: Sequence[dict[str, Any]]) -> str:
    """LLM requests, cache hits, retries, tokens and cost per LLM stage, with a total row; a stage that
    counted none of them (the offline template backend) has no row, and without rows there is no table."""
    keys = ("llm_requests", "llm_cache_hits", "llm_retries", "llm_prompt_tokens", "llm_completion_tokens")
    rows = [
        "<table class='stages llm'><thead><tr><th>stage</th><th>backend / model</th><th>requests</th>"
        "<th>cache hits</th><th>retries</th><th>prompt tokens</th><th>completion tokens</th>"
        "<th>cost (USD)</th></tr></thead><tbody>"
    ]
    totals = Counter[str]()
    cost = 0.0
    for marker in markers:
        if marker.get("stage") not in _LLM_STAGES and "llm_requests" not in marker:
            continue
        values = [int(marker.get(k, 0) or 0) for k in keys]
        if not any(values) and not marker.get("llm_cost_usd"):
            continue
        totals.update(dict(zip(keys, values, strict=True)))
        cost += float(marker.get("llm_cost_usd", 0.0) or 0.0)
        cells = "".join(f"<td>{v:,}</td>" for v in values)
        rows.append(
            f"<tr><td>{html.escape(str(marker.get('stage')))}</td><td class='text'>"
            f"{html.escape(_llm_name(marker))}</td>{cells}"
            f"<td>${float(marker.get('llm_cost_usd', 0.0) or 0.0):,.2f}</td></tr>"
        )
    if len(rows) == 1:
        return "<p class='none'>No LLM requests, tokens or cost recorded.</p>"
    cells = "".join(f"<td>{totals[k]:,}</td>" for k in keys)
    rows.append(f"<tr class='total'><td>all</td><td></td>{cells}<td>${cost:,.2f}</td></tr></tbody></table>")
    return "".join(rows)


_LLM_NOTE = (
    "Requests are calls sent to the endpoint (retries included); cache hits were answered from the response "
    "cache under the data root and cost nothing. Cost is what each stage computed from its "
    "llm.price_per_1k_input and llm.price_per_1k_output settings (0 when unset); prices are left out of the "
    "fingerprints, so markers hold the cost and the tokens, not the prices. The billed-time table below "
    "prices the same tokens at this report's llm_prices."
)


# ---- rejects -------------------------------------------------------------------------------------------


def reject_groups(data: RunData, abilities: Abilities, max_examples: int) -> list[RejectGroup]:
    """Every reject reason of every step with its count and a few examples; the CLIP check's drops are the
    scored images selection did not keep (lowest scores first)."""
    groups: list[RejectGroup] = []

    def add(stage: str, rows: Sequence[tuple[str, str, str, str]]) -> None:
        by_reason: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
        for reason, item_id, text, detail in rows:
            by_reason[reason].append((item_id, text, detail))
        for reason, items in sorted(by_reason.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            groups.append(RejectGroup(stage, reason, len(items), items[:max_examples]))

    for step in ("keywords", "prompts", "dialogues", "export"):
        add(
            step,
            [
                (
                    str(row.get("reason", "?")),
                    str(row.get("id", "?")),
                    _with_ability(row.get("ability"), short_text(row.get("text"), 240)),
                    short_text(row.get("detail"), 240),
                )
                for row in data.rejects[step]
            ],
        )
    add(
        "generate",
        [
            (
                str(row.get("reason", "?")),
                str(row.get("id", "?")),
                _with_ability(
                    abilities.of_record(str(row.get("id"))), _prompt_text(data, str(row.get("id")))
                ),
                "",
            )
            for row in data.rejects["generate"]
        ],
    )
    select = first_marker(data.markers, "select") or {}
    kept_scores = [r.scores[key] for r in data.selected.values() if (key := _score_key(select)) in r.scores]
    gamma = selection_cut(select, kept_scores)
    failed = sorted(
        (r for r in data.scored if r.id not in data.selected),
        key=lambda r: (r.scores.get(_score_key(select), 0.0), r.id),
    )
    rows = []
    for rec in failed:
        score = rec.scores.get(_score_key(select))
        reason = "CLIP score not above gamma" if gamma is not None else "not selected"
        detail = "" if score is None else f"score {score:.4f}"
        if score is not None and gamma is not None:
            detail += f", gamma {gamma:.4g}"
        rows.append(
            (reason, rec.id, _with_ability(abilities.of_record(rec.id), _prompt_text(data, rec.id)), detail)
        )
    add("CLIP check", rows)
    # Stages that counted rejects without writing rows (the CLIP scorer's unreadable images): counts only.
    shown = {g.stage for g in groups}
    for marker in data.markers:
        name = str(marker.get("stage"))
        if name in ("clip_score",) and marker.get("rejects") and name not in shown:
            for reason, count in marker["rejects"].items():
                ids = (marker.get("reject_examples") or {}).get(reason) or []
                groups.append(
                    RejectGroup(name, str(reason), int(count), [(str(i), "", "") for i in ids][:max_examples])
                )
    return groups


def _score_key(select: Mapping[str, Any]) -> str:
    return str(select.get("score_key") or (select.get("settings") or {}).get("score_key") or "clip")


def _with_ability(ability: Any, text: str) -> str:
    return f"[{ability}] {text}".strip() if ability else text


def _prompt_text(data: RunData, record_id: str) -> str:
    record = data.prompts.get(record_id) or data.prompts.get(_source_id(record_id))
    if record is None:
        return ""
    return str(record.provenance.get("raw_prompt") or record.caption)


# ---- samples ---------------------------------------------------------------------------------------------


def _round_robin(queues: Sequence[Sequence[Sample]]) -> list[Sample]:
    """The first of each queue, then the second of each, ..."""
    longest = max((len(q) for q in queues), default=0)
    return [q[i] for i in range(longest) for q in queues if i < len(q)]


def pick_samples(samples: Sequence[Sample], data: RunData, abilities: Abilities, limit: int) -> list[Sample]:
    """Up to `limit` samples: the kinds in turn (several images or turns first), abilities in turn within
    a kind, so that every kind and ability shows up before any repeats."""
    queues: dict[str, dict[str, list[Sample]]] = defaultdict(lambda: defaultdict(list))
    for sample in samples:
        dialogue = data.dialogues.get(sample.id) or {}
        several = "multi_image" if len(sample.images) > 1 else "?"
        sample.kind = str(dialogue.get("kind") or sample.kind or several)
        sample.ability = abilities.of_sample(sample)
        queues[sample.kind][sample.ability].append(sample)
    kinds = sorted(queues, key=lambda k: (_KIND_ORDER.index(k) if k in _KIND_ORDER else len(_KIND_ORDER), k))
    per_kind = [_round_robin([queues[k][a] for a in sorted(queues[k])]) for k in kinds]
    return _round_robin(per_kind)[:limit]


def _turn_html(speaker: str, text: str, first_image: int, n_images: int) -> tuple[str, int]:
    """One turn, each `<image>` token a badge naming the image it stands for (tokens count across the
    turns: an interleaved dialogue's later turns bring later images); and the tokens it held."""
    pieces = text.split(IMAGE_TOKEN)
    out = [html.escape(pieces[0])]
    for offset, piece in enumerate(pieces[1:]):
        number = first_image + offset
        label = f"image {number}" if number <= n_images else f"image {number}: no such image"
        out.append(f"<span class='token'>{html.escape(label)}</span>{html.escape(piece)}")
    body = "".join(out).strip().replace("\n", "<br>")
    cls = speaker if speaker in ("human", "gpt") else "note"
    return f"<div class='turn {cls}'><span class='who'>{html.escape(speaker)}</span> {body}</div>", len(
        pieces
    ) - 1


def dialogue_html(turns: Sequence[tuple[str, str]], n_images: int) -> str:
    """The turns of a dialogue; the k-th `<image>` token, in whichever turn, is shown as "image k"."""
    out, tokens = [], 0
    for speaker, text in turns:
        turn, held = _turn_html(speaker, text, tokens + 1, n_images)
        out.append(turn)
        tokens += held
    return f"<div class='dialogue'>{''.join(out)}</div>"


def sample_html(
    sample: Sample, data: RunData, abilities: Abilities, config: StableLLaVAReportConfig
) -> tuple[str, int]:
    """A card: the sample's images side by side (each with its prompt and score), then the dialogue."""
    figures, shown = [], 0
    for index, path in enumerate(sample.images, start=1):
        record = abilities.record_of_image(path)
        uri = (
            record.image_uri
            if record is not None and record.image_uri
            else resolve_image(path, data.data_root)
        )
        prompt = _prompt_text(data, record.id) if record is not None else ""
        image, ok = image_html(uri, config.thumbnail_size, prompt or path, sample.id)
        shown += ok
        score = record.scores.get(config.score_key) if record is not None else None
        score_txt = f" · {html.escape(config.score_key)} {score:.3f}" if score is not None else ""
        rid = html.escape(record.id if record is not None else path)
        figures.append(
            f"<figure>{image}<figcaption><span class='token'>image {index}</span> <span class='id'>{rid}"
            f"{score_txt}</span><br><span class='prompt'>{html.escape(prompt or 'prompt not found')}</span>"
            "</figcaption></figure>"
        )
    if not figures:
        figures.append("<div class='missing'>text only</div>")

    meta = " · ".join(
        html.escape(part)
        for part in (sample.kind, sample.ability, f"{len(sample.images)} image(s)", sample.file)
    )
    doc = (
        f"<div class='sample'><div class='meta'><code>{html.escape(sample.id)}</code> {meta}</div>"
        f"<div class='images'>{''.join(figures)}</div>{dialogue_html(sample.turns, len(sample.images))}</div>"
    )
    return doc, shown


# ---- the page --------------------------------------------------------------------------------------------


def _template_llm(markers: Sequence[dict[str, Any]]) -> bool:
    return any(
        isinstance(m.get("llm"), Mapping) and m["llm"].get("backend") == "template"
        for m in markers
        if m.get("stage") in _LLM_STAGES
    )


def header_html(data: RunData, config: StableLLaVAReportConfig) -> str:
    models = model_lines(data.markers)
    for name in _LLM_STAGES:
        marker = data.by_stage.get(name)
        if marker is not None:
            models.append(f"LLM ({name.removeprefix('stablellava_')}): {_llm_name(marker)}")
    export = data.markers[-1]
    items = [
        ("pipeline", html.escape(config.pipeline)),
        ("preset", html.escape(preset_text(config.preset))),
        ("written", html.escape(written_at())),
        ("data root", f"<code>{html.escape(data.data_root or '-')}</code>"),
        ("models", "<br>".join(html.escape(m) for m in models) or "-"),
        (
            "export fingerprint",
            f"<code class='fingerprint'>{html.escape(str(export.get('fingerprint', '-'))[:16])}</code>",
        ),
    ]
    notes = []
    if random_test_models(data.markers):
        notes.append(
            "<strong>Random-weight test models:</strong> images are noise and CLIP scores meaningless."
        )
    if _template_llm(data.markers):
        notes.append(
            "<strong>Offline template LLM:</strong> keywords, prompts and dialogues come from fixed "
            "templates, not from a language model."
        )
    return "".join(banner_html(note) for note in notes) + header_rows_html(items)


def _funnel(data: RunData, names: Sequence[str]) -> str:
    return (
        f"{len(names)} abilities: {sum(map(len, data.banks.values())):,} keywords -> "
        f"{len(data.prompts):,} prompts -> {len({r.id for r in data.generated}):,} images -> "
        f"{len(data.selected):,} passed the CLIP check; "
        f"{len(data.dialogues):,} dialogues -> {len(data.samples):,} samples exported"
    )


_STYLE = (
    BASE_STYLE
    + """
table.abilities td,table.llm td{text-align:right}table.abilities td.bad{color:#a5281b;font-weight:bold}
table.abilities tr.total td,table.llm tr.total td{font-weight:bold;background:#f7f7f7}
table.llm td.text{text-align:left}
.samples{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:14px}
.sample{border:1px solid #ccc;padding:8px;background:#fafafa}
.sample .meta{font-size:12px;color:#555;margin-bottom:6px}
.sample .images{display:flex;gap:8px;flex-wrap:wrap}.sample figure{width:%(size)dpx}
.sample figure img{width:100%%}
.prompt{font-family:monospace;font-size:11px;color:#333}
.turn{font-size:13px;margin:4px 0;padding:4px 6px;border-radius:4px}.turn.human{background:#eef3fb}
.turn.gpt{background:#f1f8ee}.turn.note{background:#fff8e1;font-size:12px}.who{font-weight:bold;color:#555}
.token{display:inline-block;background:#3b75c4;color:#fff;border-radius:3px;padding:0 4px;font-size:11px;
margin:0 3px}
"""
)


def render_html(config: StableLLaVAReportConfig, data: RunData) -> tuple[str, int]:
    """The report document and the number of images it shows."""
    abilities = Abilities(data)
    table, names = ability_table(data, abilities)
    select = first_marker(data.markers, "select") or {}
    score_key = config.score_key
    kept = [r.scores[score_key] for r in data.selected.values() if score_key in r.scores]
    everything = [r.scores[score_key] for r in data.scored if score_key in r.scores]
    cut = selection_cut(select, kept)
    hist = compute_histogram(kept, everything, config.histogram_bins)
    devices = stage_devices(data.markers, data.generated)
    cards = [
        sample_html(s, data, abilities, config)
        for s in pick_samples(data.samples, data, abilities, config.max_samples)
    ]
    llm = llm_table(data.markers)
    if "<table" in llm:
        llm += f"<p class='cost'>{html.escape(_LLM_NOTE)}</p>"
    groups = reject_groups(data, abilities, config.max_reject_examples)
    rejects = (
        rejects_table_html(groups) if groups else "<p class='none'>Nothing was rejected at any step.</p>"
    )
    doc = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(config.pipeline)} report</title>"
        f"<style>{_STYLE % {'size': config.thumbnail_size}}</style></head><body>"
        f"<h1>{html.escape(config.pipeline)} report</h1>{header_html(data, config)}"
        f"<p class='summary'>{html.escape(_funnel(data, names))}</p>"
        f"<p class='cost'>{html.escape(cost_line(data.markers, config.gpu_hour_usd, devices))}</p>"
        f"<h2>Per ability, through every step</h2>{table}"
        f"<h2>Stages</h2>{stages_table_html(data.markers, devices)}"
        f"<h2>LLM requests, tokens and cost</h2>{llm}"
        f"<h2>Cost: billed time</h2>{cost_table_html(data.markers, config, devices)}"
        "<h2>CLIP check</h2><p>grey: every scored image, blue: passed; red dashed line: gamma, the "
        f"threshold an image's {html.escape(score_key)} score must pass (v2 §4.4).</p>"
        f"{histogram_svg(hist, score_key, cut, 'gamma')}"
        f"<h2>Rejects by reason</h2>{rejects}"
        f"<h2>Samples</h2><p>{len(cards)} of {len(data.samples)} exported samples, every dialogue kind and "
        "ability in turn; each image with the prompt it was painted from, blue tags where each image's "
        f"&lt;image&gt; token stands.</p><div class='samples'>{''.join(card for card, _ in cards)}</div>"
        "</body></html>\n"
    )
    return doc, sum(n for _, n in cards)


# ---- the stage -------------------------------------------------------------------------------------------


def _process(config: StableLLaVAReportConfig, run: StageRun) -> StageStats:
    stats = StageStats(stage="stablellava_report")
    data = read_run(run.inputs)
    stats.count_in = len(data.samples)
    doc, n_images = render_html(config, data)
    storage.write_text(run.output, doc, content_type="text/html; charset=utf-8")
    stats.count_out = n_images
    log.info("stablellava report with %d images", n_images)
    return stats


# Every setting changes the HTML.
STABLELLAVA_REPORT = Stage(name="stablellava_report", process=_process)


def write_stablellava_report(
    config: StableLLaVAReportConfig,
    *,
    keywords: str,
    prompts: str,
    dialogues: str,
    generated: Sequence[str],
    scored: Sequence[str],
    selected: str,
    exported: str,
    output_uri: str,
) -> str:
    """Write the StableLLaVA report of a run; returns the versioned report (a copy is published at
    `output_uri`). Every argument is a stage output with its done marker: the keywords JSON, the prompt
    manifest, the dialogues JSONL, the generate and CLIP score shard manifests, the selected manifest and
    the export's main output (the other export files are read from its folder)."""
    inputs: dict[str, Any] = {
        "keywords": keywords,
        "prompts": prompts,
        "dialogues": dialogues,
        "generated": list(generated),
        "scored": list(scored),
        "selected": selected,
        "exported": exported,
    }
    for uri in (keywords, prompts, dialogues, *generated, *scored, selected, exported):
        require_done(uri)
    return run_stage(STABLELLAVA_REPORT, config, inputs, output_uri)
