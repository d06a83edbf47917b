"""A tiny, randomly initialised LLaVA-NeXT-Video model and its processor, built fully offline.

    model, processor = build_tiny_llava_next_video(seed=0)
    inputs = processor(text=processor.apply_chat_template(conversation(prompt), add_generation_prompt=True),
                       videos=frames, return_tensors="pt")          # frames: (T, H, W, 3) uint8
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)

Vision: CLIP, 2 layers, hidden 32, 56x56 input, patch 14 -> 16 patches -> 4 tokens per frame after the 2x2 pool.
Text: Llama, 2 layers, hidden 64, 4 query / 2 KV heads (GQA). Tokenizer: byte-level BPE trained in place.
Attention is "eager" so attention weights can be read. Same classes, chat format and token expansion as
llava-hf/LLaVA-NeXT-Video-7B-hf; only the sizes and weights differ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextImageProcessor,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    LlavaNextVideoVideoProcessor,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<video>", "<image>"]
IMAGE_SIZE = 56
PATCH_SIZE = 14

# "USER: <video>\n{text} ASSISTANT:" for one user turn, like the 7B-hf checkpoint's template: role in capitals,
# then the image / video placeholders (one per item, each followed by a newline), then the text items + " ".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'video' %}{{ '<video>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_CORPUS = [
    "USER: ASSISTANT: Question: Options: Answer with the option's letter from the given choices directly.",
    "Only give the best option. Best option: (A) (B) (C) (D) (E) A. B. C. D. E.",
    "What colour is the large shape on the left when the counter in the top-left corner shows",
    "Small shapes flash one at a time on the right side of the video. Which of these appeared first?",
    "How many times did a flash? How did the large shape change between the moment it showed from a to a",
    "red green blue yellow magenta cyan white circle square triangle diamond cross 0 1 2 3 4 5 6 7 8 9",
    "The best answer is The correct answer is the video shows a person who is doing something in the scene.",
]
# the synthetic set's answer words (and the tally words of count replies), weighted so that each becomes one token
# (" red", " 3"): a word split into pieces shared with other words ("re"+"d", "g"+"re"+"en") is a needless hurdle
# for a small language model
_WORDS = ("red green blue yellow magenta cyan white circle square triangle diamond cross 0 1 2 3 4 5 6 7 8 9 "
          "one two three four five A B C D E").split()


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on a small built-in corpus, with <video>/<image> as special tokens; the synthetic
    set's colours, shapes, digits and option letters are single tokens (with a leading space)."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(_CORPUS * 4 + [" ".join(" " + w for w in _WORDS)] * 40, trainer=trainer)
    bos = tk.token_to_id("<s>")
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"video_token": "<video>", "image_token": "<image>"},
    )


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None,
                    image_size: int = IMAGE_SIZE) -> LlavaNextVideoProcessor:
    """Official processor classes at image_size x image_size, 56 by default (CLIP mean/std, bicubic resize +
    centre crop); 336 is the real 7B-hf checkpoint's."""
    tokenizer = tokenizer or build_tokenizer()
    size, crop = {"shortest_edge": image_size}, {"height": image_size, "width": image_size}
    video_processor = LlavaNextVideoVideoProcessor(size=size, crop_size=crop)
    image_processor = LlavaNextImageProcessor(size=size, crop_size=crop, image_grid_pinpoints=[[image_size, image_size]])
    return LlavaNextVideoProcessor(
        video_processor=video_processor,
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
    )


@dataclass(frozen=True)
class ModelSize:
    """Widths and depths of the two towers (the rest of the config is fixed)."""

    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    vision_intermediate: int | None = None  # None: 2 x hidden
    text_intermediate: int | None = None
    image_size: int = IMAGE_SIZE


TINY = ModelSize()  # tests: random weights, a fraction of a second per forward
SMALL = ModelSize(vision_hidden=64, vision_layers=3, vision_heads=4, text_hidden=128, text_layers=4)  # trained
# The geometry of llava-hf/LLaVA-NeXT-Video-7B-hf: CLIP ViT-L/14 at 336 px (1024 wide, 24 layers, 16 heads, MLP
# 4096) and a Vicuna-7B language model (4096 wide, 32 layers, 32 heads, no GQA, MLP 11008); 144 tokens per frame
# after the 2x2 pool. The vocabulary stays the small synthetic one (an embedding table, not a compute cost).
SEVEN_B = ModelSize(vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096,
                    text_hidden=4096, text_layers=32, text_heads=32, text_kv_heads=32, text_intermediate=11008,
                    image_size=336)


def build_config(tokenizer: PreTrainedTokenizerFast, size: ModelSize = TINY) -> LlavaNextVideoConfig:
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden, intermediate_size=size.vision_intermediate or 2 * size.vision_hidden,
        num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
        image_size=size.image_size, patch_size=PATCH_SIZE,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size.text_hidden,
        intermediate_size=size.text_intermediate or 2 * size.text_hidden,
        num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaNextVideoConfig(
        vision_config=vision,
        text_config=text,
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=[[size.image_size, size.image_size]],
        spatial_pool_mode="average",
        spatial_pool_stride=2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        attn_implementation="eager",
    )


def build_tiny_llava_next_video(
    seed: int = 0, save_dir: str | os.PathLike | None = None, size: ModelSize = TINY
) -> tuple[LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor]:
    """Random tiny model + processor (eval mode, eager attention); saved to `save_dir` when given."""
    processor = build_processor(image_size=size.image_size)
    config = build_config(processor.tokenizer, size)
    torch.manual_seed(seed)
    model = LlavaNextVideoForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    if save_dir is not None:
        model.save_pretrained(save_dir)
        processor.save_pretrained(save_dir)
    return model, processor


def load_tiny_llava_next_video(path: str | os.PathLike) -> tuple[LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor]:
    """Load a saved tiny model + processor from disk (offline), eager attention, eval mode."""
    model = LlavaNextVideoForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    return model, LlavaNextVideoProcessor.from_pretrained(path)


def tokens_per_frame(processor: LlavaNextVideoProcessor) -> int:
    """Video tokens one frame expands to (the processor's formula: patches per side squared over 4)."""
    crop = processor.video_processor.crop_size
    return (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size) // 4
