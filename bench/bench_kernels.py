"""Time, in fp32 and in bf16, the CPU work of a generation step that bf16's matrix units do not speed up (issue 28):
attention (the rotary embedding and scaled-dot-product attention, as QWenAttention calls them) at Qwen-1.8B's width,
over a prompt and for one decoding step against a filled cache; the cast of the logits to fp32 that decode_step does;
and the repetition penalty and the sampling step (greedy, and temperature / top-p) over the 151,936-token vocabulary,
as medextract/sampling.py runs them. The two dtypes alternate within each round, so a neighbour's load falls on both.

    python -m bench.bench_kernels
    python -m bench.bench_kernels --rounds 5 --batch_size 16 --cache_len 1024 --prompt_len 760

The penalty and the sampling run on fp32 logits whatever the model's dtype (decode_step casts them); their bf16 column
shows what leaving the logits in bf16 would cost, and `logits cast` what the cast costs. It prints a table, then the
result as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from bench.common import machine_info
from medextract.sampling import Sampler, sample
from qwen1_8.modeling_qwen import RotaryEmbedding, apply_rotary, row_attention_mask
from utils import HelpFormatter

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VOCAB = 151_936


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    shape = parser.add_argument_group("shape (Qwen-1.8B's by default)")
    shape.add_argument("--num_attention_heads", type=int, default=16, help="attention heads")
    shape.add_argument("--head_dim", type=int, default=128, help="channels per head (kv_channels)")
    shape.add_argument("--vocab_size", type=int, default=VOCAB, help="logits per row")
    work = parser.add_argument_group("workload")
    work.add_argument("--prompt_len", type=int, default=760, help="prompt tokens of the prefill attention (one row)")
    work.add_argument("--batch_size", type=int, default=16, help="rows of a decoding step")
    work.add_argument("--cache_len", type=int, default=1024, help="cache slots a decoding step's attention reads")
    work.add_argument("--seen_tokens", type=int, default=600,
                      help="distinct tokens per row that the repetition penalty weighs on (prompt and answer)")
    work.add_argument("--repetition_penalty", type=float, default=1.1,
                      help="divides the logit of a seen token (multiplies it if negative), as in predict.py")
    work.add_argument("--temperature", type=float, default=0.7, help="of the sampled step")
    work.add_argument("--top_p", type=float, default=0.8, help="of the sampled step")
    run = parser.add_argument_group("timing")
    run.add_argument("--rounds", type=int, default=3, help="rounds; each times every kernel in both dtypes")
    run.add_argument("--repeats", type=int, default=20, help="calls per kernel, dtype and round (after one warm-up)")
    run.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    run.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    return parser.parse_args(argv)


def kernels(args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """Each kernel as a call over inputs of `dtype` made here, the same values in both dtypes (seeded)."""
    g = torch.Generator().manual_seed(args.seed)
    H, D, T, B, S = args.num_attention_heads, args.head_dim, args.prompt_len, args.batch_size, args.cache_len
    rotary = RotaryEmbedding(D)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    # prefill: one row of T tokens, causal
    q, k, v = randn(1, T, H, D), randn(1, T, H, D), randn(1, T, H, D)  # (B, T, H, D)
    cos, sin = rotary(torch.arange(T)[None], [1.0])

    def prefill_attention():
        qr, kr = apply_rotary(q, cos, sin).transpose(1, 2), apply_rotary(k, cos, sin).transpose(1, 2)
        return F.scaled_dot_product_attention(qr, kr, v.transpose(1, 2), is_causal=True, scale=D ** -0.5)

    # one decoding step: B rows, each at its own position, against S cache slots
    positions = torch.randint(S // 2, S, (B,), generator=g)
    step_q, step_k = randn(B, 1, H, D), randn(B, 1, H, D)
    cache_k, cache_v = randn(B, H, S, D), randn(B, H, S, D)  # (B, H, S, D)
    step_cos, step_sin = (t[0, positions][:, None] for t in rotary(torch.arange(S)[None], [1.0]))
    mask = row_attention_mask(positions, S)

    def decode_attention():
        qr = apply_rotary(step_q, step_cos, step_sin).transpose(1, 2)
        cache_k[torch.arange(B), :, positions] = apply_rotary(step_k, step_cos, step_sin)[:, 0]
        return F.scaled_dot_product_attention(qr, cache_k, cache_v, attn_mask=mask, scale=D ** -0.5)

    logits = (torch.randn(B, args.vocab_size, generator=g) * 3).to(dtype)
    sampler = Sampler(B, args.vocab_size, stops=[], end_id=0, device=torch.device("cpu"), dense_penalty=False)
    decoding = SimpleNamespace(repetition_penalty=args.repetition_penalty)
    rows = [SimpleNamespace(request=SimpleNamespace(decoding=decoding),
                            seen=torch.randperm(args.vocab_size, generator=g)[:args.seen_tokens]) for _ in range(B)]
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(B)]

    def penalty():  # in place, as the engine does; 1.1^(rounds * repeats) stays far inside both dtypes' range
        sampler._penalise(logits, rows)

    def greedy():
        return logits.argmax(dim=-1).tolist()

    def sampled():
        return [sample(logits[i], args.temperature, args.top_p, generators[i]) for i in range(B)]

    return {"attention, prefill": prefill_attention, "attention, decoding step": decode_attention,
            "logits cast to fp32": lambda: logits.float(), "repetition penalty": penalty, "greedy choice": greedy,
            "top-p sampling": sampled}


def time_calls(call: Callable[[], object], repeats: int) -> float:
    """Seconds per call, over `repeats` calls after one warm-up."""
    call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = {name: kernels(args, dtype) for name, dtype in DTYPES.items()}
    times: dict[str, dict[str, list[float]]] = {k: {d: [] for d in DTYPES} for k in work["fp32"]}
    with torch.no_grad():
        for round_ in range(args.rounds):
            order = list(DTYPES) if round_ % 2 == 0 else list(reversed(DTYPES))  # alternate which goes first
            for kernel in times:
                for dtype in order:
                    times[kernel][dtype].append(time_calls(work[dtype][kernel], args.repeats))
    result = {"machine": machine_info(torch.device("cpu")), "settings": vars(args), "kernels": {}}
    for kernel, by_dtype in times.items():
        fp32, bf16 = (statistics.median(by_dtype[d]) for d in DTYPES)
        result["kernels"][kernel] = {"fp32_ms": 1e3 * fp32, "bf16_ms": 1e3 * bf16, "bf16_over_fp32": bf16 / fp32,
                                     "rounds_ms": {d: [round(1e3 * t, 3) for t in by_dtype[d]] for d in DTYPES}}
    print(f"{'kernel':<26} {'fp32 ms':>9} {'bf16 ms':>9} {'bf16/fp32':>10}")
    for kernel, row in result["kernels"].items():
        print(f"{kernel:<26} {row['fp32_ms']:>9.3f} {row['bf16_ms']:>9.3f} {row['bf16_over_fp32']:>9.2f}x")
    print(json.dumps(result, ensure_ascii=False), flush=True)
    return result


if __name__ == "__main__":
    main()
