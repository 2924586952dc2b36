"""Training cost of QLoRA at the chapter's settings: seconds per optimizer step, tokens/s and peak memory.

The model is built by train.py's own `build_model` (4-bit NF4 with double quantisation, LoRA r=16 / alpha 64 on
c_attn, c_proj, w1, w2, activation checkpointing), so this measures the project's model + QLoRA cost; the loop is
a plain one (forward, backward, torch AdamW on the LoRA parameters every --gradient_accumulation_steps micro-batches),
without DeepSpeed. Batches are --per_device_train_batch_size sequences of --seq_len tokens whose last --label_len
tokens are labelled (the chapter's samples: about 870 tokens, 136 labelled), or real batches from --train_path.
Peak memory is torch.cuda.max_memory_allocated on a GPU and the process's peak RSS on the CPU. The last line printed
is one JSON object.

    python bench/bench_train.py                                    # CPU: a small random model, full vocabulary
    python bench/bench_train.py --real_shape --device cuda         # GPU: the 1.8B shape, random weights
    python bench/bench_train.py --real_shape --device cuda --train_path data/train.json   # real lengths
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from typing import Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import train  # noqa: E402
from utils import DataCollator, IGNORE_INDEX, QwenPromptDataSet, resolve_device, set_random_seed  # noqa: E402

REAL_SHAPE = {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 11008}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", type=str, default=None,
                       help="a checkpoint directory; by default a random model of the shape below is built (once) "
                            "under --cache_dir")
    model.add_argument("--cache_dir", type=str, default=os.path.join(ROOT, "bench"),
                       help="where random models are kept (as tiny_qwen_*/, which git ignores)")
    model.add_argument("--real_shape", action="store_true",
                       help="Qwen-1.8B's shape (2048 wide, 24 layers, 16 heads, intermediate 11008); for a GPU")
    model.add_argument("--hidden_size", type=int, default=512, help="random model width (without --real_shape)")
    model.add_argument("--num_hidden_layers", type=int, default=4, help="random model depth")
    model.add_argument("--num_attention_heads", type=int, default=8, help="random model heads")
    model.add_argument("--intermediate_size", type=int, default=2816, help="random model MLP size (twice its width)")
    model.add_argument("--device", type=str, default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    model.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                       help="as train.py: bf16 on a bf16 GPU, else fp32")
    model.add_argument("--quantization", choices=("nf4", "none"), default="nf4", help="as train.py")
    model.add_argument("--no_gradient_checkpointing", action="store_true",
                       help="turn off activation checkpointing (the chapter uses it)")
    model.add_argument("--full_logits", action="store_true",
                       help="compute the (B, T, vocab) logits as the chapter did, instead of the labelled rows only")
    model.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")

    lora = parser.add_argument_group("LoRA (train.py's flags and defaults)")
    lora.add_argument("--lora_dim", type=int, default=16, help="LoRA rank r")
    lora.add_argument("--lora_alpha", type=int, default=64, help="LoRA alpha")
    lora.add_argument("--lora_dropout", type=float, default=0.1, help="dropout on the LoRA input")

    work = parser.add_argument_group("workload")
    work.add_argument("--per_device_train_batch_size", type=int, default=2, help="micro-batch size")
    work.add_argument("--gradient_accumulation_steps", type=int, default=4, help="micro-batches per optimizer step")
    work.add_argument("--seq_len", type=int, default=2048,
                      help="tokens per synthetic sequence (the chapter's --max_len: the worst case)")
    work.add_argument("--label_len", type=int, default=136, help="labelled tokens at the end of each sequence")
    work.add_argument("--train_path", type=str, default="",
                      help="use real batches from this data_helper.py file instead of synthetic ones")
    work.add_argument("--max_len", type=int, default=2048, help="with --train_path: as train.py")
    work.add_argument("--max_src_len", type=int, default=1560, help="with --train_path: as train.py")
    work.add_argument("--warmup_steps", type=int, default=1, help="optimizer steps run before timing")
    work.add_argument("--steps", type=int, default=2, help="timed optimizer steps")
    work.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW learning rate")
    work.add_argument("--seed", type=int, default=1234, help="seed of the random model, data and LoRA init")
    args = parser.parse_args(argv)
    if args.real_shape:
        for key, value in REAL_SHAPE.items():
            setattr(args, key, value)
    if not 0 < args.label_len < args.seq_len:
        raise SystemExit(f"--label_len ({args.label_len}) must be positive and below --seq_len ({args.seq_len})")
    if min(args.per_device_train_batch_size, args.gradient_accumulation_steps, args.steps) < 1:
        raise SystemExit("--per_device_train_batch_size, --gradient_accumulation_steps and --steps must be positive")
    if args.train_path and not os.path.isfile(args.train_path):
        raise SystemExit(f"--train_path {args.train_path}: not found (run `python data_helper.py`)")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    set_random_seed(args.seed)
    device = resolve_device(args.device)
    precision = train.resolve_precision(args.precision, device)
    if args.model_name_or_path is None:
        args.model_name_or_path = random_model(args, precision)
    args.gradient_checkpointing = not args.no_gradient_checkpointing
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = train.build_model(args, precision, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    batches = micro_batches(args, device)

    step_seconds, losses, tokens = [], [], 0
    for step in range(args.warmup_steps + args.steps):
        sync(device)
        start = time.perf_counter()
        step_tokens = 0
        for _ in range(args.gradient_accumulation_steps):
            batch = next(batches)
            loss = model(**batch, use_cache=False, skip_logits=not args.full_logits).loss
            (loss / args.gradient_accumulation_steps).backward()
            losses.append(loss.item())
            step_tokens += batch["input_ids"].numel()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        seconds = time.perf_counter() - start
        timed = step >= args.warmup_steps
        if timed:
            step_seconds.append(seconds)
            tokens += step_tokens
        print(f"step {step + 1}/{args.warmup_steps + args.steps}{'' if timed else ' (warm-up)'} | "
              f"loss {losses[-1]:.3f} | {seconds:.2f} s | {step_tokens} tokens", flush=True)

    total = sum(step_seconds)
    per_step = total / len(step_seconds)
    micro = args.gradient_accumulation_steps
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of the process"
    c = model.config
    result = {
        "benchmark": "bench_train",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(device),
        "model": {"hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
                  "num_attention_heads": c.num_attention_heads, "intermediate_size": c.intermediate_size,
                  "vocab_size": c.vocab_size, "real_shape": args.real_shape,
                  "trainable_params": sum(p.numel() for p in params)},
        "settings": {"precision": precision, "quantization": args.quantization, "lora_dim": args.lora_dim,
                     "lora_alpha": args.lora_alpha, "gradient_checkpointing": args.gradient_checkpointing,
                     "micro_batch": args.per_device_train_batch_size, "gradient_accumulation_steps": micro,
                     "data": args.train_path or f"synthetic {args.seq_len} tokens, {args.label_len} labelled",
                     "timed_steps": args.steps, "warmup_steps": args.warmup_steps},
        "seconds_per_optimizer_step": round(per_step, 3),
        "seconds_per_micro_batch": round(per_step / micro, 3),
        "tokens_per_s": round(tokens / total, 1),
        "samples_per_s": round(args.per_device_train_batch_size * micro / per_step, 3),
        "peak_memory_gb": round(peak / 1e9, 3),
        "peak_memory_kind": kind,
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
    }
    print(json.dumps(result, ensure_ascii=False))
    return result


def random_model(args: argparse.Namespace, precision: str) -> str:
    """Build (once) a random-weight checkpoint of the requested shape under --cache_dir, with the full vocabulary."""
    from qwen1_8.make_tiny import make_tiny

    dtype = "bfloat16" if args.real_shape else "float32"  # 1.8B in bf16 is 3.7 GB on disk, as the real shards
    name = (f"tiny_qwen_h{args.hidden_size}_l{args.num_hidden_layers}_a{args.num_attention_heads}"
            f"_i{args.intermediate_size}_s{args.seed}_{dtype}")
    path = os.path.join(args.cache_dir, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        print(f"building a random model in {path}", flush=True)
        make_tiny(path, hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                  num_attention_heads=args.num_attention_heads, intermediate_size=args.intermediate_size,
                  dtype=dtype, seed=args.seed)
    return path


def micro_batches(args: argparse.Namespace, device: torch.device):
    """An endless stream of micro-batches: real ones from --train_path, or random tokens of --seq_len."""
    if args.train_path:
        tokenizer = train.load_tokenizer(args.model_name_or_path)
        dataset = QwenPromptDataSet(args.train_path, tokenizer, args.max_len, args.max_src_len, is_skip=True)
        collate = DataCollator(tokenizer)
        generator = torch.Generator().manual_seed(args.seed)
        while True:
            order = torch.randperm(len(dataset), generator=generator).tolist()
            for start in range(0, len(order) - args.per_device_train_batch_size + 1, args.per_device_train_batch_size):
                batch = collate([dataset[i] for i in order[start:start + args.per_device_train_batch_size]])
                yield {k: v.to(device) for k, v in batch.items()}
    generator = torch.Generator().manual_seed(args.seed)
    while True:
        input_ids = torch.randint(0, 151643, (args.per_device_train_batch_size, args.seq_len), generator=generator)
        labels = input_ids.clone()
        labels[:, :-args.label_len] = IGNORE_INDEX
        yield {"input_ids": input_ids.to(device), "labels": labels.to(device),
               "attention_mask": torch.ones_like(input_ids).to(device)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


if __name__ == "__main__":
    main()
