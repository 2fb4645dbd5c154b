import torch
from transformers import CLIPVisionConfig, LlamaConfig

from synthvlm.train.model import (
    EMBEDDING_MULTIPLE,
    build_llava,
    build_tiny_llava,
    count_parameters,
    llava_config,
    num_image_tokens,
    save_tiny_parts,
    set_trainable,
    trainable_parameter_names,
)


def test_tiny_llava_uses_the_tokenizers_image_token_and_llava_1_5_settings():
    model, processor = build_tiny_llava()
    tokenizer = processor.tokenizer
    assert model.config.image_token_index == tokenizer.convert_tokens_to_ids("<image>")
    assert tokenizer.added_tokens_decoder[model.config.image_token_index].special
    assert (
        tokenizer("a<image>b", add_special_tokens=False)["input_ids"].count(model.config.image_token_index)
        == 1
    )
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    assert model.config.projector_hidden_act == "gelu"
    vocab = model.config.text_config.vocab_size
    assert vocab % EMBEDDING_MULTIPLE == 0 and len(tokenizer) <= vocab
    projector = model.model.multi_modal_projector
    assert [type(m).__name__ for m in projector.children()] == ["Linear", "GELUActivation", "Linear"]
    same, _ = build_tiny_llava()
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), same.state_dict().values(), strict=True)
    )


def test_clip_l14_336_gives_576_image_tokens():
    vision = CLIPVisionConfig(
        image_size=336, patch_size=14, hidden_size=8, num_hidden_layers=1, num_attention_heads=1
    )
    config = llava_config(vision, LlamaConfig(hidden_size=8, num_attention_heads=1), image_token_id=32000)
    assert num_image_tokens(config) == 576 == config.image_seq_length


def test_set_trainable_per_stage():
    model, _ = build_tiny_llava()
    set_trainable(model, "pretrain")
    names = trainable_parameter_names(model)
    assert names and all(n.startswith("model.multi_modal_projector.") for n in names)
    set_trainable(model, "sft")
    names = set(trainable_parameter_names(model))
    assert any(n.startswith("model.language_model.") for n in names) and "lm_head.weight" in names
    assert not any(n.startswith("model.vision_tower.") for n in names)
    trainable, total = count_parameters(model)
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    assert trainable == total - vision


def test_build_from_a_clip_vision_model_and_a_causal_lm(tmp_path):
    vision_dir, llm_dir = save_tiny_parts(str(tmp_path))
    model, processor = build_llava(vision_dir, llm_dir)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.image_token_index == image_id
    assert model.config.text_config.vocab_size == EMBEDDING_MULTIPLE * -(
        -len(processor.tokenizer) // EMBEDDING_MULTIPLE
    )
    assert not any(p.is_meta for p in model.parameters())
    from transformers import CLIPVisionModel, LlamaForCausalLM

    llm = LlamaForCausalLM.from_pretrained(llm_dir)
    vision = CLIPVisionModel.from_pretrained(vision_dir)
    layer = model.model.language_model.layers[0].mlp.up_proj.weight
    assert torch.equal(layer, llm.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(
        model.model.vision_tower.embeddings.patch_embedding.weight, vision.embeddings.patch_embedding.weight
    )
    from PIL import Image

    inputs = processor(
        images=[Image.new("RGB", (20, 40), "red")], text="USER: <image>\nHi ASSISTANT:", return_tensors="pt"
    )
    assert (inputs["input_ids"] == image_id).sum() == 16
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
