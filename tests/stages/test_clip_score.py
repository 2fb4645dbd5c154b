from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synthvlm import storage
from synthvlm.config import validate
from synthvlm.embeddings import embeddings_uri, read_embeddings
from synthvlm.errors import ConfigError
from synthvlm.models.clip import TINY_CLIP, load_clip
from synthvlm.records import Record, read_manifest, write_manifest
from synthvlm.scoring import (
    ScoreConfig,
    TensorScorer,
    apply_form,
    clip_scores,
    cosine_batch,
    encode_texts,
    tensor_transform,
)
from synthvlm.stage import is_done, read_stats
from synthvlm.stages import clip_score
from synthvlm.stages.clip_score import score
from tests.published import published


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_clip():
    return load_clip(TINY_CLIP, None, "cpu", torch.float32)


def red_square() -> Image.Image:
    img = Image.new("RGB", (64, 64), (240, 240, 240))
    img.paste((220, 20, 20), (16, 16, 48, 48))
    return img


def noise_image(seed: int, size: tuple[int, int] = (48, 80)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def direct_cosine(model, preprocess, tokenizer, image: Image.Image, text: str) -> float:
    """The reference: open_clip's encoders, normalised embeddings, dot product."""
    with torch.no_grad():
        image_features = model.encode_image(preprocess(image)[None])
        text_features = model.encode_text(tokenizer([text]))
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return float((image_features @ text_features.T).item())


def tiny_config(**overrides) -> ScoreConfig:
    return ScoreConfig(
        **{"model": TINY_CLIP, "pretrained": None, "device": "cpu", "batch_size": 2, **overrides}
    )


def test_clip_scores_equal_direct_open_clip_computation(tiny_clip) -> None:
    model, preprocess, tokenizer = tiny_clip
    images = [red_square(), red_square(), noise_image(1)]
    texts = ["a red square on a white background", "a dog running on a beach", "colourful noise"]

    ours = clip_scores(model, preprocess, tokenizer, images, texts, batch_size=2)

    expected = [
        direct_cosine(model, preprocess, tokenizer, img, txt) for img, txt in zip(images, texts, strict=True)
    ]
    assert ours == pytest.approx(expected, abs=1e-5)
    # The matching and the non-matching caption of the same image score differently.
    assert abs(ours[0] - ours[1]) > 1e-4
    assert all(-1.0 <= value <= 1.0 for value in ours)


def test_clip_scores_do_not_depend_on_batch_size(tiny_clip) -> None:
    model, preprocess, tokenizer = tiny_clip
    images = [noise_image(seed) for seed in range(5)]
    texts = [f"picture number {i}" for i in range(5)]
    one_by_one = clip_scores(model, preprocess, tokenizer, images, texts, batch_size=1)
    all_at_once = clip_scores(model, preprocess, tokenizer, images, texts, batch_size=5)
    assert one_by_one == pytest.approx(all_at_once, abs=1e-5)


def test_clipscore_form_is_hessel_rescaling(tiny_clip) -> None:
    model, preprocess, tokenizer = tiny_clip
    images, texts = [red_square(), noise_image(2)], ["a red square", "static"]
    cosines = clip_scores(model, preprocess, tokenizer, images, texts)
    scaled = clip_scores(model, preprocess, tokenizer, images, texts, form="clipscore")
    assert scaled == pytest.approx([2.5 * max(c, 0.0) for c in cosines], abs=1e-6)
    assert apply_form(-0.3, "clipscore") == 0.0
    assert apply_form(0.3, "clipscore") == pytest.approx(0.75)
    assert apply_form(-0.3, "cosine") == -0.3


def test_clip_scores_need_one_text_per_image(tiny_clip) -> None:
    model, preprocess, tokenizer = tiny_clip
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        clip_scores(model, preprocess, tokenizer, [red_square(), red_square()], ["a red square"])


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        validate(ScoreConfig, {"batch_size": 0})
    with pytest.raises(ConfigError, match="form"):
        validate(ScoreConfig, {"form": "cosine-ish"})
    with pytest.raises(ConfigError, match="score_key"):
        validate(ScoreConfig, {"score_key": " "})


def write_images(root: Path) -> tuple[list[Record], dict[str, Image.Image]]:
    """Three good records, then one per reject reason."""
    images = {"a": red_square(), "b": noise_image(3), "c": noise_image(4, size=(30, 30))}
    records = []
    for rec_id, img in images.items():
        path = root / "images" / f"{rec_id}.png"
        storage.write_bytes(str(path), png_bytes(img))
        records.append(Record(id=rec_id, caption=f"caption of {rec_id}", image_uri=str(path), seed=1))
    truncated = root / "images" / "truncated.png"
    storage.write_bytes(str(truncated), png_bytes(noise_image(5))[:200])
    records += [
        Record(id="missing", caption="gone", image_uri=str(root / "images" / "missing.png")),
        Record(id="truncated", caption="cut short", image_uri=str(truncated)),
        Record(id="garbage", caption="not an image", image_uri=str(root / "manifest.jsonl")),
        Record(id="no_uri", caption="never generated"),
    ]
    return records, images


def test_score_writes_scores_and_reports_rejects(
    tmp_path: Path, tiny_clip, caplog: pytest.LogCaptureFixture
) -> None:
    records, images = write_images(tmp_path)
    records[0] = records[0].model_copy(update={"scores": {"llm": 0.9}, "provenance": {"steps": 60}})
    manifest = str(tmp_path / "manifest.jsonl")
    write_manifest(manifest, records)
    output = str(tmp_path / "scored.parquet")

    with caplog.at_level(logging.WARNING, logger="synthvlm.stages.clip_score"):
        returned = score(tiny_config(), manifest, output)
    assert published(returned, output)

    scored = read_manifest(output)
    assert [rec.id for rec in scored] == ["a", "b", "c"]
    model, preprocess, tokenizer = tiny_clip
    for rec in scored:
        expected = direct_cosine(model, preprocess, tokenizer, images[rec.id], rec.caption)
        assert rec.scores["clip"] == pytest.approx(expected, abs=1e-5)
        assert rec.provenance["clip_scorer"] == {
            "model": TINY_CLIP,
            "pretrained": None,
            "form": "cosine",
            "long_captions": "truncate",
            "dropped_tokens": 0,  # short captions: the text encoder saw every token
        }
    assert scored[0].scores["llm"] == 0.9  # earlier scores and provenance are kept
    assert scored[0].provenance["steps"] == 60

    stats = read_stats(output)
    assert stats["count_in"] == 7
    assert stats["count_out"] == 3
    assert stats["rejects"] == {"image missing": 1, "image not decodable": 2, "no image_uri": 1}
    assert stats["reject_examples"]["image not decodable"] == ["truncated", "garbage"]
    assert stats["mean_score"] == pytest.approx(sum(rec.scores["clip"] for rec in scored) / 3)
    for rec_id in ("missing", "truncated", "garbage", "no_uri"):
        assert rec_id in caplog.text


def test_score_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records, _ = write_images(tmp_path)
    manifest = str(tmp_path / "manifest.jsonl")
    write_manifest(manifest, records[:2])
    output = str(tmp_path / "scored.jsonl")
    first_path = score(tiny_config(), manifest, output)
    assert is_done(output) and published(first_path, output)
    first = Path(output).read_bytes()

    real_load_clip = clip_score.load_clip

    def fail(*args, **kwargs):
        raise AssertionError("a finished output must not be recomputed")

    monkeypatch.setattr(clip_score, "load_clip", fail)
    # Same settings (batch_size only groups the work): the finished version is reused.
    assert score(tiny_config(batch_size=1), manifest, output) == first_path
    assert Path(output).read_bytes() == first

    # A changed output-affecting setting computes a new version; the old one stays readable.
    monkeypatch.setattr(clip_score, "load_clip", real_load_clip)
    second_path = score(tiny_config(form="clipscore"), manifest, output)
    assert second_path != first_path and published(second_path, output)
    assert Path(first_path).read_bytes() == first and is_done(first_path)
    old = {rec.id: rec.scores["clip"] for rec in read_manifest(first_path)}
    for rec in read_manifest(second_path):
        assert rec.scores["clip"] == pytest.approx(2.5 * max(old[rec.id], 0.0), abs=1e-6)


def test_score_key_and_form_are_configurable(tmp_path: Path) -> None:
    records, _ = write_images(tmp_path)
    manifest = str(tmp_path / "manifest.jsonl")
    write_manifest(manifest, records[:3])
    cosine_out, scaled_out = str(tmp_path / "cos.jsonl"), str(tmp_path / "scaled.jsonl")
    score(tiny_config(), manifest, cosine_out)
    score(tiny_config(score_key="clip_raw", form="clipscore"), manifest, scaled_out)

    cosines = {rec.id: rec.scores["clip"] for rec in read_manifest(cosine_out)}
    for rec in read_manifest(scaled_out):
        assert "clip" not in rec.scores
        assert rec.scores["clip_raw"] == pytest.approx(2.5 * max(cosines[rec.id], 0.0), abs=1e-6)


def test_score_reads_images_from_gcs(gcs_emulator: str, tiny_clip) -> None:
    root = storage.join(gcs_emulator, "clip-score-test")
    image = red_square()
    image_uri = storage.join(root, "images", "g0.png")
    storage.write_bytes(image_uri, png_bytes(image))
    records = [
        Record(id="g0", caption="a red square", image_uri=image_uri),
        Record(id="g1", caption="lost", image_uri=storage.join(root, "images", "g1.png")),
    ]
    manifest = storage.join(root, "generated.jsonl")
    write_manifest(manifest, records)
    output = storage.join(root, "scored.jsonl")

    score(tiny_config(), manifest, output)

    (scored,) = read_manifest(output)
    assert scored.id == "g0"
    assert scored.scores["clip"] == pytest.approx(direct_cosine(*tiny_clip, image, "a red square"), abs=1e-5)
    assert read_stats(output)["rejects"] == {"image missing": 1}


def test_low_precision_scores_are_float32_and_close_to_full_precision(tiny_clip) -> None:
    model, preprocess, tokenizer = load_clip(TINY_CLIP, None, "cpu", torch.bfloat16)
    images, texts = [red_square(), noise_image(6)], ["a red square", "static"]
    pixels = torch.stack([preprocess(img) for img in images])

    cosines = cosine_batch(model, tokenizer, pixels, texts)

    assert cosines.dtype == torch.float32
    full = clip_scores(*tiny_clip, images, texts)
    assert cosines.tolist() == pytest.approx(full, abs=0.05)


def direct_image_embedding(model, preprocess, image: Image.Image) -> np.ndarray:
    with torch.no_grad():
        features = model.encode_image(preprocess(image)[None])[0]
    return (features / features.norm()).numpy()


def test_score_stores_image_embeddings_in_manifest_order(tmp_path: Path, tiny_clip) -> None:
    records, images = write_images(tmp_path)
    manifest = str(tmp_path / "manifest.jsonl")
    write_manifest(manifest, records)  # 3 good records among 4 rejects
    output = str(tmp_path / "scored.jsonl")
    score(tiny_config(), manifest, output)

    scored = read_manifest(output)
    embeddings = read_embeddings(output, len(scored))
    assert embeddings.shape == (3, 16) and embeddings.dtype == np.float16
    model, preprocess, _ = tiny_clip
    for rec, row in zip(scored, embeddings, strict=True):
        expected = direct_image_embedding(model, preprocess, images[rec.id])
        np.testing.assert_allclose(row.astype(np.float32), expected, atol=2e-3)


def test_embeddings_sidecar_can_be_turned_off(tmp_path: Path) -> None:
    records, _ = write_images(tmp_path)
    manifest = str(tmp_path / "manifest.jsonl")
    write_manifest(manifest, records[:1])
    output = str(tmp_path / "scored.jsonl")
    score(tiny_config(save_embeddings=False), manifest, output)
    assert is_done(output) and not storage.exists(embeddings_uri(output))


def test_tensor_scorer_matches_file_scoring(tiny_clip) -> None:
    model, preprocess, tokenizer = tiny_clip
    images = [red_square(), noise_image(7, size=(64, 48))]
    texts = ["a red square", "static noise"]
    # Tensors of exactly the 8-bit images, so only PIL vs tensor resizing differs.
    tensors = [torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1) for img in images]
    scorer = TensorScorer(tiny_config(form="clipscore"), torch.device("cpu"))
    for image, tensor, text in zip(images, tensors, texts, strict=True):
        (value,), embedding = scorer(tensor[None], [text])
        assert value == pytest.approx(
            clip_scores(model, preprocess, tokenizer, [image], [text], form="clipscore")[0], abs=0.02
        )
        np.testing.assert_allclose(embedding[0], direct_image_embedding(model, preprocess, image), atol=0.03)
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        scorer(torch.stack([tensors[0], tensors[0]]), ["one caption"])


def test_tensor_transform_keeps_resize_crop_normalise(tiny_clip) -> None:
    _, preprocess, _ = tiny_clip
    transform = tensor_transform(preprocess)
    assert [type(step).__name__ for step in transform.transforms] == ["Resize", "CenterCrop", "Normalize"]
    assert transform(torch.rand(2, 3, 40, 60)).shape == (2, 3, 32, 32)
    from torchvision import transforms

    with pytest.raises(ConfigError, match="no tensor equivalent"):
        tensor_transform(transforms.Compose([transforms.Grayscale(), transforms.ToTensor()]))


# 80 one-token words ("cat</w>"): 5 more than the 75 caption tokens a 77-token CLIP context holds.
LONG_PREFIX = " ".join(["cat"] * 80)


def test_truncate_cannot_tell_captions_apart_after_token_77_and_chunk_mean_can(tiny_clip) -> None:
    model, preprocess, tokenizer = tiny_clip
    images = [red_square(), red_square(), red_square()]
    texts = [f"{LONG_PREFIX} on a red sofa", f"{LONG_PREFIX} under a blue sky", "a red square"]
    truncated = clip_scores(model, preprocess, tokenizer, images, texts)
    assert truncated[0] == truncated[1]  # CLIP never saw where the two differ
    chunked = clip_scores(model, preprocess, tokenizer, images, texts, long_captions="chunk_mean")
    assert abs(chunked[0] - chunked[1]) > 1e-4
    assert chunked[2] == truncated[2]  # a caption that fits is one chunk: the same score


def test_encode_texts_counts_dropped_tokens_and_chunks(tiny_clip) -> None:
    model, _, tokenizer = tiny_clip
    texts = [LONG_PREFIX, "a red square", f"A red square. {LONG_PREFIX}."]
    truncated = encode_texts(model, tokenizer, texts)
    assert truncated.dropped_tokens == [5, 0, 10]  # 80 - 75; 0; 3 + 1 + 80 + 1 - 75
    assert truncated.chunks == [1, 1, 1]
    chunked = encode_texts(model, tokenizer, texts, "chunk_mean")
    assert chunked.dropped_tokens == [0, 0, 0]
    # sentences packed greedily, the long one split between words: "A red square. cat x71", "cat x9."
    assert chunked.chunks == [2, 1, 2]
    norms = chunked.features.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    # the mean of the chunks' normalised embeddings, renormalised
    pieces = encode_texts(model, tokenizer, [" ".join(["cat"] * 75), " ".join(["cat"] * 5)]).features
    expected = torch.nn.functional.normalize(pieces.mean(dim=0), dim=-1)
    assert torch.allclose(chunked.features[0], expected, atol=1e-6)


def test_score_stage_records_dropped_tokens_and_counts_them(tmp_path: Path) -> None:
    path = tmp_path / "images" / "a.png"
    storage.write_bytes(str(path), png_bytes(red_square()))
    records = [
        Record(id="long", caption=f"{LONG_PREFIX} on a red sofa", image_uri=str(path)),
        Record(id="short", caption="a red square", image_uri=str(path)),
    ]
    manifest = str(tmp_path / "manifest.jsonl")
    write_manifest(manifest, records)
    truncate_out = str(tmp_path / "truncate.jsonl")
    score(tiny_config(), manifest, truncate_out)
    by_id = {rec.id: rec for rec in read_manifest(truncate_out)}
    assert by_id["long"].provenance["clip_scorer"]["dropped_tokens"] == 9  # 80 + 4 - 75
    assert by_id["short"].provenance["clip_scorer"]["dropped_tokens"] == 0
    stats = read_stats(truncate_out)
    assert stats["records_with_dropped_tokens"] == {"clip_scorer": 1}
    assert stats["long_captions"] == "truncate"

    from synthvlm.stages.report import stages_table_html

    assert "records with dropped tokens (clip_scorer): 1" in stages_table_html([stats])

    chunk_out = str(tmp_path / "chunk.jsonl")
    score(tiny_config(long_captions="chunk_mean"), manifest, chunk_out)
    chunked = {rec.id: rec for rec in read_manifest(chunk_out)}
    assert chunked["long"].provenance["clip_scorer"] == {
        "model": TINY_CLIP,
        "pretrained": None,
        "form": "cosine",
        "long_captions": "chunk_mean",
        "dropped_tokens": 0,
        "chunks": 2,
    }
    assert chunked["long"].scores["clip"] != by_id["long"].scores["clip"]
    assert chunked["short"].scores["clip"] == by_id["short"].scores["clip"]
    assert read_stats(chunk_out)["records_with_dropped_tokens"] == {"clip_scorer": 0}
