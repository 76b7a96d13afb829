"""A stand-in for ``llava-hf/llava-1.5-7b-hf`` with its real processor files and small random weights.

The Llama-2 SentencePiece-BPE vocabulary (32000 pieces) and merges (61249) come from the npm
package ``llama-tokenizer-js@1.2.2``, which ships them base64-encoded inside its JavaScript (its
``data-conversion.py`` says they were taken from LLaMA's ``tokenizer.json``: the vocabulary as
UTF-8 lines, each merge as two little-endian uint16 vocabulary ids, in priority order). ``.ci/run``
fetches the package into :data:`PACKAGE` (``npm pack``); the fixtures fail, never skip, without it.

The files are laid out as the checkpoint lays them out: ``tokenizer.json`` as transformers'
``LlamaConverter`` writes a fast Llama tokenizer (Prepend "▁" + Replace normaliser, ByteFallback
BPE, ``<s>`` template, the ▁-to-space decoder), ``<image>`` = 32000 and ``<pad>`` = 32001 added;
``tokenizer_config.json`` without a chat template (the template is the processor's, in
``chat_template.json``); a CLIP image processor at 336 px, bicubic, with CLIP's mean and std; a
config with a vocabulary of 32064 rows and 4096 positions. The weights are random and tiny, with
LLaVA-1.5's 32 decoder layers and 576 patches.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import tarfile
from pathlib import Path

import pytest
from transformers import AutoProcessor

from model.checkpoint import TinyLlavaSpec, build_model

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / ".cache" / "npm" / "llama-tokenizer-js-1.2.2.tgz"
FETCH = "npm pack llama-tokenizer-js@1.2.2 --pack-destination .cache/npm"
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
VOCAB_ROWS = 32064  # llava-1.5-7b-hf's embedding rows (32002 tokens, padded to a multiple of 64)

# llava-hf's processor chat template: the role, every image as "<image>\n", then each text + " ".
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def package_source() -> str:
    """The package's ``llama-tokenizer.js``; a test that needs it fails with the command to fetch it."""
    if not PACKAGE.is_file():
        pytest.fail(f"the Llama-2 vocabulary package is missing at {PACKAGE}: run `{FETCH}` in the "
                    "repository root (bash .ci/run does)", pytrace=False)
    with tarfile.open(PACKAGE) as archive:
        return archive.extractfile("package/llama-tokenizer.js").read().decode("utf-8")


def js_string(source: str, name: str) -> str:
    found = re.search(rf'const {name} = "([A-Za-z0-9+/=]+)"', source)
    if found is None:
        raise ValueError(f"{name} not found in llama-tokenizer.js")
    return found.group(1)


def vocabulary_and_merges() -> tuple[list[str], list[tuple[str, str]]]:
    """(the 32000 pieces in id order, the merges in priority order) decoded from the package."""
    source = package_source()
    pieces = base64.b64decode(js_string(source, "llama_vocab_base64")).decode("utf-8").split("\n")
    packed = base64.b64decode(js_string(source, "llama_merges_binary"))
    ids = struct.unpack(f"<{len(packed) // 2}H", packed)
    return pieces, [(pieces[a], pieces[b]) for a, b in zip(ids[::2], ids[1::2])]


def tokenizer_json(pieces: list[str], merges: list[tuple[str, str]]) -> dict:
    """``tokenizer.json`` as ``LlamaConverter`` writes it, with llava-hf's two added tokens."""
    special = [(0, "<unk>"), (1, "<s>"), (2, "</s>"), (len(pieces), IMAGE_TOKEN), (len(pieces) + 1, PAD_TOKEN)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in special],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {piece: i for i, piece in enumerate(pieces)},
                  "merges": [f"{a} {b}" for a, b in merges]},
    }


def write_processor_files(folder: Path) -> Path:
    """The checkpoint's tokenizer, image processor and chat template files in ``folder``."""
    pieces, merges = vocabulary_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(pieces, merges), ensure_ascii=False))
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True}
             for i, t in [(0, "<unk>"), (1, "<s>"), (2, "</s>"), (len(pieces), IMAGE_TOKEN),
                          (len(pieces) + 1, PAD_TOKEN)]}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added, "bos_token": "<s>",
        "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": False, "model_max_length": 1000000,
        "pad_token": PAD_TOKEN, "padding_side": "left", "processor_class": "LlavaProcessor",
        "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>"}, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "LlavaProcessor", "resample": 3,
        "rescale_factor": 1 / 255, "size": {"shortest_edge": 336}}, indent=2))
    (folder / "processor_config.json").write_text(json.dumps({
        "image_token": IMAGE_TOKEN, "num_additional_image_tokens": 1, "patch_size": 14,
        "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"}, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_HF_TEMPLATE}, indent=2))
    return folder


def build_standin(folder: Path, seed: int = 0) -> Path:
    """The stand-in checkpoint in ``folder``: the processor files above and random tiny weights."""
    import torch

    write_processor_files(folder)
    processor = AutoProcessor.from_pretrained(folder, backend="pil")
    torch.manual_seed(seed)
    build_model(TinyLlavaSpec(vocab_size=VOCAB_ROWS), processor).eval().save_pretrained(folder)
    return folder
