"""The parts of train.py's run besides the model and its checkpoints: the order of the samples (per rank, resumable,
optionally grouped by length), the plan of optimizer steps, the DeepSpeed config filled from the flags and the engine
built from it, how a batch is fed to the model, and the record of the run (library versions, plots). Errors are the
typed ones of medextract.errors; nothing here exits the process.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DistributedSampler

from utils import print_rank_0

from .checkpoints import use_weights_only_loading
from .errors import ConfigError, InputError

SUPPORTED_SCHEDULERS = ("WarmupDecayLR", "WarmupCosineLR")


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way through, so a resumed run sees the same batches, and can
    group samples of similar length into micro-batches (`lengths` set)."""

    skip = 0  # samples of this rank's share already consumed in the current epoch
    lengths: list[int] | None = None  # token count of each sample, for grouping by length
    batch_size = 1  # the micro-batch size, for grouping by length
    GROUP_SPAN = 50  # optimizer-step-sized chunks per sorted block

    def __iter__(self):
        order = list(super().__iter__()) if self.lengths is None else self.grouped_by_length()
        return iter(order[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip

    def grouped_by_length(self) -> list[int]:
        """This rank's share of the epoch. The epoch's seeded shuffle (padded to equal shares, as the plain sampler
        does) is cut into blocks, each block sorted by length and cut into chunks of one micro-batch per rank, and the
        full chunks are shuffled; each rank takes every num_replicas-th sample of each chunk, so a micro-batch holds
        samples of similar length. The short last chunk, if any, stays last."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        indices = torch.randperm(len(self.dataset), generator=generator).tolist()
        indices += (indices * math.ceil(self.total_size / len(indices)))[:self.total_size - len(indices)]
        width = self.batch_size * self.num_replicas
        chunks = []
        for start in range(0, len(indices), width * self.GROUP_SPAN):
            block = sorted(indices[start:start + width * self.GROUP_SPAN], key=lambda i: -self.lengths[i])
            chunks += [block[k:k + width] for k in range(0, len(block), width)]
        short = [chunks.pop()] if len(chunks[-1]) < width else []
        chunks = [chunks[k] for k in torch.randperm(len(chunks), generator=generator).tolist()] + short
        return [i for chunk in chunks for i in chunk[self.rank::self.num_replicas]]


@dataclass
class StepPlan:
    """Optimizer steps actually taken: every window of `gas` micro-batches, plus each epoch's last partial window."""

    micro_batches_per_epoch: int
    gas: int
    epochs: int
    warmup_ratio: float

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_batches_per_epoch / self.gas)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        return max(2, int(self.warmup_ratio * self.total_steps))  # DeepSpeed's warmup schedulers use at least 2

    def window_len(self, micro_index: int) -> int:
        """Micro-batches in the accumulation window holding `micro_index` (0-based within the epoch)."""
        start = micro_index // self.gas * self.gas
        return min(self.gas, self.micro_batches_per_epoch - start)


def model_inputs(batch: dict, device: torch.device) -> dict:
    """A collated training batch on `device`, without its attention mask. The collator pads on the right, so under
    causal attention no real token can see a pad, and pads carry no labels; in training mode the model applies no
    length-dependent NTK or logN scaling. So the loss and gradients are exactly those with the mask, while SDPA gets
    plain causal attention (is_causal, which its flash kernels take) instead of an explicit mask.
    tests/test_qwen_model.py checks the equality."""
    return {k: v.to(device) for k, v in batch.items() if k != "attention_mask"}


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerSettings:
    """What train.py's flags put into the DeepSpeed JSON's "auto" fields, besides the step plan."""

    micro_batch_size: int  # per rank (--per_device_train_batch_size)
    learning_rate: float  # the peak, after warmup
    weight_decay: float = 0.1  # AdamW's decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8


def load_ds_json(path: str) -> dict:
    """The DeepSpeed JSON template at `path` (--ds_file)."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise InputError(f"{path}: not valid JSON (nested too deeply)") from None
    except OSError as e:
        raise InputError(f"--ds_file {path}: cannot read it ({e.strerror})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: expected a JSON object")
    return cfg


def build_ds_config(template: dict, optim: OptimizerSettings, world_size: int, precision: str, plan: StepPlan,
                    ds_file: str = "the DeepSpeed JSON") -> dict:
    """Fill the JSON's "auto" fields from the flags, once. A concrete JSON value that disagrees with a flag is an
    error rather than silently winning or losing; `ds_file` names the template in that error."""
    cfg = json.loads(json.dumps(template))

    def fill(section: dict, key: str, value, where: str) -> None:
        current = section.get(key, "auto")
        if current == "auto":
            section[key] = value
        elif current != value:
            raise ConfigError(f"{ds_file}: {where}{key} is {current!r} but the command line gives {value!r}; "
                              f"set it to \"auto\"")

    bs, gas = optim.micro_batch_size, plan.gas
    fill(cfg, "train_micro_batch_size_per_gpu", bs, "")
    fill(cfg, "gradient_accumulation_steps", gas, "")
    fill(cfg, "train_batch_size", bs * gas * world_size, "")
    fill(cfg.setdefault("bf16", {}), "enabled", precision == "bf16", "bf16.")
    if cfg.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"{ds_file}: fp16.enabled is true; use --precision bf16 or fp32 (fp16 loss scaling is not "
                          f"used)")
    if "offload_optimizer" in cfg.get("zero_optimization", {}) or "offload_param" in cfg.get("zero_optimization", {}):
        print_rank_0(f"note: {ds_file} asks for offload; it is used as written", 0)

    optimizer = cfg.get("optimizer")
    if optimizer is None or optimizer.get("type", "").lower() not in ("adamw", "adam"):
        raise ConfigError(f"{ds_file}: optimizer.type must be AdamW (got {optimizer and optimizer.get('type')!r})")
    params = optimizer.setdefault("params", {})
    fill(params, "lr", optim.learning_rate, "optimizer.params.")
    fill(params, "betas", list(optim.betas), "optimizer.params.")
    fill(params, "eps", optim.eps, "optimizer.params.")
    fill(params, "weight_decay", optim.weight_decay, "optimizer.params.")

    scheduler = cfg.get("scheduler")
    if scheduler is None or scheduler.get("type") not in SUPPORTED_SCHEDULERS:
        raise ConfigError(f"{ds_file}: scheduler.type must be one of {', '.join(SUPPORTED_SCHEDULERS)} "
                          f"(got {scheduler and scheduler.get('type')!r})")
    sp = scheduler.setdefault("params", {})
    if sp.get("warmup_type", "linear") not in ("linear", "log"):
        raise ConfigError(f"{ds_file}: scheduler.params.warmup_type must be 'linear' or 'log' "
                          f"(DeepSpeed silently turns {sp['warmup_type']!r} into 'log')")
    sp.setdefault("warmup_type", "linear")
    fill(sp, "total_num_steps", plan.total_steps, "scheduler.params.")
    fill(sp, "warmup_num_steps", plan.warmup_steps, "scheduler.params.")
    if scheduler["type"] == "WarmupDecayLR":
        fill(sp, "warmup_max_lr", optim.learning_rate, "scheduler.params.")
        sp.setdefault("warmup_min_lr", 0.0)
    return cfg


def build_engine(model: nn.Module, ds_config: dict):
    """The DeepSpeed engine over the model's trainable (LoRA) parameters, loading resume state weights-only."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config,
                                           model_parameters=[p for p in model.parameters() if p.requires_grad])
    use_weights_only_loading(engine)
    # DeepSpeed's warmup schedulers leave the first step at warmup_min_lr and then recompute t=0 on their first
    # step(), so the first two optimizer steps would share one lr; one step here makes step k use lr(t = k - 1).
    engine.lr_scheduler.step()
    return engine


# ---------------------------------------------------------------------------------------------------------------
# The record of a run
# ---------------------------------------------------------------------------------------------------------------


def library_versions() -> dict:
    import bitsandbytes
    import deepspeed
    import peft
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "deepspeed": deepspeed.__version__, "bitsandbytes": bitsandbytes.__version__}


def write_plots(history: dict, output_dir: str) -> None:
    """train_loss.png, test_ppl.png and (with --select_by f1) test_f1.png, like the chapter's TensorBoard figures: raw
    line plus a smoothed one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, column, title, filename in (("train", 1, "train_loss", "train_loss.png"),
                                         ("eval", 1, "test_ppl", "test_ppl.png"),
                                         ("f1", 1, "test_f1 (macro)", "test_f1.png")):
        rows = history.get(key, [])
        if not rows and key == "f1":  # --select_by ppl: no F1 to draw, and nothing to say
            continue
        if not rows:
            why = "fewer optimizer steps than --show_loss_step" if key == "train" else "no evaluation ran"
            print(f"no {filename}: nothing to draw ({why})", flush=True)
            continue
        steps = [r[0] for r in rows]
        values = [r[column] for r in rows]
        smooth, ema = [], values[0]
        for v in values:
            ema = 0.6 * ema + 0.4 * v
            smooth.append(ema)
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ax.plot(steps, values, alpha=0.35, label="raw")
        ax.plot(steps, smooth, label="smoothed")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(title)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = os.path.join(output_dir, f".tmp-{filename}")
        fig.savefig(tmp, format="png")
        plt.close(fig)
        os.replace(tmp, os.path.join(output_dir, filename))
