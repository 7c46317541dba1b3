"""Tiny random vision-language models, built offline: the VLM twins of the tiny diffusion models.

``align-gen:tiny-random-llava``, ``align-gen:tiny-random-qwen2-vl``,
``align-gen:tiny-random-qwen2.5-vl`` and ``align-gen:tiny-random-idefics3`` are real transformers
architectures (``LlavaForConditionalGeneration`` with a CLIP vision tower and a Llama language
model; ``Qwen2VLForConditionalGeneration`` with its own vision transformer and M-RoPE;
``Qwen2_5_VLForConditionalGeneration``, the same with window attention in the vision
transformer; ``Idefics3ForConditionalGeneration``, SmolVLM's architecture: a SigLIP-style vision
transformer, a pixel-shuffle connector and a Llama language model) at a few tens of thousands of
parameters, with their real processors and a chat template, so every VLM code path runs on a CPU
in seconds. Their tokenizer is a word-level vocabulary built here from the words of the shapes
world (colours, shapes, a few question words) plus each family's special tokens: a small
vocabulary (about 40 tokens) keeps a random model's chance of naming a colour high enough for the
toy learning tasks. Unknown words map to ``<unk>``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from align_gen.builtins import register_builtin

# The words of the tiny world's questions and answers (lower-cased by the tokenizer).
TINY_WORDS = (
    "user assistant what colour color is the shape image picture this it of a an and "
    "red green blue yellow purple orange white black circle square triangle big small . , ?"
).split()
TINY_IMAGE_SIZE = 32
# The vision towers' and language models' sizes shared by the tiny families.
TINY_VISION_SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def llama_config(vocab: dict[str, int], bos: str, eos: str, **sizes):
    """A ``LlamaConfig`` for ``vocab``: by default the 2-layer Llama of width 32 that the tiny
    LLaVA and Idefics3 share; ``sizes`` overrides its fields (``hidden_size``,
    ``num_hidden_layers``, ...; the world's captioner is larger)."""
    from transformers import LlamaConfig

    fields = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        **sizes,
    }
    return LlamaConfig(
        vocab_size=len(vocab),
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab[bos],
        eos_token_id=vocab[eos],
        **fields,
    )


def word_level_tokenizer(special_tokens: list[str], template: str, eos: str, words: Sequence[str] = TINY_WORDS):
    """A ``PreTrainedTokenizerFast`` over ``special_tokens`` (the first two ``<pad>``, ``<unk>``)
    + ``words`` (whitespace and punctuation split, lower-cased), padding on the left for
    generation."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(dict.fromkeys([*special_tokens, *words]))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token=eos,
        additional_special_tokens=[token for token in special_tokens[2:] if token != eos],
        chat_template=template,
        padding_side="left",
    )


def chat_template(turn_start: str, turn_end: str, image: str, assistant: str) -> str:
    """A minimal Jinja chat template: ``turn_start + role`` ... ``turn_end`` per message, the
    image placeholder where an image part is, and the assistant's turn on request."""
    return (
        "{% for message in messages %}" + turn_start + "{{ message['role'] }} "
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image + "{% elif part['type'] == "
        "'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}" + turn_end + "{% endfor %}"
        "{% if add_generation_prompt %}" + assistant + "{% endif %}"
    )


def word_level_llava(vision_config, image_processor, *, words: Sequence[str] = TINY_WORDS, vision_feature_layer: int = -1,
                     seed: int = 0, **text_sizes):
    """(model, processor): a ``LlavaForConditionalGeneration`` with a CLIP vision tower of
    ``vision_config`` (randomly initialised), the LLaVA projector and a Llama of
    :func:`llama_config` (``text_sizes`` override its fields), with a word-level tokenizer over
    ``words``, the chat template ``<s>user <image>question</s><s>assistant `` and
    ``image_processor``. Every patch token but CLIP's class token is an image token."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    special = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    template = chat_template("<s>", "</s>", "<image>", "<s>assistant ")
    tokenizer = word_level_tokenizer(special, template, eos="</s>", words=words)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default",
        chat_template=template,
        num_additional_image_tokens=1,  # CLIP's class token, which "default" drops
    )
    vocab = tokenizer.get_vocab()
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=llama_config(vocab, bos="<s>", eos="</s>", **text_sizes),
        image_token_index=vocab["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=vision_feature_layer,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval(), processor


@register_builtin("tiny-random-llava", "vlm")
def build_tiny_random_llava(seed: int = 0):
    """(model, processor): a LLaVA with a 2-layer CLIP vision tower (32 px, 8 px patches) and a
    2-layer Llama of width 32."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    side = TINY_IMAGE_SIZE
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    vision_config = CLIPVisionConfig(**TINY_VISION_SIZES, image_size=side, patch_size=8)
    return word_level_llava(vision_config, image_processor, seed=seed)


def _tiny_qwen_vl_processor(processor_class):
    """A Qwen2-VL-style processor (``processor_class``: ``Qwen2VLProcessor`` or
    ``Qwen2_5_VLProcessor``, which share the image and video processors): 32 px images cut into
    4 px patches merged 2x2, so 16 image tokens."""
    from transformers import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    vision_tokens = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    special = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", *vision_tokens]
    template = chat_template(
        "<|im_start|>", "<|im_end|>", "<|vision_start|><|image_pad|><|vision_end|>", "<|im_start|>assistant "
    )
    tokenizer = word_level_tokenizer(special, template, eos="<|im_end|>")
    pixels = TINY_IMAGE_SIZE * TINY_IMAGE_SIZE
    sizes = {"min_pixels": pixels, "max_pixels": pixels, "patch_size": 4, "merge_size": 2, "temporal_patch_size": 2}
    return processor_class(
        image_processor=Qwen2VLImageProcessor(**sizes),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**sizes),
        chat_template=template,
    )


def _tiny_qwen_vl_config_fields(vocab: dict[str, int]) -> dict:
    """The fields Qwen2-VL and Qwen2.5-VL configs share: a 2-layer language model of width 32
    with M-RoPE, and the vision token ids of ``vocab``."""
    return {
        "text_config": {
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "rope_scaling": {"type": "mrope", "mrope_section": [4, 2, 2]},  # sums to head_dim / 2
            "pad_token_id": vocab["<pad>"],
            "bos_token_id": vocab["<|im_start|>"],
            "eos_token_id": vocab["<|im_end|>"],
        },
        "image_token_id": vocab["<|image_pad|>"],
        "video_token_id": vocab["<|video_pad|>"],
        "vision_start_token_id": vocab["<|vision_start|>"],
        "vision_end_token_id": vocab["<|vision_end|>"],
    }


@register_builtin("tiny-random-qwen2-vl", "vlm")
def build_tiny_random_qwen2_vl(seed: int = 0):
    """(model, processor): a Qwen2-VL with a 2-layer vision transformer (32 px, 4 px patches,
    2x2 merge: 16 image tokens) and a 2-layer language model of width 32 with M-RoPE."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    processor = _tiny_qwen_vl_processor(Qwen2VLProcessor)
    config = Qwen2VLConfig(
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_chans": 3,
        },
        **_tiny_qwen_vl_config_fields(processor.tokenizer.get_vocab()),
    )
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config).eval(), processor


@register_builtin("tiny-random-qwen2.5-vl", "vlm")
def build_tiny_random_qwen2_5_vl(seed: int = 0):
    """(model, processor): a Qwen2.5-VL with the Qwen2-VL twin's processor and language model and
    a 2-layer vision transformer whose first block attends within 16 px windows (2x2 merged
    tokens, so 4 windows per image) and whose second attends to the whole image."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
    )

    processor = _tiny_qwen_vl_processor(Qwen2_5_VLProcessor)
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 16,  # pixels: 16 / patch 4 / merge 2 = 2x2 merged tokens per window
            "fullatt_block_indexes": [1],
            "out_hidden_size": 32,  # the language model's width
        },
        **_tiny_qwen_vl_config_fields(processor.tokenizer.get_vocab()),
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval(), processor


@register_builtin("tiny-random-idefics3", "vlm")
def build_tiny_random_idefics3(seed: int = 0):
    """(model, processor): an Idefics3 (SmolVLM's architecture) with a 2-layer vision transformer
    (32 px, 8 px patches: 16 patches, pixel-shuffled by 2 into 4 image tokens) and a 2-layer
    Llama of width 32; images are resized to one 32 px square, never split into sub-images."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        Idefics3VisionConfig,
    )

    # The processor expands <image> to <fake_token_around_image><global-img><image>...<fake_token_around_image>.
    image_tokens = ["<fake_token_around_image>", "<global-img>", "<image>"]
    special = ["<pad>", "<unk>", "<|im_start|>", "<end_of_utterance>", *image_tokens]
    template = chat_template("<|im_start|>", "<end_of_utterance>", "<image>", "<|im_start|>assistant ")
    tokenizer = word_level_tokenizer(special, template, eos="<end_of_utterance>")
    side, patch, scale_factor = TINY_IMAGE_SIZE, 8, 2
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=False, size={"longest_edge": side}, max_image_size={"longest_edge": side}
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(side // patch) ** 2 // scale_factor**2,
        chat_template=template,
    )
    vocab = tokenizer.get_vocab()
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(**TINY_VISION_SIZES, image_size=side, patch_size=patch),
        text_config=llama_config(vocab, bos="<|im_start|>", eos="<end_of_utterance>"),
        image_token_id=vocab["<image>"],
        scale_factor=scale_factor,
        pad_token_id=vocab["<pad>"],
    )
    torch.manual_seed(seed)
    return Idefics3ForConditionalGeneration(config).eval(), processor
