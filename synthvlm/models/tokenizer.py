"""A real CLIP BPE tokenizer for transformers, built offline from the vocabulary open_clip ships.

Tests and tiny models must not reach the model hub, yet the SDXL pipeline wants two
`transformers.CLIPTokenizer`s. open_clip bundles OpenAI's BPE merges (`bpe_simple_vocab_16e6.txt.gz`);
its `SimpleTokenizer` derives the 49408-token vocabulary from them. We write that vocabulary and the
merges in the Hugging Face layout (vocab.json + merges.txt) once, into a cache folder named after a
hash of the BPE file, so every process after the first only reads it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

CONTEXT_LENGTH = 77  # CLIP text context (open_clip DEFAULT_CONTEXT_LENGTH, SDXL tokenizers' model_max_length)
# open_clip names its special tokens differently; the ids (49406, 49407) are the same.
_SPECIAL_TOKEN_NAMES = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_LAYOUT_VERSION = "1"  # bump when the files written below change, so stale caches are not reused


def _bundled_bpe_path() -> Path:
    # find_spec locates the package without importing it (importing open_clip takes seconds).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("open_clip is not installed; it provides the CLIP BPE vocabulary")
    return Path(spec.origin).parent / _BPE_FILE


def _tokenizer_files() -> dict[str, str]:
    """File name -> content of a Hugging Face CLIP tokenizer folder with open_clip's ids."""
    from open_clip.tokenizer import SimpleTokenizer

    simple = SimpleTokenizer(str(_bundled_bpe_path()))
    vocab = {_SPECIAL_TOKEN_NAMES.get(token, token): idx for token, idx in simple.encoder.items()}
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.__getitem__)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CONTEXT_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{first} {second}\n" for first, second in merges),
        "tokenizer_config.json": json.dumps(config, indent=2),
    }


def _cache_root() -> Path:
    return Path(os.environ.get("SYNTHVLM_CACHE_DIR", Path(tempfile.gettempdir()) / "synthvlm-cache"))


@lru_cache(maxsize=1)
def offline_clip_tokenizer_dir() -> str:
    """Folder that `transformers.CLIPTokenizer.from_pretrained` loads without network access.

    Token ids equal open_clip's `SimpleTokenizer` ids. The folder is built once per hash of the bundled
    BPE file; concurrent builders each write a private folder and the first rename wins.
    """
    digest = hashlib.sha256(_LAYOUT_VERSION.encode() + b"\0" + _bundled_bpe_path().read_bytes())
    root = _cache_root()
    target = root / f"clip-tokenizer-{digest.hexdigest()[:16]}"
    if target.is_dir():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".clip-tokenizer-"))
    for name, content in _tokenizer_files().items():
        (staging / name).write_text(content, encoding="utf-8")
    try:
        staging.rename(target)
    except OSError:  # another process published the same content first
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)
