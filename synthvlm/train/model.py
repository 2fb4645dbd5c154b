"""LLaVA-1.5 as transformers' `LlavaForConditionalGeneration`: built from a CLIP vision tower and an LLM, a
LLaVA checkpoint, or tiny random configs (tests).

Building from parts loads the CLIP vision model and the causal LM with their own `from_pretrained`,
creates the Llava shell on the meta device (no second copy of 7B weights) and moves the loaded modules
into it; only the `mlp2x_gelu` projector (transformers' two-layer `LlavaMultiModalProjector` with GELU)
is freshly initialised. `<image>` is added to the tokenizer as a special token and `image_token_index`
is its id; the embedding matrix is padded to a multiple of 64 (as llava-hf's checkpoints are).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaProcessor,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from synthvlm.train.conversation import IMAGE_TOKEN, VICUNA_SYSTEM

log = logging.getLogger(__name__)

EMBEDDING_MULTIPLE = 64  # llava-hf pads Vicuna's 32000 + <image> + <pad> to 32064; tensor-core friendly
TINY_SEED = 0  # our choice: any fixed seed; the same tiny weights in every process
_TINY_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built offline: every byte is a token (no merges), plus Llama's specials.

    Any text tokenizes, token boundaries do not depend on context (so tests can reason about them), and
    it adds `<s>` in front like Llama's tokenizer does. `<image>` is not added here (see add_image_token).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(_TINY_SPECIAL_TOKENS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def add_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add `<image>` as a special token (no-op when present), ensure a pad token; return `<image>`'s id."""
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        # LLaVA v1 conversation: pad with unk (Vicuna has no pad token).
        tokenizer.pad_token = tokenizer.unk_token
    return int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def num_image_tokens(config: LlavaConfig) -> int:
    """Placeholder tokens per image: one per patch (576 for CLIP-L/14 at 336 px), +1 with CLS ("full")."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if config.vision_feature_select_strategy == "full" else 0)


def image_processor_for(vision_config: CLIPVisionConfig, aspect_ratio: str = "pad") -> LlavaImageProcessor:
    """LLaVA-1.5 preprocessing: pad to a square with the mean colour ("pad"), resize, CLIP-normalise.

    LlavaImageProcessor's padding fills with tuple(int(255 * m) for m in image_mean), LLaVA's expand2square
    colour; "crop" is CLIP's own resize + centre crop (LLaVA v1 behaviour).
    """
    size = vision_config.image_size
    return LlavaImageProcessor(
        do_pad=aspect_ratio == "pad",
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
    )


def vicuna_chat_template(eos_token: str) -> str:
    """A Jinja chat template producing the vicuna_v1 text of conversation.py (for inference)."""
    return (
        "{{ '" + VICUNA_SYSTEM.replace("'", "\\'") + " ' }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ 'USER: ' }}{% else %}{{ 'ASSISTANT: ' }}{% endif %}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}{{ '<image>\\n' }}"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ ' ' }}{% else %}{{ '" + eos_token + "' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )


def make_processor(
    tokenizer: PreTrainedTokenizerBase, config: LlavaConfig, aspect_ratio: str = "pad"
) -> LlavaProcessor:
    return LlavaProcessor(
        image_processor=image_processor_for(config.vision_config, aspect_ratio),
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token; "default" drops it again
        image_token=IMAGE_TOKEN,
        chat_template=vicuna_chat_template(str(tokenizer.eos_token)),
    )


def llava_config(
    vision_config: CLIPVisionConfig,
    text_config: Any,
    image_token_id: int,
    *,
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
) -> LlavaConfig:
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        projector_hidden_act="gelu",  # mlp2x_gelu
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
    )
    config.image_seq_length = num_image_tokens(config)
    return config


def _tiny_configs(tokenizer: PreTrainedTokenizerBase) -> tuple[CLIPVisionConfig, LlamaConfig]:
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,  # 16 patches = 16 image tokens per image
    )
    vocab = -(-len(tokenizer) // EMBEDDING_MULTIPLE) * EMBEDDING_MULTIPLE
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return vision, text


def build_tiny_llava(
    seed: int = TINY_SEED,
    *,
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
    aspect_ratio: str = "pad",
    attn_implementation: str = "sdpa",
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A LLaVA with random weights from tiny configs (CLIP 2 layers, Llama 2 layers), no downloads."""
    tokenizer = tiny_tokenizer()
    image_token_id = add_image_token(tokenizer)
    vision, text = _tiny_configs(tokenizer)
    config = llava_config(
        vision,
        text,
        image_token_id,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    return model.eval(), make_processor(tokenizer, config, aspect_ratio)


def save_tiny_parts(folder: str, seed: int = TINY_SEED) -> tuple[str, str]:
    """Save a tiny CLIP vision model and a tiny Llama (+ tokenizer) as two pretrained folders.

    They exercise `build_llava`'s from-parts path offline, exactly as a hub CLIP + Vicuna would.
    Returns (vision_dir, llm_dir).
    """
    tokenizer = tiny_tokenizer()
    vision_cfg, text_cfg = _tiny_configs(tokenizer)
    text_cfg.vocab_size = len(tokenizer)  # as a released LLM: no <image>, no padding of the vocab
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vision = CLIPVisionModel(vision_cfg)
        llm = LlamaForCausalLM(text_cfg)
    vision_dir, llm_dir = f"{folder}/vision", f"{folder}/llm"
    vision.save_pretrained(vision_dir)
    llm.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    return vision_dir, llm_dir


def build_llava(
    vision_tower: str,
    llm: str,
    *,
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
    aspect_ratio: str = "pad",
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """LLaVA-1.5 from a CLIP vision tower and a causal LM (hub ids or folders) + a new mlp2x_gelu projector.

    Weights load straight onto `device` in `dtype`; the projector is created in float32 (it is trained).
    """
    device = torch.device(device)
    load_kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if device.type != "cpu":
        load_kwargs["device_map"] = {"": device}
    tokenizer = AutoTokenizer.from_pretrained(llm)
    image_token_id = add_image_token(tokenizer)
    vision = CLIPVisionModel.from_pretrained(vision_tower, **load_kwargs)
    language = AutoModelForCausalLM.from_pretrained(llm, **load_kwargs)
    language.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=EMBEDDING_MULTIPLE)
    config = llava_config(
        vision.config,
        language.config,
        image_token_id,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
    )
    config.text_config.pad_token_id = tokenizer.pad_token_id
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = language.model
    model.lm_head = language.lm_head
    with torch.device(device):
        model.model.multi_modal_projector = LlavaMultiModalProjector(config)
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta:  # a module of the shell that the parts did not replace
        raise RuntimeError(f"LLaVA assembly left parameters on the meta device: {meta[:5]}")
    log.info("built LLaVA from %s + %s (image token id %d)", vision_tower, llm, image_token_id)
    return model, make_processor(tokenizer, config, aspect_ratio)


def load_llava(
    path: str,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A saved LLaVA (our stage output, or e.g. llava-hf/llava-1.5-7b-hf) and its processor."""
    device = torch.device(device)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if device.type != "cpu":
        kwargs["device_map"] = {"": device}
    model = LlavaForConditionalGeneration.from_pretrained(path, **kwargs)
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


# ---------------------------------------------------------------- what trains


def set_trainable(model: LlavaForConditionalGeneration, stage: str) -> None:
    """Stage 1 (pretrain): only the projector. Stage 2 (sft): projector + LLM; vision tower frozen."""
    if stage not in ("pretrain", "sft"):
        raise ValueError(f"unknown training stage {stage!r}")
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if stage == "sft":
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)


def trainable_parameter_names(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def upcast_trainable(model: torch.nn.Module) -> None:
    """Keep trained weights in float32 (AdamW updates of 2e-5 vanish in bf16); frozen ones may stay bf16."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
