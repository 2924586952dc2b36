"""What both benchmarks share: the random model's shape flags, building that model once, and the machine record."""
from __future__ import annotations

import argparse
import os
import platform

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_SHAPE = {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 11008}


def add_model_args(group, checkpoint_flag: str, num_hidden_layers: int) -> None:
    """--<checkpoint_flag>, --cache_dir, --real_shape and the random model's shape."""
    group.add_argument(f"--{checkpoint_flag}", type=str, default=None,
                       help="a checkpoint directory; by default a random model of the shape below is built (once) "
                            "under --cache_dir")
    group.add_argument("--cache_dir", type=str, default=os.path.join(ROOT, "bench"),
                       help="where random models are kept (as tiny_qwen_*/, which git ignores)")
    group.add_argument("--real_shape", action="store_true",
                       help="Qwen-1.8B's shape (2048 wide, 24 layers, 16 heads, intermediate 11008), bf16 on disk "
                            "(3.7 GB); for a GPU")
    group.add_argument("--hidden_size", type=int, default=512, help="random model width (without --real_shape)")
    group.add_argument("--num_hidden_layers", type=int, default=num_hidden_layers, help="random model depth")
    group.add_argument("--num_attention_heads", type=int, default=8, help="random model heads")
    group.add_argument("--intermediate_size", type=int, default=2816, help="random model MLP size (twice its width)")
    group.add_argument("--device", type=str, default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    group.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")


def apply_real_shape(args: argparse.Namespace) -> None:
    if args.real_shape:
        for key, value in REAL_SHAPE.items():
            setattr(args, key, value)


def random_model(args: argparse.Namespace) -> str:
    """Build (once) a random-weight checkpoint of the requested shape under --cache_dir, with the full vocabulary:
    bf16 on disk at the real shape, as the published shards are; fp32 otherwise."""
    from qwen1_8.make_tiny import make_tiny

    dtype = "bfloat16" if args.real_shape else "float32"
    name = (f"tiny_qwen_h{args.hidden_size}_l{args.num_hidden_layers}_a{args.num_attention_heads}"
            f"_i{args.intermediate_size}_s{args.seed}_{dtype}")
    path = os.path.join(args.cache_dir, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        print(f"building a random model in {path}", flush=True)
        make_tiny(path, hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                  num_attention_heads=args.num_attention_heads, intermediate_size=args.intermediate_size,
                  dtype=dtype, seed=args.seed)
    return path


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = cpu_name()
    return info


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
