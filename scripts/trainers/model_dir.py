"""Build a local model folder that trainers load offline: the checkpoint's processor configs (the copies built
into qwen-vl-utils), a ``config.json`` naming the architecture, and a tiny byte-level BPE tokenizer trained here
with Qwen's special tokens and a Qwen-style chat template. No weights: trainers are run with ``load_model``
off, and only their preprocessing is exercised.

``python scripts/trainers/model_dir.py DIR --model qwen2.5-vl|qwen3-vl``
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent.parent / "src" / "qwen_vl_utils" / "dataset" / "models"

TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' or 'image' in c or 'image_url' in c %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' or 'video' in c %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_pad|>",
]
ARCH = {
    "qwen2.5-vl": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", 14),
    "qwen3-vl": ("qwen3_vl", "Qwen3VLForConditionalGeneration", 16),
}


def train_bpe(folder: Path, special: list, vocab_size: int, corpus: list) -> object:
    """A tiny byte-level BPE tokenizer with ``special`` tokens, trained on ``corpus`` in a second and saved as
    ``folder/tokenizer.json`` (the tests' tokenizers are made the same way)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return tok


def build(folder: Path, model: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in (MODELS / model).iterdir():
        shutil.copy(f, folder / f.name)
    corpus = ["What happens? It shows a scene. <0.5 seconds> compare frames. You are a helpful assistant."] * 20
    tok = train_bpe(folder, SPECIAL, 400, corpus)
    vocab = tok.get_vocab()
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "chat_template": TEMPLATE,
                "model_max_length": 1 << 20,
            }
        )
    )
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    model_type, arch, patch = ARCH[model]
    vision = {"patch_size": patch, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_chans": 3}
    config = {
        "architectures": [arch],
        "model_type": model_type,
        "image_token_id": vocab["<|image_pad|>"],
        "video_token_id": vocab["<|video_pad|>"],
        "vision_start_token_id": vocab["<|vision_start|>"],
        "vision_end_token_id": vocab["<|vision_end|>"],
        "vision_config": vision,
        "vocab_size": len(vocab),
        "torch_dtype": "float32",
    }
    if model == "qwen3-vl":
        config["text_config"] = {"model_type": "qwen3_vl_text", "vocab_size": len(vocab)}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--model", choices=sorted(ARCH), required=True)
    a = p.parse_args()
    print(build(a.dir, a.model))
