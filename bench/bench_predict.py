"""Extraction throughput: the chapter's way (one dialogue at a time, plain generate) against predict.py's batched
engine (medextract/engine.py: a row per answer in one in-place KV cache, shared-prefix prefill, continuous refill,
SDPA). With --constraint grounded (or schema) it measures instead what the answer grammar costs: free generation
against constrained generation, batch size by batch size, on the same model and prompts.

Every variant runs the same model on the same prompts and generates exactly --new_tokens tokens per dialogue
(min_new_tokens = max_new_tokens: random weights never emit <|im_end|>), greedy. Under the constraint the grammar's
masks are computed and applied at every step, but the answer is not closed at the budget (random weights would
otherwise write shorter answers), so both variants generate the same number of tokens (an answer that completes
the whole format first ends there; the JSON line gives each variant's count). The default, 64, is below the
~150 tokens of a real answer, to keep the chapter's way under 10 minutes on 2 CPU cores; since reading the prompt
costs nearly the same in every variant, a shorter count understates what batching gains on the real task. Variants
are interleaved round by round over the length-sorted samples, so a busy shared machine slows them alike. The last
line printed is one JSON object with the figures, the machine and "speedup" (best batched samples/s over the
chapter's samples/s).

    python data_helper.py                   # writes data/test.json
    python -m bench.bench_predict           # CPU: a random 10-layer, 512-wide model with the full vocabulary
    python -m bench.bench_predict --real_shape --device cuda --new_tokens 128 --batch_sizes 8 16 32   # GPU: 1.8B shape
    python -m bench.bench_predict --model_path output_dir_qlora/merged --device cuda --new_tokens 128
    python -m bench.bench_predict --constraint grounded --batch_sizes 16   # what the grammar costs
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import defaultdict
from typing import Sequence

import torch


from bench.common import ROOT, add_model_args, apply_real_shape, machine_info, random_model
from medextract.decoding import reference_config
from medextract.engine import Decoding, Engine, Request, stop_token_ids
from medextract.grammar import CONSTRAINTS, AnswerGrammar, build_vocabulary
from medextract.inference import Truncation, load_model, prompt_ids, read_examples, resolve_dtype
from utils import HelpFormatter, resolve_device, set_random_seed


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    model = parser.add_argument_group("model")
    add_model_args(model, "model_path", num_hidden_layers=10)
    model.add_argument("--dtype", type=str, default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                       help="auto = bf16 on a bf16 GPU, fp16 on other GPUs; on the CPU bf16 where it computes bf16 "
                            "natively, else fp32 (predict.py's --dtype auto)")
    model.add_argument("--compare_dtypes", type=str, nargs="+", default=None, choices=["bf16", "fp16", "fp32"],
                       help="run our batched way once per dtype, interleaved round by round (e.g. fp32 bf16); the "
                            "chapter's way runs in the first; replaces --dtype; by default only --dtype runs")

    work = parser.add_argument_group("workload")
    work.add_argument("--input_file", type=str, default=os.path.join(ROOT, "data", "test.json"),
                      help="test split (data_helper.py's JSON Lines)")
    work.add_argument("--num_samples", type=int, default=50, help="dialogues taken from the top of --input_file")
    work.add_argument("--new_tokens", type=int, default=64,
                      help="tokens generated per dialogue, in every variant (real answers are about 150)")
    work.add_argument("--batch_sizes", type=int, nargs="+", default=[4, 8, 16], help="batch sizes of the batched path")
    work.add_argument("--repetition_penalty", type=float, default=1.1,
                      help="penalty on tokens already in the prompt or answer, as predict.py's")
    work.add_argument("--max_len", type=int, default=2048, help="prompt truncation, as in training")
    work.add_argument("--max_src_len", type=int, default=1560, help="prompt truncation, as in training")
    work.add_argument("--seed", type=int, default=0, help="seed of the random model")
    work.add_argument("--stop_at_gold_length", action="store_true",
                      help="each answer is as long as its gold answer in --input_file (tokens, <|im_end|> included) "
                           "instead of --new_tokens: rows end at different steps, as real answers do")
    work.add_argument("--round_size", type=int, default=0,
                      help="samples per round (variants alternate round by round, so a busy machine slows them "
                           "alike); 0 = the lcm of --batch_sizes; the whole file lets rows refill across it")
    work.add_argument("--no_chapter", action="store_true",
                      help="leave out the chapter's one-at-a-time way (4 s a dialogue on an H100)")
    work.add_argument("--engine", choices=["auto", "eager", "graphs"], default="auto",
                      help="the engine's decoding step: auto = CUDA graphs on a GPU, eager elsewhere")
    work.add_argument("--constraint", choices=CONSTRAINTS, default="none",
                      help="none: the chapter's way against ours; grounded / schema: ours free against ours under "
                           "that answer grammar")
    args = parser.parse_args(argv)
    apply_real_shape(args)
    if not os.path.isfile(args.input_file):
        raise SystemExit(f"--input_file {args.input_file}: not found. Run `python data_helper.py` first (it splits "
                         f"data/all.json into data/train.json and data/test.json), or pass --input_file.")
    if args.num_samples < 1 or args.new_tokens < 1 or min(args.batch_sizes) < 1:
        raise SystemExit("--num_samples, --new_tokens and --batch_sizes must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    set_random_seed(args.seed)
    device = resolve_device(args.device)
    model_path = args.model_path or random_model(args)
    dtypes = args.compare_dtypes or [args.dtype]
    models = {}
    for name in dtypes:
        models[name], tokenizer = load_model(model_path, device, resolve_dtype(name, device))
    model = models[dtypes[0]]  # the chapter's way runs in the first dtype
    tag = {name: f" {name}" if args.compare_dtypes else "" for name in dtypes}

    examples = read_examples(args.input_file)[:args.num_samples]
    truncation = Truncation(args.max_len, args.max_src_len)
    prompts = {e.id: prompt_ids(tokenizer, e.user_text, truncation) for e in examples}
    dialogues = {e.id: e.user_text[e.instruction_chars:] for e in examples}
    decoding = Decoding(max_new_tokens=args.new_tokens, repetition_penalty=args.repetition_penalty,
                        min_new_tokens=args.new_tokens)
    decodings = {i: decoding for i in prompts}
    if args.stop_at_gold_length:
        decodings = {e.id: Decoding(max_new_tokens=gold_length(tokenizer, e), min_new_tokens=gold_length(tokenizer, e),
                                    repetition_penalty=args.repetition_penalty) for e in examples}
    graphs = {"auto": None, "eager": False, "graphs": True}[args.engine]
    vocabulary = build_vocabulary(tokenizer, model.config.vocab_size) if args.constraint != "none" else None
    for each in models.values():
        warm_up(each, tokenizer, list(prompts.values()))

    # Rounds of lcm(batch sizes) samples, longest prompts first, as the engine orders them.
    order = sorted(prompts, key=lambda i: (-len(prompts[i]), i))
    round_size = args.round_size or math.lcm(*args.batch_sizes)
    if args.constraint == "none":
        runs = [] if args.no_chapter else [(f"chapter{tag[dtypes[0]]} (batch 1)", None, None, dtypes[0])]
        runs += [(f"ours{tag[d]} (batch {b})", b, None, d) for b in args.batch_sizes for d in dtypes]
    else:
        runs = [run for b in args.batch_sizes for d in dtypes
                for run in ((f"free{tag[d]} (batch {b})", b, None, d),
                            (f"{args.constraint}{tag[d]} (batch {b})", b, args.constraint, d))]
    names = [name for name, _, _, _ in runs]
    seconds: dict[str, float] = defaultdict(float)
    outputs: dict[str, dict[int, tuple[str, int]]] = defaultdict(dict)
    # one engine per variant for the whole run: its cache (and on a GPU its CUDA graphs) is made once, in round 1,
    # which holds the longest prompts
    engines = {name: Engine(models[d], tokenizer, batch_size, vocabulary, cuda_graphs=graphs)
               for name, batch_size, _, d in runs if batch_size is not None}
    for start in range(0, len(order), round_size):
        ids = order[start:start + round_size]
        for name, batch_size, constraint, _ in runs:
            t0 = time.perf_counter()
            if batch_size is None:
                for i in ids:
                    outputs[name][i] = chapter_generate(model, tokenizer, prompts[i], decodings[i])
            else:
                requests = [Request(prompts[i], decodings[i], grammar_for(vocabulary, dialogues[i], constraint))
                            for i in ids]
                for k, result in engines[name].stream(requests):
                    outputs[name][ids[k]] = (result.text, len(result.tokens))
            seconds[name] += time.perf_counter() - t0
        print(f"round {start // round_size + 1}: {len(ids)} samples | "
              + " | ".join(f"{n} {seconds[n]:.1f} s" for n in names), flush=True)

    n = len(prompts)
    variants = []
    for name in names:
        new_tokens = sum(count for _, count in outputs[name].values())
        variant = {"name": name, "seconds": round(seconds[name], 2), "samples_per_s": round(n / seconds[name], 3),
                   "new_tokens": new_tokens, "new_tokens_per_s": round(new_tokens / seconds[name], 1)}
        if args.constraint == "none" and not args.no_chapter:
            same = sum(outputs[name][i] == outputs[names[0]][i] for i in prompts)
            variant["same_output_as_chapter"] = f"{same}/{n}"
        variants.append(variant)
        print(f"{name:>22}: {seconds[name]:7.1f} s | {n / seconds[name]:6.3f} samples/s | "
              f"{new_tokens / seconds[name]:7.1f} new tokens/s"
              + (f" | same output as the chapter's way {variant['same_output_as_chapter']}"
                 if "same_output_as_chapter" in variant else f" | {new_tokens} new tokens"))
    dtype_speedups = {}
    if args.compare_dtypes and len(dtypes) > 1:  # per batch size: each dtype against the first, ours against ours
        by_name = {v["name"]: v for v in variants}
        kind = "ours" if args.constraint == "none" else "free"
        for b in args.batch_sizes:
            first = by_name[f"{kind}{tag[dtypes[0]]} (batch {b})"]["samples_per_s"]
            for d in dtypes[1:]:
                ratio = by_name[f"{kind}{tag[d]} (batch {b})"]["samples_per_s"] / first
                dtype_speedups[f"{d}/{dtypes[0]} (batch {b})"] = round(ratio, 2)
                print(f"{d} against {dtypes[0]} at batch {b}: {ratio:.2f}x", flush=True)
    if args.constraint == "none" and not args.no_chapter:
        best = max(variants[1:], key=lambda v: v["samples_per_s"])
        speedup = best["samples_per_s"] / variants[0]["samples_per_s"]
        print(f"speedup: {speedup:.2f}x ({best['name']} against the chapter's way)")
    else:  # per batch size: constrained tokens/s over free tokens/s
        costs = {v["name"]: round(1 - c["new_tokens_per_s"] / v["new_tokens_per_s"], 4)
                 for v, c in zip(variants[::2], variants[1::2])}
        for name, cost in costs.items():
            print(f"the {args.constraint} grammar costs {100 * cost:.1f} % of {name}'s throughput")
    lengths = [len(p) for p in prompts.values()]
    result = {
        "benchmark": "bench_predict",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(device),
        "model": model_info(model, model_path),
        "settings": {"input_file": os.path.relpath(args.input_file, ROOT), "num_samples": n,
                     "new_tokens": args.new_tokens, "greedy": True, "repetition_penalty": args.repetition_penalty,
                     "constraint": args.constraint, "stop_at_gold_length": args.stop_at_gold_length,
                     "engine": args.engine, "round_size": round_size,
                     "dtype": [str(next(m.parameters()).dtype).replace("torch.", "") for m in models.values()]
                     if args.compare_dtypes else str(next(model.parameters()).dtype).replace("torch.", ""),
                     "prompt_tokens": {"min": min(lengths), "mean": round(sum(lengths) / n, 1), "max": max(lengths)}},
        "variants": variants,
    }
    if args.constraint != "none":
        result["constraint_cost"] = costs
    elif not args.no_chapter:
        result.update(best=best["name"], speedup=round(speedup, 2))
    if dtype_speedups:
        result["dtype_speedup"] = dtype_speedups
    print(json.dumps(result, ensure_ascii=False))
    return result


@torch.inference_mode()
def chapter_generate(model, tokenizer, ids: list[int], decoding: Decoding) -> tuple[str, int]:
    """The chapter's predict.py: one prompt, no padding, a plain generate() with transformers' own cache."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         generation_config=reference_config(tokenizer, decoding))
    new = out[0, len(ids):].tolist()
    stops = set(stop_token_ids(tokenizer))
    n_new = next((k + 1 for k, token in enumerate(new) if token in stops), len(new))
    return tokenizer.decode(new[:n_new], skip_special_tokens=True), n_new


def gold_length(tokenizer, example) -> int:
    """Tokens of the example's gold answer block after `assistant\\n` (its text and <|im_end|>)."""
    if not isinstance(example.output, str):
        raise SystemExit(f"--stop_at_gold_length: record {example.id + 1} of --input_file has no 'output'")
    return len(tokenizer.encode(example.output, allowed_special=set())) + 1


def grammar_for(vocabulary, dialogue: str, constraint: str | None):
    """The answer grammar's builder, or None; not closable, so that random weights write full-length answers."""
    if constraint is None:
        return None
    return lambda: AnswerGrammar.for_dialogue(vocabulary, dialogue, constraint)


def warm_up(model, tokenizer, prompts: list[list[int]]) -> None:
    """First calls pay for allocator growth and kernel selection; keep that out of every variant's time."""
    short = Decoding(max_new_tokens=2, min_new_tokens=2)
    chapter_generate(model, tokenizer, prompts[0][:64], short)
    Engine(model, tokenizer, 2).generate([Request(p[:64], short) for p in prompts[:2]])


def model_info(model, model_path: str) -> dict:
    c = model.config
    return {"path": os.path.relpath(model_path, ROOT) if os.path.abspath(model_path).startswith(ROOT) else model_path,
            "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads, "intermediate_size": c.intermediate_size,
            "vocab_size": c.vocab_size, "parameters": sum(p.numel() for p in model.parameters())}


if __name__ == "__main__":
    main()
