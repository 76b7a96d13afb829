"""Build LLaVA checkpoints the project can make without downloading anything.

A checkpoint here is an ordinary Hugging Face folder (config, safetensors, tokenizer, processor,
chat template) that stock ``LlavaForConditionalGeneration.from_pretrained`` and
``AutoProcessor.from_pretrained`` load with no project code. Tests build tiny random ones; the
trainer builds the shipped model with the same functions, so both go through one loading path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
    VideoLlavaImageProcessor,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:"), written as a chat template so
# `apply_chat_template` produces the prompt for our checkpoints and llava-hf's alike.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] in ['image', 'video'] %}<image>\n{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %} "
    "{% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

BASE_WORDS = (
    "USER ASSISTANT : ? ! . , what which where how many is are there the a an of in on to "
    "color colour shape object left right top bottom yes no"
).split()


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: whitespace + punctuation split, one id per known word."""
    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *BASE_WORDS, *words]:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )


def build_processor(words: list[str], image_size: int, patch_size: int) -> LlavaProcessor:
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(words),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


@dataclass
class TinyLlavaSpec:
    """Shape of a small LLaVA-1.5-like model (CLIP tower + Llama decoder).

    The defaults keep LLaVA-1.5's geometry (336 px, patch 14 -> 24x24 = 576 patches, 32 decoder
    layers, features at layer -2) with tiny widths, so budgets and stage layers mean the same as
    on the 7B model while a forward pass costs milliseconds.
    """

    image_size: int = 336
    patch_size: int = 14
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 4
    vision_mlp: int = 64
    text_hidden: int = 32
    text_layers: int = 32
    text_heads: int = 4
    text_kv_heads: int = 2
    text_mlp: int = 64
    rope_theta: float = 10000.0  # Llama's default; a 16-wide head has few slow rotary pairs at it
    text_norm_eps: float = 1e-6  # the decoder's RMSNorm epsilon (Llama's default; load_widened rescales it)
    words: list[str] = field(default_factory=lambda: "red green blue circle square triangle".split())
    vocab_size: int | None = None  # embedding rows; None: one per token (llava-hf pads 32002 tokens to 32064)

    def config(self, vocab_size: int, image_token_id: int, pad_token_id: int, bos_token_id: int = 2,
               eos_token_id: int = 3) -> LlavaConfig:
        vision = dict(
            model_type="clip_vision_model",
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_size=self.vision_hidden,
            intermediate_size=self.vision_mlp,
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads,
            projection_dim=self.vision_hidden,
        )
        text = dict(
            model_type="llama",
            vocab_size=vocab_size,
            hidden_size=self.text_hidden,
            intermediate_size=self.text_mlp,
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads,
            num_key_value_heads=self.text_kv_heads,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            rms_norm_eps=self.text_norm_eps,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
        )
        return LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=image_token_id,
            image_seq_length=(self.image_size // self.patch_size) ** 2,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            pad_token_id=pad_token_id,
        )


def build_model(spec: TinyLlavaSpec, processor: LlavaProcessor) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA whose vocabulary and special tokens match `processor`."""
    tok = processor.tokenizer
    config = spec.config(spec.vocab_size or len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id,
                         tok.bos_token_id, tok.eos_token_id)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def build_random_checkpoint(folder: str | Path, spec: TinyLlavaSpec | None = None, seed: int = 0) -> Path:
    """Save a randomly initialised LLaVA + processor as a standard HF folder and return its path."""
    spec = spec or TinyLlavaSpec()
    folder = Path(folder)
    processor = build_processor(spec.words, spec.image_size, spec.patch_size)
    torch.manual_seed(seed)
    model = build_model(spec, processor).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_random_video_llava(folder: str | Path, spec: TinyLlavaSpec | None = None, seed: int = 0) -> Path:
    """A randomly initialised Video-LLaVA (image + video towers, ``<image>`` and ``<video>`` tokens)
    saved with its tokenizer and image processor, as LanguageBind/Video-LLaVA-7B-hf is laid out."""
    spec = spec or TinyLlavaSpec(image_size=224)
    folder = Path(folder)
    tokenizer = build_tokenizer(spec.words)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<video>"]})
    llava = spec.config(len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id)
    config = VideoLlavaConfig(
        vision_config=llava.vision_config.to_dict(),
        text_config=llava.text_config.to_dict(),
        image_token_id=llava.image_token_id,
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_seq_length=llava.image_seq_length,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    save_random(VideoLlavaForConditionalGeneration, config, tokenizer, folder, seed)
    VideoLlavaImageProcessor(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size},
    ).save_pretrained(folder)
    return folder


def save_random(model_class, config, tokenizer, folder: Path, seed: int) -> None:
    """``model_class(config)`` with weights drawn from ``seed``, saved with ``tokenizer`` into
    ``folder``; generation stops and pads as the tokenizer says."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# Decoder weights that write into the residual stream (rows, or an embedding's columns, index it)
# or read units a wider decoder adds (attention heads, MLP units, projector units).
_WRITERS = ("embed_tokens.weight", "o_proj.weight", "down_proj.weight",
            "multi_modal_projector.linear_2.weight", "multi_modal_projector.linear_2.bias")


def store_half(folder: str | Path) -> None:
    """Rewrite the weights of the checkpoint in ``folder`` as float16, leaving its config's float32:
    a Hugging Face Space rejects a pushed file over 10 MB that Git LFS does not track, and the
    shipped model's float32 weights are 13.4 MB. ``from_pretrained`` casts them back to the
    config's float32 (the engine asks for float32 on the CPU anyway); the shipped model's answers
    did not change on the test split (EVAL.md)."""
    from safetensors.torch import load_file, save_file

    path = Path(folder) / "model.safetensors"
    weights = load_file(path)
    save_file({name: w.to(torch.float16).contiguous() if w.is_floating_point() else w for name, w in weights.items()},
              path, metadata={"format": "pt"})


def load_widened(source: LlavaForConditionalGeneration, target: LlavaForConditionalGeneration) -> None:
    """Load `source` into `target`, a LLaVA with the same tower whose decoder may be wider (hidden
    size, attention heads of the same width and grouping, MLP units), so that `target` computes
    what `source` does and the new units start learning from there.

    Every tensor of `source` fills the leading block of its `target` counterpart; the rest keeps
    `target`'s random draw, except where a new unit would change the function: the writers above
    are zero outside that block, so the new residual dimensions stay zero and new heads and MLP
    units add nothing until training moves them. RMS norms then divide by the root mean square
    over a wider vector with zeros in it, sqrt(old / new) times the old one, so their weights are
    scaled by that factor (the new dimensions get the old weights' mean: with a zero weight a
    new dimension could never leave zero), and their epsilon too, so that it adds to the old mean
    square what it added before."""
    old, new = source.config.text_config, target.config.text_config
    if old.head_dim != new.head_dim or (old.num_attention_heads // old.num_key_value_heads
                                        != new.num_attention_heads // new.num_key_value_heads):
        raise ValueError("a widened decoder keeps the head width and the query heads per key/value head")
    scale = (old.hidden_size / new.hidden_size) ** 0.5
    weights = source.state_dict()
    with torch.no_grad():
        for name, param in target.state_dict().items():
            value = weights[name]
            if any(a < b for a, b in zip(param.shape, value.shape)) or param.dim() != value.dim():
                raise ValueError(f"{name}: {tuple(value.shape)} does not fit in {tuple(param.shape)}")
            if name.endswith(_WRITERS):
                param.zero_()
            if name.startswith("model.language_model.") and name.endswith("norm.weight"):
                value = value * scale
                param.fill_(value.mean().item())
            param[tuple(slice(0, n) for n in value.shape)] = value
    new.rms_norm_eps = old.rms_norm_eps * scale**2
    for module in target.model.language_model.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = new.rms_norm_eps


# Qwen2.5-VL's chat turns (its checkpoints' template, written anew): the default system turn, the
# image as <|vision_start|><|image_pad|><|vision_end|> where it stands in the user's content.
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>", "<unk>"]
QWEN_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class TinyQwenSpec:
    """Shape of a small Qwen2.5-VL: its tower's geometry (patch 14, 2 x 2 merge, 112-px windows, the
    last block full attention), 28 decoder layers as the 7B model has, tiny widths."""

    vision_hidden: int = 32
    vision_depth: int = 4
    vision_heads: int = 2
    vision_mlp: int = 48
    text_hidden: int = 64
    text_layers: int = 28
    text_heads: int = 4
    text_kv_heads: int = 2
    text_mlp: int = 96
    mrope_section: tuple[int, int, int] = (2, 3, 3)  # halves of the 16-wide head: temporal, height, width
    # weights' std: at Qwen's 0.02 a tiny random model says one token whatever it sees, so tests of
    # its answers would compare nothing
    init_std: float = 0.3
    words: list[str] = field(default_factory=lambda: "system user assistant You are a helpful red green blue "
                             "circle square triangle".split())


def build_random_qwen(folder: str | Path, spec: TinyQwenSpec | None = None, seed: int = 0) -> Path:
    """A randomly initialised ``Qwen2_5_VLForConditionalGeneration`` saved with its tokenizer (chat
    template included) and ``Qwen2VLImageProcessorPil``, laid out as Qwen/Qwen2.5-VL-7B-Instruct."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    spec = spec or TinyQwenSpec()
    folder = Path(folder)
    vocab: dict[str, int] = {}
    for token in [*QWEN_SPECIAL_TOKENS, *BASE_WORDS, *spec.words]:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.add_special_tokens(QWEN_SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|endoftext|>", unk_token="<unk>",
                                        eos_token="<|im_end|>", extra_special_tokens={"image_token": "<|image_pad|>"})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=spec.text_hidden, intermediate_size=spec.text_mlp,
                         num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                         num_key_value_heads=spec.text_kv_heads, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": list(spec.mrope_section)},
                         pad_token_id=ids("<|endoftext|>"), bos_token_id=ids("<|endoftext|>"),
                         eos_token_id=ids("<|im_end|>"), initializer_range=spec.init_std),
        vision_config=dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden, intermediate_size=spec.vision_mlp,
                           num_heads=spec.vision_heads, out_hidden_size=spec.text_hidden,
                           fullatt_block_indexes=[spec.vision_depth // 2 - 1, spec.vision_depth - 1],
                           initializer_range=spec.init_std),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        initializer_range=spec.init_std,
    )
    save_random(Qwen2_5_VLForConditionalGeneration, config, tokenizer, folder, seed)
    Qwen2VLImageProcessorPil().save_pretrained(folder)
    return folder
