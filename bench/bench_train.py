"""Training cost of QLoRA at the chapter's settings: seconds per optimizer step, tokens/s and peak memory.

The model is built by train.py's own `build_model` (medextract.qlora: 4-bit NF4 with double quantisation, LoRA r=16
/ alpha 64 on c_attn, c_proj, w1, w2, activation checkpointing), so this measures the project's model + QLoRA cost;
the loop is a plain one (forward, backward, torch AdamW on the LoRA parameters every --gradient_accumulation_steps
micro-batches), without DeepSpeed. Batches are --per_device_train_batch_size sequences of --seq_len tokens whose
last --label_len tokens are labelled (the chapter's samples: about 870 tokens, 136 labelled), or real batches from
--train_path. Peak memory is torch.cuda.max_memory_allocated on a GPU and the process's peak RSS on the CPU. The last
line printed is one JSON object.

    python -m bench.bench_train                                    # CPU: a small random model, full vocabulary
    python -m bench.bench_train --real_shape --device cuda         # GPU: the 1.8B shape, random weights
    python -m bench.bench_train --real_shape --device cuda --train_path data/train.json   # real lengths
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
from typing import Sequence

import torch

from bench.common import add_model_args, apply_real_shape, machine_info, random_model, sync
from medextract.cli import add_lora_args
from medextract.errors import ConfigError
from medextract.qlora import QLoRASettings, build_model, resolve_precision
from medextract.training import model_inputs
from utils import (DataCollator, HelpFormatter, IGNORE_INDEX, QwenPromptDataSet, fail, load_tokenizer,
                   resolve_device, set_random_seed)

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    model = parser.add_argument_group("model")
    add_model_args(model, "model_name_or_path", num_hidden_layers=4)
    model.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                       help="as train.py: bf16 where the GPU or CPU computes it natively, else fp32")
    model.add_argument("--quantization", choices=("nf4", "none"), default="nf4", help="as train.py")
    model.add_argument("--no_gradient_checkpointing", action="store_true",
                       help="turn off activation checkpointing (the chapter uses it)")
    model.add_argument("--full_logits", action="store_true",
                       help="compute the (B, T, vocab) logits as the chapter did, instead of the labelled rows only")
    model.add_argument("--attention_mask", action="store_true",
                       help="pass the collator's attention mask (an explicit SDPA mask) instead of train.py's plain "
                            "causal attention; the same loss either way")

    add_lora_args(parser.add_argument_group("LoRA (train.py's flags and defaults)"))

    work = parser.add_argument_group("workload")
    work.add_argument("--per_device_train_batch_size", type=int, default=2, help="micro-batch size")
    work.add_argument("--gradient_accumulation_steps", type=int, default=4, help="micro-batches per optimizer step")
    work.add_argument("--seq_len", type=int, default=2048,
                      help="tokens per synthetic sequence (the chapter's --max_len: the worst case)")
    work.add_argument("--label_len", type=int, default=136, help="labelled tokens at the end of each sequence")
    work.add_argument("--train_path", type=str, default="",
                      help="real batches from this data_helper.py file; by default synthetic ones (--seq_len, "
                           "--label_len)")
    work.add_argument("--max_len", type=int, default=2048, help="with --train_path: as train.py")
    work.add_argument("--max_src_len", type=int, default=1560, help="with --train_path: as train.py")
    work.add_argument("--warmup_steps", type=int, default=1, help="optimizer steps run before timing")
    work.add_argument("--steps", type=int, default=2, help="timed optimizer steps")
    work.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW learning rate")
    work.add_argument("--seed", type=int, default=1234, help="seed of the random model, data and LoRA init")
    args = parser.parse_args(argv)
    apply_real_shape(args)
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
    device = resolve_device(args.device)
    try:
        precision = resolve_precision(args.precision, device)
    except ConfigError as e:
        fail("bench_train.py", e)
    if args.model_name_or_path is None:
        args.model_name_or_path = random_model(args)
    args.gradient_checkpointing = not args.no_gradient_checkpointing
    set_random_seed(args.seed)  # here, so the LoRA init and dropout do not depend on whether the model was just built
    settings = QLoRASettings(model_name_or_path=args.model_name_or_path, quantization=args.quantization,
                             gradient_checkpointing=args.gradient_checkpointing, lora_dim=args.lora_dim,
                             lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
    model = build_model(settings, precision, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    masters = cast_like_deepspeed(model, precision)
    optimizer = torch.optim.AdamW(masters or params, lr=args.learning_rate, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=0.1)
    batches = micro_batches(args, device)
    if device.type == "cuda":  # the training peak, not the load's (fp32 and bf16 copies briefly coexist there)
        torch.cuda.reset_peak_memory_stats(device)

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
        optimizer_step(optimizer, params, masters)
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
                     "timed_steps": args.steps, "warmup_steps": args.warmup_steps,
                     "full_logits": args.full_logits, "attention_mask": args.attention_mask},
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


def cast_like_deepspeed(model: torch.nn.Module, precision: str) -> list[torch.Tensor]:
    """In bf16, do to the model what train.py's DeepSpeed engine does in its bf16 mode: every floating parameter
    (prepare_model_for_kbit_training leaves the embedding, norms, lm_head and LoRA in fp32) becomes bf16, and the
    optimizer steps fp32 master copies of the trainable ones. Returns those masters ([] in fp32: step the params)."""
    if precision != "bf16":
        return []
    masters = []
    for param in model.parameters():
        if param.requires_grad:
            masters.append(param.detach().float().clone())
        if param.dtype in (torch.float32, torch.float16):
            param.data = param.data.to(torch.bfloat16)
    return masters


def optimizer_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], masters: list[torch.Tensor]) -> None:
    """One AdamW step. With fp32 masters (bf16), DeepSpeed's way: the gradients move to the masters, the masters are
    stepped, and the model's bf16 parameters are overwritten with them."""
    for master, param in zip(masters, params):
        master.grad, param.grad = param.grad.float(), None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for master, param in zip(masters, params):
        param.data.copy_(master.data)


def micro_batches(args: argparse.Namespace, device: torch.device):
    """An endless stream of micro-batches: real ones from --train_path, or random tokens of --seq_len."""
    if args.train_path:
        tokenizer = load_tokenizer(args.model_name_or_path)
        dataset = QwenPromptDataSet(args.train_path, tokenizer, args.max_len, args.max_src_len, is_skip=True)
        collate = DataCollator(tokenizer)
        generator = torch.Generator().manual_seed(args.seed)
        while True:
            order = torch.randperm(len(dataset), generator=generator).tolist()
            for start in range(0, len(order) - args.per_device_train_batch_size + 1, args.per_device_train_batch_size):
                batch = collate([dataset[i] for i in order[start:start + args.per_device_train_batch_size]])
                yield batch_inputs(batch, device, args.attention_mask)
    generator = torch.Generator().manual_seed(args.seed)
    while True:
        input_ids = torch.randint(0, 151643, (args.per_device_train_batch_size, args.seq_len), generator=generator)
        labels = input_ids.clone()
        labels[:, :-args.label_len] = IGNORE_INDEX
        yield batch_inputs({"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)},
                           device, args.attention_mask)


def batch_inputs(batch: dict, device: torch.device, attention_mask: bool) -> dict:
    """As train.py feeds the model (no mask: right padding under causal attention needs none), or with the mask."""
    return {k: v.to(device) for k, v in batch.items()} if attention_mask else model_inputs(batch, device)


if __name__ == "__main__":
    main()
