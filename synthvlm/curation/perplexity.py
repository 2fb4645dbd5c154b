"""Caption perplexity under a causal language model (data-juicer's `perplexity_filter`, SynthVLM's recipe).

SynthVLM's caption recipe (issue 13, the data-juicer LLaVA caption recipe) drops captions whose perplexity
exceeds 5500: text a language model finds that surprising is broken, garbled or not a sentence at all.
data-juicer computes it with a KenLM 5-gram model trained on Wikipedia (`<lang>.arpa.bin` + a
SentencePiece model, downloaded from its own store). The `kenlm` package on PyPI (0.3.0) builds from C++
source and ships no model; a pretrained ARPA model would have to come from somewhere else. So the language
model here is a causal LM loaded through transformers (default GPT-2, any `AutoModelForCausalLM` works,
by hub id or local folder), which scores the same thing on the same scale, exp(mean negative
log-likelihood per token):

    perplexity(caption) = exp( -1/T * sum_t log p(token_t | BOS, token_1..t-1) )

over the caption's T tokens, each predicted from a beginning-of-text token (the tokenizer's BOS, else
its EOS, as GPT-2's `<|endoftext|>`) and the tokens before it. As with KenLM the value depends on the model
and its tokenizer: GPT-2's perplexities of normal English captions are a few tens to a few hundreds, and
the 5500 of the recipe keeps everything but gibberish, lists of codes and the like; calibrate
`max_perplexity` when you change the model. A caption longer than `max_tokens` is scored on its first
`max_tokens` tokens.

Batched and deterministic (eval mode, no sampling); captions are sorted by length into batches, so there is
little padding; padded positions are masked out of the mean.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from synthvlm.config import StageConfig

log = logging.getLogger(__name__)

PERPLEXITY_HIGH = "perplexity_high"
UNSCORED = "no_tokens"
# A random-weight 2-layer GPT-2 over UTF-8 bytes, built in code from a fixed seed (demo and offline runs; its
# perplexities are those of noise, about 257 for any text).
TINY_LM = "synthvlm-tiny-lm"
_TINY_SEED = 0


def is_builtin_lm(model: str) -> bool:
    return model == TINY_LM


class PerplexityConfig(StageConfig):
    """Perplexity filter: drop captions whose per-token perplexity under `model` is above the maximum."""

    # SynthVLM's caption recipe (issue 13: data-juicer perplexity_filter): on in `--preset paper`. Off by
    # default because it loads a language model (GPT-2) from the hub.
    enabled: bool = False
    # issue 13 / data-juicer's LLaVA caption recipe: max_ppl 5500 (there under a KenLM Wikipedia model; see
    # the module docstring on the scale under another model).
    max_perplexity: float = Field(5500.0, gt=0)
    # our choice: GPT-2 (124M), small and English like the captions; any causal LM (hub id or folder).
    model: str = "openai-community/gpt2"
    revision: str | None = None  # hub branch, tag or commit; resolved to a commit for the fingerprint
    max_tokens: int = Field(256, ge=1)  # our choice: captions are short; longer ones scored on a prefix
    batch_size: int = Field(64, ge=1)  # our choice: fits any GPU with GPT-2; raise for throughput
    device: Literal["auto", "cpu", "cuda"] = "auto"  # our choice: CUDA when present
    # "auto" = float32 (perplexities of rare captions are large exponents; bf16 would round them visibly)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"


class PerplexityScorer:
    """A causal LM loaded once; `perplexities(texts)` in batches."""

    def __init__(self, config: PerplexityConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from synthvlm.devices import resolve_device

        self.config = config
        self.device = resolve_device(config.device)
        dtype = torch.float32 if config.dtype == "auto" else getattr(torch, config.dtype)
        if is_builtin_lm(config.model):
            from transformers import GPT2Config, GPT2LMHeadModel

            self.tokenizer = None
            lm_config = GPT2Config(
                vocab_size=257, n_positions=config.max_tokens + 1, n_embd=32, n_layer=2, n_head=2
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_TINY_SEED)
                self.model = GPT2LMHeadModel(lm_config).to(dtype)
            self.model.to(self.device).eval()
            self.start = 256
            return
        log.info("loading perplexity LM %s (revision %s) on %s", config.model, config.revision, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model, revision=config.revision)
        self.model = AutoModelForCausalLM.from_pretrained(config.model, revision=config.revision, dtype=dtype)
        self.model.to(self.device).eval()
        start = self.tokenizer.bos_token_id
        if start is None:
            start = self.tokenizer.eos_token_id
        if start is None:
            raise ValueError(
                f"perplexity model {config.model}: its tokenizer has neither a BOS nor an EOS token"
            )
        self.start = int(start)

    def token_ids(self, text: str) -> list[int]:
        if self.tokenizer is None:  # the built-in byte-level model
            return list(text.encode("utf-8")[: self.config.max_tokens])
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return list(ids[: self.config.max_tokens])

    def perplexities(self, texts: Sequence[str]) -> list[float | None]:
        """Per-token perplexity of each text (None for a text with no tokens)."""
        import torch

        encoded = [self.token_ids(t) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: (len(encoded[i]), i))
        out: list[float | None] = [None] * len(texts)
        size = self.config.batch_size
        for start in range(0, len(order), size):
            batch = [i for i in order[start : start + size] if encoded[i]]
            if not batch:
                continue
            width = 1 + max(len(encoded[i]) for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                seq = [self.start, *encoded[i]]
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
            targets = ids[:, 1:]
            picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            valid = mask[:, 1:].to(picked.dtype)
            nll = -(picked * valid).sum(dim=1) / valid.sum(dim=1)
            for row, i in enumerate(batch):
                value = float(nll[row])
                out[i] = math.exp(value) if value < 700 else math.inf
        return out
