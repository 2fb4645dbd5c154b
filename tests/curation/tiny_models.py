"""Tiny random-weight models built from configs and saved to a folder (no hub): a causal LM for the
perplexity filter and BLIP ITM for the image-text matching filter."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "A red bicycle leaning against a white brick wall on a sunny afternoon.",
    "Two golden retrievers playing with a blue ball on a green lawn.",
    "A lighthouse on a rocky cliff at dusk, waves crashing below.",
    "A small boat on a calm lake at dawn.",
]


def tiny_causal_lm(folder: Path) -> str:
    """A 2-layer GPT-2 with a byte-level BPE tokenizer trained on a few captions."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_blip_itm(folder: Path) -> str:
    """BLIP ITM: 1-layer vision and text towers, 32x32 images, a word-piece vocabulary of the corpus."""
    import re

    import torch
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForImageTextRetrieval,
        BlipImageProcessor,
        BlipProcessor,
    )

    words = sorted({w for text in CORPUS for w in re.findall(r"\w+|[^\w\s]", text.lower())})
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), model_max_length=32)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "encoder_hidden_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37,
            "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 2,
            "sep_token_id": 3}  # fmt: skip
    vision = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=32, image_text_hidden_size=32)
    torch.manual_seed(0)
    BlipForImageTextRetrieval(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)
