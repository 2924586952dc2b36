"""QLoRA fine-tuning of Qwen-1.8B-Chat under DeepSpeed ZeRO-2: the base is loaded in 4-bit NF4 (double
quantisation), LoRA adapters go on every linear layer but lm_head, and the model learns to answer the medical
extraction prompt with the eight fields as JSON. Checkpoints hold the adapter (safetensors), the tokenizer, the
resolved settings and the state needed to resume exactly.

The chapter's command, on one or many GPUs (add --hostfile for many machines; output_dir must then be shared):

    deepspeed train.py --train_path data/train.json --test_path data/test.json \
        --model_name_or_path Qwen-1_8-chat --per_device_train_batch_size 2 --max_len 2048 --max_src_len 1560 \
        --learning_rate 1e-4 --weight_decay 0.1 --num_train_epochs 3 --gradient_accumulation_steps 4 \
        --warmup_ratio 0.03 --seed 1234 --show_loss_step 10 --lora_dim 16 --lora_alpha 64 --save_model_step 100 \
        --lora_dropout 0.1 --output_dir ./output_dir_qlora --gradient_checkpointing \
        --ds_file ds_zero2_no_offload.json --is_skip

The same script and flags also run as two CPU ranks over gloo, `DS_ACCELERATOR=cpu deepspeed --num_gpus 2 train.py ...`,
and as one process without the launcher, `python train.py ...` (CPU or GPU). Resume an interrupted run with
`--resume_from_checkpoint ./output_dir_qlora/epoch-1-step-200` and otherwise the same flags.

Choices worth knowing:
- Precision: bf16 (compute dtype of the 4-bit layers and DeepSpeed's bf16 mode) on a bf16-capable GPU, otherwise
  fp32; never fp16 and never an unset compute dtype. `--quantization none` trains plain LoRA on the unquantized base.
- The DeepSpeed JSON asks for torch's AdamW (`torch_adam`): DeepSpeed's FusedAdam is an extension compiled at first
  use, on CPU and GPU alike, and for ~13M LoRA parameters torch's foreach AdamW costs nothing extra.
- Schedule: WarmupDecayLR, linear warmup from 0 then linear decay to 0, over exactly the optimizer steps taken:
  ceil(micro-batches / accumulation) per epoch, each epoch's last shorter window being applied at the epoch's end.
- Resume state is DeepSpeed's own (optimizer, scheduler, adapter; partitioned per rank under ZeRO-2) plus counters
  and RNG streams in JSON. DeepSpeed's loader would unpickle with weights_only=False; here it is switched to
  weights_only=True with four DeepSpeed classes allow-listed, so a checkpoint cannot run code when loaded.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from medextract.checkpoints import CHECKPOINT_NAME
from medextract.model_files import check_model_files, check_vocabulary, safetensors_header, weight_shards
from utils import (IGNORE_INDEX, TRUNCATIONS, WEIGHT_FILES, DataCollator, HelpFormatter, QwenPromptDataSet,
                   apply_usual_permissions, atomic_write_text, check_output_path, load_tokenizer, native_bf16,
                   one_line, print_rank_0, set_random_seed, silence_library_deprecations)

DS_STATE_DIR, DS_STATE_TAG = "deepspeed", "state"  # DeepSpeed's optimizer/scheduler state in each checkpoint
SUPPORTED_SCHEDULERS = ("WarmupDecayLR", "WarmupCosineLR")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)

    data = parser.add_argument_group("data")
    data.add_argument("--train_path", default="data/train.json", help="training JSON Lines from data_helper.py")
    data.add_argument("--test_path", default="data/test.json",
                      help="test JSON Lines for the perplexity evaluations; '' to skip evaluation")
    data.add_argument("--max_len", type=int, default=2048, help="longest training sequence in tokens")
    data.add_argument("--max_src_len", type=int, default=1560,
                      help="longest user block (instruction + dialogue) in tokens; must be below --max_len")
    data.add_argument("--truncation", choices=TRUNCATIONS, default="tokens",
                      help="how a user block longer than --max_src_len is cut: tokens = keep its first tokens (the "
                           "chapter's, mid-turn); turns = keep its leading whole lines (dialogue turns) that fit. "
                           "predict.py cuts the same way (it reads train_args.json)")
    data.add_argument("--is_skip", action="store_true",
                      help="drop training samples that had to be truncated (the test set is always kept whole)")
    data.add_argument("--group_by_length", action="store_true",
                      help="put samples of similar length in each micro-batch (seeded, a new grouping each epoch): "
                           "less padding to compute; off = the chapter's plain shuffle")

    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", default="Qwen-1_8-chat",
                       help="checkpoint dir: config.json, weights, qwen.tiktoken, generation_config.json")
    model.add_argument("--quantization", choices=("nf4", "none"), default="nf4",
                       help="nf4: QLoRA on a 4-bit NF4 base with double quantisation; none: plain LoRA")
    model.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                       help="compute dtype; auto = bf16 on a bf16-capable GPU, else fp32 (CPU, older GPUs)")
    model.add_argument("--gradient_checkpointing", action="store_true",
                       help="recompute activations in the backward pass to save memory")

    add_lora_args(parser.add_argument_group("LoRA"))

    optim = parser.add_argument_group("optimisation (filled into the DeepSpeed JSON's \"auto\" fields)")
    optim.add_argument("--per_device_train_batch_size", type=int, default=2, help="micro-batch size per rank")
    optim.add_argument("--per_device_eval_batch_size", type=int, default=2, help="evaluation batch size per rank")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=4,
                       help="micro-batches per optimizer step (the last window of an epoch may be shorter)")
    optim.add_argument("--num_train_epochs", type=int, default=3, help="passes over the training set")
    optim.add_argument("--learning_rate", type=float, default=1e-4, help="peak learning rate after warmup")
    optim.add_argument("--weight_decay", type=float, default=0.1, help="AdamW decoupled weight decay")
    optim.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    optim.add_argument("--adam_beta2", type=float, default=0.95, help="AdamW beta2")
    optim.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    optim.add_argument("--warmup_ratio", type=float, default=0.03,
                       help="fraction of the optimizer steps spent warming up linearly from 0 (at least 2 steps), "
                            "then decaying linearly to 0")
    optim.add_argument("--seed", type=int, default=1234, help="seed for LoRA init, data order and dropout")
    optim.add_argument("--ds_file", default="ds_zero2_no_offload.json", help="DeepSpeed JSON config")

    run = parser.add_argument_group("logging, checkpoints, resume")
    run.add_argument("--output_dir", default="./output_dir_qlora",
                     help="checkpoints, TensorBoard events, plots and train_args.json go here")
    run.add_argument("--overwrite_output_dir", action="store_true",
                     help="allow a fresh run into an output_dir that already holds checkpoints")
    run.add_argument("--show_loss_step", type=int, default=10,
                     help="log the mean training loss every N optimizer steps (and at the last)")
    run.add_argument("--save_model_step", type=int, default=100,
                     help="evaluate and checkpoint every N optimizer steps (and at each epoch end); 0 = epoch ends")
    run.add_argument("--save_total_limit", type=int, default=0,
                     help="keep only the N newest checkpoints, plus the best one; 0 = keep all (a 1.8B "
                          "checkpoint is ~0.28 GB: the adapter and its fp32 Adam state)")
    run.add_argument("--resume_from_checkpoint", default="",
                     help="a checkpoint dir of this run (epoch-E-step-G) to continue from exactly")
    run.add_argument("--stop_after_steps", type=int, default=0,
                     help="stop after this many optimizer steps in total, as if interrupted (the schedule still "
                          "spans all epochs); 0 = run to the end")
    run.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher; LOCAL_RANK wins")
    return parser.parse_args(argv)


def add_lora_args(group) -> None:
    """The LoRA flags, shared with bench/bench_train.py so both build the same adapter."""
    group.add_argument("--lora_dim", type=int, default=16, help="LoRA rank r")
    group.add_argument("--lora_alpha", type=int, default=64, help="LoRA alpha; the update is scaled by alpha / r")
    group.add_argument("--lora_dropout", type=float, default=0.1, help="dropout on the LoRA input")


def log_rank_0(message: str, rank: int = 0) -> None:
    """One log line on rank 0 that does not tear its progress bar."""
    if rank <= 0:
        tqdm.write(message)


def fail(message: str) -> None:
    """Stop before training with a message that names the bad input."""
    raise SystemExit(f"train.py: error: {message}")


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    silence_library_deprecations()
    # Everything that can be wrong with the inputs is checked before the process group exists.
    validate_args(args)
    fingerprints = run_fingerprints(args)
    if args.resume_from_checkpoint:
        check_resume_fingerprints(args.resume_from_checkpoint, fingerprints, rank=int(os.environ.get("RANK", "0")))
    ds_template = load_ds_json(args.ds_file)
    try:
        tokenizer = load_tokenizer(args.model_name_or_path)
    except (OSError, ValueError) as e:
        fail(f"--model_name_or_path {args.model_name_or_path}: cannot load the tokenizer ({one_line(e)})")
    train_set, test_set = build_datasets(args, tokenizer, rank=int(os.environ.get("RANK", "0")))

    rank, world_size, device = init_distributed()
    check_output_dir_shared(args.output_dir, rank, world_size, device)
    precision = resolve_precision(args.precision, device)
    set_random_seed(args.seed)  # the same LoRA init on every rank
    train_loader, train_sampler, test_loader = build_dataloaders(args, train_set, test_set, tokenizer, rank,
                                                                 world_size)
    plan = StepPlan(micro_batches_per_epoch=len(train_loader), gas=args.gradient_accumulation_steps,
                    epochs=args.num_train_epochs, warmup_ratio=args.warmup_ratio)
    ds_config = build_ds_config(ds_template, args, world_size, precision, plan)
    model = build_model(args, precision, device)
    run_info = describe_run(args, model, ds_config, plan, world_size, device, precision, train_set, test_set, rank,
                            fingerprints)
    engine = build_engine(model, ds_config)

    state = TrainState()
    if args.resume_from_checkpoint:
        state = resume(engine, args.resume_from_checkpoint, plan, world_size, rank, args.group_by_length)
    set_random_seed(args.seed + rank)  # dropout differs across ranks; a resume restores the saved streams below
    loss_window = torch.zeros(2, dtype=torch.float64, device=device)  # this rank's unlogged (loss sum, count)
    if args.resume_from_checkpoint:
        rank_state = read_json(os.path.join(args.resume_from_checkpoint, f"rng_state_rank{rank}.json"))
        set_rng_state(rank_state)
        loss_window += torch.tensor(rank_state.get("loss_window", [0.0, 0.0]), dtype=torch.float64, device=device)

    writer = None
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        clear_run_outputs(args.output_dir, state.best, resumed=bool(args.resume_from_checkpoint))
        atomic_write_text(os.path.join(args.output_dir, "train_args.json"), to_json(run_info))
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"),
                               purge_step=state.global_step + 1 if state.global_step else None)
    ctx = RunContext(args=args, plan=plan, engine=engine, tokenizer=tokenizer, device=device, rank=rank,
                     world_size=world_size, test_loader=test_loader, writer=writer, run_info=run_info,
                     loss_window=loss_window)

    engine.train()
    for epoch in range(state.epoch, plan.epochs + 1):
        state.epoch = epoch
        train_sampler.set_epoch(epoch)  # a new order each epoch, the same on every rank
        train_sampler.skip = state.micro_in_epoch * args.per_device_train_batch_size
        train_one_epoch(ctx, state, train_loader)
        if state.micro_in_epoch == plan.micro_batches_per_epoch:
            if state.global_step != state.last_saved_step:  # unless this step was just saved
                evaluate_and_save(ctx, state)
            state.micro_in_epoch = 0
        if should_stop(args, state):
            print_rank_0(f"stopped after step {state.global_step} (--stop_after_steps)", rank)
            break
    finish(ctx, state)


# ---------------------------------------------------------------------------------------------------------------
# Model, data, DeepSpeed config
# ---------------------------------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace, precision: str, device: torch.device) -> nn.Module:
    """The base in 4-bit NF4 (or unquantized), frozen, with LoRA on every linear layer but lm_head."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from qwen1_8.modeling_qwen import QWenLMHeadModel

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    device_map = {"": str(device)}
    if args.quantization == "nf4":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
        model = QWenLMHeadModel.from_pretrained(args.model_name_or_path, dtype=dtype, quantization_config=quant,
                                                device_map=device_map)
        # Freezes the base and upcasts its norms/embeddings; checkpointing is left to our own flag below.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_training_kernels(model)
    else:
        model = QWenLMHeadModel.from_pretrained(args.model_name_or_path, dtype=dtype, device_map=device_map)
        model.requires_grad_(False)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return add_lora(model, args.lora_dim, args.lora_alpha, args.lora_dropout)


def keep_4bit_training_kernels(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking a Linear4bit for its CPU inference kernel when train.py evaluates.

    On a CPU with AVX512-BF16, a Linear4bit run in eval mode without grad repacks its weight for a bf16 gemv kernel
    and keeps it so until its state_dict is taken, which unpacks it through a lossy inverse (absmax rounded to bf16,
    then quantized again). Each evaluation here is followed by a checkpoint save, so each one nudged the frozen base a
    little, and a run resumed between two evaluations no longer matched the uninterrupted one; a training step between
    the two would have run the base through that kernel, which has no backward. With this, training computes the same
    before and after an evaluation, and the same as on a CPU without AVX512-BF16 or on a GPU.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def lora_target_names(model: nn.Module) -> list[str]:
    """Short names of every linear layer but the output head: {c_attn, c_proj, w1, w2} for Qwen.

    bitsandbytes' Linear4bit subclasses nn.Linear, so this finds the same layers quantized or not.
    """
    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and module is not head})


def add_lora(model: nn.Module, lora_dim: int, lora_alpha: int, lora_dropout: float) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora_dim, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        target_modules=lora_target_names(model), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def enable_activation_checkpointing(model: nn.Module) -> None:
    # Non-reentrant checkpointing works with a frozen embedding, so no input-grad hook is needed.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the newer name (5.23 has it, 5.17 does not)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_datasets(args: argparse.Namespace, tokenizer, rank: int):
    try:
        train_set = QwenPromptDataSet(args.train_path, tokenizer, args.max_len, args.max_src_len, args.is_skip, rank,
                                      args.truncation)
        # The test set keeps truncated samples: the chapter's silent exclusion made its PPL cover 49 of 50.
        test_set = (QwenPromptDataSet(args.test_path, tokenizer, args.max_len, args.max_src_len, False, rank,
                                      args.truncation) if args.test_path else None)
    except ValueError as e:
        fail(str(e))
    if len(train_set) == 0:
        fail(f"{args.train_path}: every sample was skipped (--is_skip with --max_len {args.max_len})")
    return train_set, test_set


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


def build_dataloaders(args: argparse.Namespace, train_set, test_set, tokenizer, rank: int, world_size: int):
    collator = DataCollator(tokenizer)
    train_sampler = ResumableDistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True,
                                                seed=args.seed)
    if args.group_by_length:
        train_sampler.lengths = [len(item["input_ids"]) for item in train_set]
        train_sampler.batch_size = args.per_device_train_batch_size
    # Private generators keep the loaders from drawing a seed from the global RNG each time they are iterated:
    # dropout then depends only on the steps taken, not on when evaluations happened, and a resume is exact.
    train_loader = DataLoader(train_set, batch_size=args.per_device_train_batch_size, sampler=train_sampler,
                              collate_fn=collator, generator=torch.Generator().manual_seed(args.seed))
    test_loader = None
    if test_set is not None:
        # Strided shards without padding: every test sample is counted exactly once across ranks.
        shard = Subset(test_set, list(range(rank, len(test_set), world_size)))
        test_loader = DataLoader(shard, batch_size=args.per_device_eval_batch_size, shuffle=False,
                                 collate_fn=collator, generator=torch.Generator())
    return train_loader, train_sampler, test_loader


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


def build_ds_config(template: dict, args: argparse.Namespace, world_size: int, precision: str,
                    plan: StepPlan) -> dict:
    """Fill the JSON's "auto" fields from the flags, once. A concrete JSON value that disagrees with a flag is an
    error rather than silently winning or losing."""
    cfg = json.loads(json.dumps(template))

    def fill(section: dict, key: str, value, where: str) -> None:
        current = section.get(key, "auto")
        if current == "auto":
            section[key] = value
        elif current != value:
            fail(f"{args.ds_file}: {where}{key} is {current!r} but the command line gives {value!r}; "
                 f"set it to \"auto\"")

    bs, gas = args.per_device_train_batch_size, args.gradient_accumulation_steps
    fill(cfg, "train_micro_batch_size_per_gpu", bs, "")
    fill(cfg, "gradient_accumulation_steps", gas, "")
    fill(cfg, "train_batch_size", bs * gas * world_size, "")
    fill(cfg.setdefault("bf16", {}), "enabled", precision == "bf16", "bf16.")
    if cfg.get("fp16", {}).get("enabled") is True:
        fail(f"{args.ds_file}: fp16.enabled is true; use --precision bf16 or fp32 (fp16 loss scaling is not used)")
    if "offload_optimizer" in cfg.get("zero_optimization", {}) or "offload_param" in cfg.get("zero_optimization", {}):
        print_rank_0(f"note: {args.ds_file} asks for offload; it is used as written", 0)

    optimizer = cfg.get("optimizer")
    if optimizer is None or optimizer.get("type", "").lower() not in ("adamw", "adam"):
        fail(f"{args.ds_file}: optimizer.type must be AdamW (got {optimizer and optimizer.get('type')!r})")
    params = optimizer.setdefault("params", {})
    fill(params, "lr", args.learning_rate, "optimizer.params.")
    fill(params, "betas", [args.adam_beta1, args.adam_beta2], "optimizer.params.")
    fill(params, "eps", args.adam_epsilon, "optimizer.params.")
    fill(params, "weight_decay", args.weight_decay, "optimizer.params.")

    scheduler = cfg.get("scheduler")
    if scheduler is None or scheduler.get("type") not in SUPPORTED_SCHEDULERS:
        fail(f"{args.ds_file}: scheduler.type must be one of {', '.join(SUPPORTED_SCHEDULERS)} "
             f"(got {scheduler and scheduler.get('type')!r})")
    sp = scheduler.setdefault("params", {})
    if sp.get("warmup_type", "linear") not in ("linear", "log"):
        fail(f"{args.ds_file}: scheduler.params.warmup_type must be 'linear' or 'log' "
             f"(DeepSpeed silently turns {sp['warmup_type']!r} into 'log')")
    sp.setdefault("warmup_type", "linear")
    fill(sp, "total_num_steps", plan.total_steps, "scheduler.params.")
    fill(sp, "warmup_num_steps", plan.warmup_steps, "scheduler.params.")
    if scheduler["type"] == "WarmupDecayLR":
        fill(sp, "warmup_max_lr", args.learning_rate, "scheduler.params.")
        sp.setdefault("warmup_min_lr", 0.0)
    return cfg


def describe_run(args, model, ds_config, plan, world_size, device, precision, train_set, test_set, rank,
                 fingerprints: dict | None = None) -> dict:
    """The resolved settings, printed as counts and saved as train_args.json beside every checkpoint, with the
    fingerprints of what the run reads (run_fingerprints), which a resume must find unchanged."""
    trainable, total = model.get_nb_trainable_parameters()  # 4-bit weights counted at their logical size
    print_rank_0(f"trainable params: {trainable:,} || all params: {total:,} || "
                 f"trainable%: {100 * trainable / total:.4f}", rank)
    print_rank_0(f"train samples {len(train_set)} ({train_set.skipped} skipped) | micro-batches per epoch per rank "
                 f"{plan.micro_batches_per_epoch} | optimizer steps {plan.total_steps} "
                 f"({plan.steps_per_epoch} per epoch) | warmup {plan.warmup_steps} | world size {world_size} | "
                 f"{precision} on {device.type}", rank)
    return {"args": vars(args), "ds_config": ds_config, "world_size": world_size, "device": device.type,
            "precision": precision, "quantization": args.quantization,
            "bnb_4bit_compute_dtype": precision if args.quantization == "nf4" else None,
            "micro_batches_per_epoch": plan.micro_batches_per_epoch, "optimizer_steps_per_epoch": plan.steps_per_epoch,
            "total_optimizer_steps": plan.total_steps, "warmup_steps": plan.warmup_steps,
            "trainable_params": trainable, "all_params": total, "train_samples": len(train_set),
            "train_skipped": train_set.skipped, "test_samples": len(test_set) if test_set is not None else 0,
            "fingerprints": fingerprints, "versions": library_versions()}


def build_engine(model: nn.Module, ds_config: dict):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config,
                                           model_parameters=[p for p in model.parameters() if p.requires_grad])
    use_weights_only_loading(engine)
    # DeepSpeed's warmup schedulers leave the first step at warmup_min_lr and then recompute t=0 on their first
    # step(), so the first two optimizer steps would share one lr; one step here makes step k use lr(t = k - 1).
    engine.lr_scheduler.step()
    return engine


# ---------------------------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Counters that a checkpoint records, so a resume continues from the same place."""

    epoch: int = 1  # 1-based, as in the checkpoint names
    micro_in_epoch: int = 0  # micro-batches of this epoch already applied
    global_step: int = 0  # optimizer steps taken
    last_saved_step: int = -1
    best: dict | None = None  # {"path", "step", "ppl"}
    history: dict = field(default_factory=lambda: {"train": [], "eval": []})  # [step, loss, lr], [step, ppl]


@dataclass
class RunContext:
    args: argparse.Namespace
    plan: StepPlan
    engine: object
    tokenizer: object
    device: torch.device
    rank: int
    world_size: int
    test_loader: DataLoader | None
    writer: object
    run_info: dict
    # (sum of micro-batch losses, count) since the last logged step: it runs across epoch ends and, through each
    # rank's rng_state_rank{r}.json, across a resume, so every logged loss is the mean over its --show_loss_step steps
    loss_window: torch.Tensor


def train_one_epoch(ctx: RunContext, state: TrainState, loader: DataLoader) -> None:
    """Run the rest of the current epoch (or up to --stop_after_steps), evaluating and saving on schedule."""
    args, plan, engine, loss_sum = ctx.args, ctx.plan, ctx.engine, ctx.loss_window
    window_start_time, window_start_step = time.perf_counter(), state.global_step
    bar = tqdm(loader, total=plan.micro_batches_per_epoch, initial=state.micro_in_epoch, disable=ctx.rank != 0,
               desc=f"epoch {state.epoch}/{plan.epochs}", dynamic_ncols=True)
    for micro_index, batch in enumerate(bar, start=state.micro_in_epoch):
        window = plan.window_len(micro_index)
        is_boundary = micro_index + 1 == micro_index // plan.gas * plan.gas + window
        # We own the boundary so each epoch's last, shorter window is applied in this epoch, not leaked into the next.
        engine.set_gradient_accumulation_boundary(is_boundary)
        batch = model_inputs(batch, ctx.device)
        loss = engine(**batch, use_cache=False, skip_logits=True).loss  # no (B, T, vocab) logits needed
        engine.backward(loss / window, scale_wrt_gas=False)  # the mean over the window, however long it is
        lr = engine.get_lr()[0]  # the lr this step applies (the scheduler moves inside step())
        engine.step()  # clips (DeepSpeed config) and updates only at the boundary
        loss_sum += torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=ctx.device)])
        if not is_boundary:
            continue

        state.global_step += 1
        state.micro_in_epoch = micro_index + 1
        if state.global_step % args.show_loss_step == 0 or state.global_step == plan.total_steps:
            dist.all_reduce(loss_sum)
            mean_loss = (loss_sum[0] / loss_sum[1]).item()
            loss_sum.zero_()
            sec_per_step = (time.perf_counter() - window_start_time) / (state.global_step - window_start_step)
            window_start_time, window_start_step = time.perf_counter(), state.global_step
            state.history["train"].append([state.global_step, mean_loss, lr])
            if ctx.rank == 0:
                # on a GPU also the peak memory so far, the chapter log's MaxMemAllocated
                peak = (f" | peak {torch.cuda.max_memory_allocated(ctx.device) / 1e9:.2f} GB"
                        if ctx.device.type == "cuda" else "")
                log_rank_0(f"epoch {state.epoch}/{plan.epochs} | step {state.global_step}/{plan.total_steps} | "
                           f"loss {mean_loss:.4f} | lr {lr:.2e} | {sec_per_step:.2f} s/step{peak}")
                ctx.writer.add_scalar("train_loss", mean_loss, state.global_step)
                ctx.writer.add_scalar("lr", lr, state.global_step)
        if args.save_model_step and state.global_step % args.save_model_step == 0:
            evaluate_and_save(ctx, state)
            window_start_time = time.perf_counter()  # keep evaluation out of s/step
        if should_stop(args, state) and state.micro_in_epoch < plan.micro_batches_per_epoch:
            break  # (at an epoch end main() saves first, then stops)
    bar.close()


def model_inputs(batch: dict, device: torch.device) -> dict:
    """A collated training batch on `device`, without its attention mask. The collator pads on the right, so under
    causal attention no real token can see a pad, and pads carry no labels; in training mode the model applies no
    length-dependent NTK or logN scaling. So the loss and gradients are exactly those with the mask, while SDPA gets
    plain causal attention (is_causal, which its flash kernels take) instead of an explicit mask.
    tests/test_qwen_model.py checks the equality."""
    return {k: v.to(device) for k, v in batch.items() if k != "attention_mask"}


@torch.no_grad()
def evaluate(engine, loader: DataLoader, device: torch.device) -> float:
    """Token-weighted test perplexity: exp(sum of token NLL / number of label tokens), summed over all ranks."""
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (NLL sum, label tokens)
    for batch in loader:
        # with the mask: in eval mode a sample longer than seq_length gets dynamic NTK from its own length
        batch = {k: v.to(device) for k, v in batch.items()}
        n_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()  # the model predicts token t+1 at position t
        if n_tokens == 0:
            continue
        loss = engine(**batch, use_cache=False, skip_logits=True).loss  # mean over the batch's label tokens
        totals += torch.stack([loss.double() * n_tokens, n_tokens.double()])
    dist.all_reduce(totals)
    engine.train()
    if totals[1] == 0:
        return float("nan")
    mean_nll = (totals[0] / totals[1]).item()
    return math.exp(mean_nll) if mean_nll < 700 else float("inf")


def evaluate_and_save(ctx: RunContext, state: TrainState) -> None:
    name = f"epoch-{state.epoch}-step-{state.global_step}"
    path = os.path.join(ctx.args.output_dir, name)
    if ctx.test_loader is not None:
        ppl = evaluate(ctx.engine, ctx.test_loader, ctx.device)
        state.history["eval"].append([state.global_step, ppl])
        if state.best is None or ppl < state.best["ppl"]:
            state.best = {"path": path, "step": state.global_step, "ppl": ppl}
        if ctx.rank == 0:
            ctx.writer.add_scalar("test_ppl", ppl, state.global_step)
            log_rank_0(f"eval | epoch {state.epoch}/{ctx.plan.epochs} | step {state.global_step}/"
                         f"{ctx.plan.total_steps} | test_ppl {ppl:.4f} | best {state.best['ppl']:.4f} "
                         f"at step {state.best['step']}", ctx.rank)
    state.last_saved_step = state.global_step
    save_checkpoint(ctx, state, name)
    if ctx.rank == 0:
        if state.best is not None and state.best["step"] == state.global_step:
            atomic_write_text(os.path.join(ctx.args.output_dir, "best_checkpoint.json"), to_json(state.best))
        if ctx.args.save_total_limit:
            prune_checkpoints(ctx.args.output_dir, ctx.args.save_total_limit, state.best, name)
        ctx.writer.flush()


def should_stop(args: argparse.Namespace, state: TrainState) -> bool:
    return bool(args.stop_after_steps) and state.global_step >= args.stop_after_steps


def finish(ctx: RunContext, state: TrainState) -> None:
    if ctx.rank == 0:
        ctx.writer.close()
        write_plots(state.history, ctx.args.output_dir)
        if state.best is not None:
            best = state.best
            print_rank_0(f"best checkpoint: {best['path']} (step {best['step']}, test ppl {best['ppl']:.4f})")
        print_rank_0(f"done: {state.global_step}/{ctx.plan.total_steps} optimizer steps; outputs in "
                     f"{ctx.args.output_dir}")
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and resume
# ---------------------------------------------------------------------------------------------------------------


def save_checkpoint(ctx: RunContext, state: TrainState, name: str) -> None:
    """output_dir/epoch-E-step-G/: adapter_model.safetensors + adapter_config.json, tokenizer files,
    train_args.json, trainer_state.json, rng_state_rank{r}.json (the rank's RNG streams and unlogged loss window)
    and deepspeed/state/ (DeepSpeed's adapter, optimizer and scheduler state; ZeRO-2 writes one optimizer file per
    rank). Written under a temporary name and renamed, so a crash leaves no half checkpoint."""
    final = os.path.join(ctx.args.output_dir, name)
    tmp = os.path.join(ctx.args.output_dir, f".tmp-{name}")
    if ctx.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    ctx.engine.save_checkpoint(os.path.join(tmp, DS_STATE_DIR), tag=DS_STATE_TAG, save_latest=False,
                               exclude_frozen_parameters=True)  # the frozen base is not copied into checkpoints
    atomic_write_text(os.path.join(tmp, f"rng_state_rank{ctx.rank}.json"),
                      json.dumps({**get_rng_state(), "loss_window": ctx.loss_window.tolist()}))
    if ctx.rank == 0:
        ctx.engine.module.save_pretrained(tmp, safe_serialization=True)
        ctx.tokenizer.save_pretrained(tmp)
        atomic_write_text(os.path.join(tmp, "train_args.json"), to_json(ctx.run_info))
        atomic_write_text(os.path.join(tmp, "trainer_state.json"),
                          to_json({**asdict(state), "plan": asdict(ctx.plan), "world_size": ctx.world_size}))
    dist.barrier()
    if ctx.rank == 0:
        apply_usual_permissions(tmp)  # safetensors writes the adapter 0600
        if os.path.exists(final):  # left by an abandoned run past the point this one resumed from
            shutil.rmtree(final)
        os.replace(tmp, final)
        log_rank_0(f"saved {final}", ctx.rank)
    dist.barrier()


RUN_OUTPUTS = ("best_checkpoint.json", "train_loss.png", "test_ppl.png")  # beside the checkpoints, of one run


def clear_run_outputs(output_dir: str, best: dict | None, resumed: bool) -> None:
    """Rank 0, before the first step: no file beside the checkpoints may speak of another run. A new run (into a
    directory started over with --overwrite_output_dir, say) removes the last run's best_checkpoint.json, which
    merge_params.py would otherwise merge, its plots and its TensorBoard events; a resume rewrites
    best_checkpoint.json from the checkpoint, since a run abandoned past that point may have recorded a later one."""
    if not resumed:
        for name in RUN_OUTPUTS:
            if os.path.isfile(os.path.join(output_dir, name)):
                os.remove(os.path.join(output_dir, name))
        events = os.path.join(output_dir, "tensorboard")
        for name in os.listdir(events) if os.path.isdir(events) else []:
            if name.startswith("events.out.tfevents."):
                os.remove(os.path.join(events, name))
    elif best is not None:
        atomic_write_text(os.path.join(output_dir, "best_checkpoint.json"), to_json(best))
    elif os.path.isfile(os.path.join(output_dir, "best_checkpoint.json")):
        os.remove(os.path.join(output_dir, "best_checkpoint.json"))


def prune_checkpoints(output_dir: str, keep: int, best: dict | None, saved: str) -> list[str]:
    """Delete all but the `keep` newest epoch-E-step-G checkpoints of output_dir up to the one just `saved`, never
    that one nor the best; returns the names deleted. Checkpoints past `saved` (from a run this one resumed before
    the end of, or one started over with --overwrite_output_dir) are not this run's to judge and stay."""
    current = int(CHECKPOINT_NAME.match(saved).group(2))
    steps = {}
    for name in os.listdir(output_dir):
        match = CHECKPOINT_NAME.match(name)
        if match and int(match.group(2)) <= current and os.path.isdir(os.path.join(output_dir, name)):
            steps[name] = int(match.group(2))
    newest = sorted(steps, key=steps.get, reverse=True)[:keep]
    protected = {saved, *newest} | ({os.path.basename(best["path"])} if best else set())
    deleted = sorted((name for name in steps if name not in protected), key=steps.get)
    for name in deleted:
        shutil.rmtree(os.path.join(output_dir, name))
    if deleted:
        log_rank_0(f"removed {len(deleted)} older checkpoint(s) (--save_total_limit {keep}): {', '.join(deleted)}")
    return deleted


def resume(engine, checkpoint: str, plan: StepPlan, world_size: int, rank: int,
           group_by_length: bool = False) -> TrainState:
    saved = read_json(os.path.join(checkpoint, "trainer_state.json"))
    saved_plan = StepPlan(**saved.pop("plan"))
    saved_world = saved.pop("world_size")
    if saved_world != world_size:
        fail(f"{checkpoint} was written by {saved_world} ranks; resume it with {saved_world}, not {world_size}")
    if saved_plan != plan:
        fail(f"{checkpoint} was taken with a different step plan {asdict(saved_plan)}; now {asdict(plan)} "
             f"(same data, batch size, accumulation, epochs and warmup are needed to resume)")
    saved_args = read_json(os.path.join(checkpoint, "train_args.json")).get("args", {})
    if bool(saved_args.get("group_by_length")) != group_by_length:
        fail(f"{checkpoint} was taken with{'' if saved_args.get('group_by_length') else 'out'} --group_by_length; "
             f"resume it the same way (it decides the order of the samples)")
    load_path, _ = engine.load_checkpoint(os.path.join(checkpoint, DS_STATE_DIR), tag=DS_STATE_TAG,
                                          load_module_strict=False)  # strict=False: only the adapter was saved
    if load_path is None:
        fail(f"{checkpoint}/{DS_STATE_DIR}: DeepSpeed could not load it")
    engine.lr_scheduler.step(engine.lr_scheduler.last_batch_iteration)  # put the restored lr into the optimizer
    state = TrainState(**saved)
    if state.micro_in_epoch >= plan.micro_batches_per_epoch:  # saved at an epoch end: start the next epoch
        state.epoch, state.micro_in_epoch = state.epoch + 1, 0
    loader = "weights_only" if getattr(engine.checkpoint_engine, "weights_only", False) else "pickle"
    print_rank_0(f"resumed from {checkpoint} ({loader} load): step {state.global_step}, epoch {state.epoch}, "
                 f"micro-batch {state.micro_in_epoch}/{plan.micro_batches_per_epoch}", rank)
    return state


def use_weights_only_loading(engine) -> None:
    """Make DeepSpeed's load_checkpoint unpickle with torch.load(weights_only=True).

    DeepSpeed's own loader passes weights_only=False (arbitrary code on load). Its ZeRO-2 files need only four
    DeepSpeed classes beyond tensors and containers, so those are allow-listed and everything else is refused.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    safe = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        weights_only = True

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(safe):
                return torch.load(path, map_location=map_location, weights_only=True)

    current = engine.checkpoint_engine
    if type(current) is TorchCheckpointEngine:
        replacement = WeightsOnlyCheckpointEngine.__new__(WeightsOnlyCheckpointEngine)
        replacement.__dict__.update(current.__dict__)
        engine.checkpoint_engine = replacement
    else:  # a checkpoint engine chosen in the DeepSpeed JSON: its own loader applies
        print_rank_0(f"warning: {type(current).__name__} loads resume state with its own loader; only resume from "
                     f"checkpoints you trust", engine.global_rank)


def get_rng_state() -> dict:
    version, mt_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(mt_state), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state().tolist(),
            # this rank's GPU only: get_rng_state_all() would open a CUDA context on every visible GPU from every rank
            "cuda": torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() else []}


def set_rng_state(saved: dict) -> None:
    version, mt_state, gauss = saved["python"]
    random.setstate((version, tuple(mt_state), gauss))
    name, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(saved["torch"], dtype=torch.uint8))
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(saved["cuda"], dtype=torch.uint8))  # the current device's stream


# ---------------------------------------------------------------------------------------------------------------
# Setup helpers
# ---------------------------------------------------------------------------------------------------------------


def validate_args(args: argparse.Namespace) -> None:
    if args.max_src_len >= args.max_len:
        fail(f"--max_src_len ({args.max_src_len}) must be smaller than --max_len ({args.max_len})")
    for flag in ("max_len", "max_src_len", "per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps", "num_train_epochs", "show_loss_step", "lora_dim"):
        if getattr(args, flag) < 1:
            fail(f"--{flag} must be at least 1 (got {getattr(args, flag)})")
    for flag in ("save_model_step", "stop_after_steps", "weight_decay", "save_total_limit"):
        if getattr(args, flag) < 0:
            fail(f"--{flag} must not be negative (got {getattr(args, flag)})")
    if args.learning_rate <= 0:
        fail(f"--learning_rate must be positive (got {args.learning_rate})")
    if not 0 <= args.warmup_ratio < 1:
        fail(f"--warmup_ratio must be in [0, 1) (got {args.warmup_ratio})")
    if not 0 <= args.lora_dropout < 1:
        fail(f"--lora_dropout must be in [0, 1) (got {args.lora_dropout})")

    model_dir = args.model_name_or_path
    if not os.path.isdir(model_dir):
        fail(f"--model_name_or_path {model_dir}: no such directory")
    for needed, what in (("config.json", "config.json"), ("qwen.tiktoken", "the tokenizer vocabulary qwen.tiktoken")):
        if not os.path.isfile(os.path.join(model_dir, needed)):
            fail(f"--model_name_or_path {model_dir}: {what} is missing")
    if not any(os.path.isfile(os.path.join(model_dir, w)) for w in WEIGHT_FILES):
        fail(f"--model_name_or_path {model_dir}: no weights ({' / '.join(WEIGHT_FILES)})")
    try:
        check_model_files(model_dir)
        check_vocabulary(model_dir)
    except ValueError as e:
        fail(str(e))
    for flag in ("train_path", "test_path", "ds_file"):
        path = getattr(args, flag)
        if (path or flag != "test_path") and not os.path.isfile(path):
            fail(f"--{flag} {path}: no such file")
    try:
        check_output_path(args.output_dir, "--output_dir", directory=True)
    except ValueError as e:
        fail(str(e))

    if args.resume_from_checkpoint:
        ckpt = args.resume_from_checkpoint
        if not os.path.isdir(ckpt):
            parent = os.path.dirname(os.path.normpath(ckpt)) or "."
            found = sorted(d for d in os.listdir(parent) if CHECKPOINT_NAME.match(d)) if os.path.isdir(parent) else []
            fail(f"--resume_from_checkpoint {ckpt}: no such directory"
                 + (f"; {parent} holds {', '.join(found)}" if found else ""))
        for needed in ("trainer_state.json", os.path.join(DS_STATE_DIR, DS_STATE_TAG), "rng_state_rank0.json"):
            if not os.path.exists(os.path.join(ckpt, needed)):
                fail(f"--resume_from_checkpoint {ckpt}: {needed} is missing (not a checkpoint of train.py?)")
        for name in ("trainer_state.json", "train_args.json", "rng_state_rank0.json"):
            if os.path.exists(os.path.join(ckpt, name)):
                read_json(os.path.join(ckpt, name))  # a torn or hand-edited file is named now, not at the resume
        check_resume_flags(ckpt, args)
    elif not args.overwrite_output_dir and os.path.isdir(args.output_dir):
        old = [d for d in os.listdir(args.output_dir) if CHECKPOINT_NAME.match(d)]
        if old:
            latest = max(old, key=lambda d: int(CHECKPOINT_NAME.match(d).group(2)))
            fail(f"--output_dir {args.output_dir} already holds {len(old)} checkpoint(s), the latest "
                 f"{latest}; pass --resume_from_checkpoint {os.path.join(args.output_dir, latest)} to continue, "
                 f"--overwrite_output_dir to start over, or another --output_dir")


# What decides the weights a run ends with, beyond the step plan and world size that resume() compares.
RESUME_SAME_FLAGS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "seed", "max_len",
                     "max_src_len", "truncation", "is_skip", "quantization", "precision", "lora_dim", "lora_alpha",
                     "lora_dropout")


def check_resume_flags(checkpoint: str, args: argparse.Namespace) -> None:
    """A resume continues the run exactly, so the flags that decide its result must be the ones it was started
    with (DeepSpeed would silently take a new learning rate mid-schedule, for one), and --stop_after_steps, a total,
    must lie ahead of the checkpoint."""
    path = os.path.join(checkpoint, "train_args.json")
    saved = read_json(path).get("args", {}) if os.path.isfile(path) else {}
    changed = [f"--{k} {saved[k]} -> {getattr(args, k)}" for k in RESUME_SAME_FLAGS
               if k in saved and saved[k] != getattr(args, k)]
    if changed:
        fail(f"--resume_from_checkpoint {checkpoint} was taken with other settings ({'; '.join(changed)}); resume "
             f"it with the same ones, or start a new run")
    step = read_json(os.path.join(checkpoint, "trainer_state.json")).get("global_step", 0)
    if args.stop_after_steps and args.stop_after_steps <= step:
        fail(f"--stop_after_steps {args.stop_after_steps} counts steps in total, and {checkpoint} is already at step "
             f"{step}: nothing to do")


def run_fingerprints(args: argparse.Namespace) -> dict:
    """What the run reads, fingerprinted: the training and test files and the tokenizer's vocabulary by their
    contents (sha256), the base model by `base_model_fingerprint`. Recorded in train_args.json, so that a resume can
    tell that it would continue on other data or another base, where neither the saved position in the data nor
    the adapter would mean what it meant."""
    return {"train_path": file_sha256(args.train_path),
            "test_path": file_sha256(args.test_path) if args.test_path else None,
            "model_name_or_path": base_model_fingerprint(args.model_name_or_path),
            "tokenizer": file_sha256(os.path.join(args.model_name_or_path, "qwen.tiktoken"))}


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


SAMPLE_BYTES = 4096  # read from the start of every tensor (or at evenly spaced places in a .bin)


def base_model_fingerprint(model_dir: str) -> str:
    """A fingerprint of the base weights that reads a few megabytes, not the gigabytes a content hash would.

    It covers config.json, each weight file's size and safetensors header (every tensor's name, dtype, shape and
    offsets) and the first 4 KiB of every tensor's data (1,024 evenly spaced 4 KiB blocks of a .bin file). That is
    enough because what a resume must not meet is another model: another checkpoint of the same shape (Qwen-1.8B
    against Qwen-1.8B-Chat, a merged fine-tune against its base) differs in nearly every element of every tensor it
    changed, so in the bytes read; a model of another shape differs in its header. Only a deliberate edit of bytes
    outside the samples would go unseen.
    """
    digest = hashlib.sha256()
    with open(os.path.join(model_dir, "config.json"), "rb") as f:
        digest.update(f.read())
    shards = weight_shards(model_dir)
    for shard in shards:
        header = safetensors_header(shard)
        size = os.path.getsize(shard)
        digest.update(f"{os.path.basename(shard)}\0{size}\0".encode())
        digest.update(json.dumps(header, sort_keys=True).encode())
        start = size - max((e["data_offsets"][1] for e in header.values()), default=0)  # where the data begins
        with open(shard, "rb") as f:
            for name in sorted(header):
                begin, end = header[name]["data_offsets"]
                f.seek(start + begin)
                digest.update(f.read(min(SAMPLE_BYTES, end - begin)))
    if not shards:  # pickled .bin weights: no header to read, so blocks spread over each file
        for name in sorted(os.listdir(model_dir)):
            if name.endswith(".bin") and name.startswith("pytorch_model"):
                path = os.path.join(model_dir, name)
                size = os.path.getsize(path)
                digest.update(f"{name}\0{size}\0".encode())
                with open(path, "rb") as f:
                    for k in range(1024):
                        f.seek(size * k // 1024)
                        digest.update(f.read(SAMPLE_BYTES))
    return "sampled-sha256:" + digest.hexdigest()


# How each fingerprint is named when a resume finds it changed
FINGERPRINT_NAMES = {"train_path": "the training file --train_path", "test_path": "the test file --test_path",
                     "model_name_or_path": "the base model's weights or config.json (--model_name_or_path)",
                     "tokenizer": "the tokenizer's vocabulary (qwen.tiktoken in --model_name_or_path)"}


def check_resume_fingerprints(checkpoint: str, fingerprints: dict, rank: int = 0) -> None:
    """Refuse a resume whose data, base model or tokenizer differ from those the checkpoint was trained on, naming
    what changed. A checkpoint from before fingerprints were recorded resumes unchecked, with a note."""
    path = os.path.join(checkpoint, "train_args.json")
    saved = read_json(path).get("fingerprints") if os.path.isfile(path) else None
    if not isinstance(saved, dict):
        print_rank_0(f"note: {checkpoint} records no fingerprints of its data and base model (it was taken before "
                     f"train.py recorded them): resuming without checking that they are the same", rank)
        return
    changed = [FINGERPRINT_NAMES.get(key, key) for key, value in fingerprints.items()
               if key in saved and saved[key] != value]
    if changed:
        fail(f"--resume_from_checkpoint {checkpoint} was trained on other inputs: {'; '.join(changed)} "
             f"{'has' if len(changed) == 1 else 'have'} changed since. A resume continues the run exactly, which "
             f"needs the same data, base model and tokenizer; restore them, or start a new run "
             f"(--overwrite_output_dir or another --output_dir)")


def load_ds_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        fail(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})")
    except UnicodeDecodeError:
        fail(f"{path}: not UTF-8 text")
    except RecursionError:
        fail(f"{path}: not valid JSON (nested too deeply)")
    except OSError as e:
        fail(f"--ds_file {path}: cannot read it ({e.strerror})")
    if not isinstance(cfg, dict):
        fail(f"{path}: expected a JSON object")
    return cfg


def init_distributed() -> tuple[int, int, torch.device]:
    """Join (or, for a plain `python train.py`, create) the process group; returns (rank, world size, device)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        # No launcher: become rank 0 of a 1-process group, with the variables DeepSpeed's launcher would have set.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:  # ranks on one machine share its cores instead of oversubscribing
            local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_size))
    else:
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(local_rank))
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    if device.type == "cpu":
        unlink_cpu_allreduce_buffer()
    return dist.get_rank(), dist.get_world_size(), device


def unlink_cpu_allreduce_buffer() -> None:
    """DeepSpeed's CPU accelerator gives each rank of a one-machine group a 69 MB shared-memory allreduce buffer,
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, and never unlinks it: every CPU
    run, even one killed, would leave its buffers in RAM until the machine reboots. Its init maps every peer's buffer
    before it returns, so once all ranks are past it (the barrier) each rank removes its own name; the mappings live
    on until the process exits."""
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    with contextlib.suppress(FileNotFoundError):  # the op was not built, or the ranks span machines
        os.unlink(os.path.join("/dev/shm", name))


def check_output_dir_shared(output_dir: str, rank: int, world_size: int, device: torch.device,
                            wait_s: float = 60.0) -> None:
    """Every rank writes its part of each checkpoint into output_dir and rank 0 renames the whole, so on several
    machines output_dir must be one shared directory: a file rank 0 writes there must become visible to every rank
    (within `wait_s`, which covers NFS's cache of a directory that did not exist a moment ago)."""
    if world_size == 1:
        return
    marker = os.path.join(output_dir, f".shared-check-{os.getpid()}-{time.time_ns()}")
    shared = [marker, ""]  # rank 0's marker path, and its error if it cannot write there
    if rank == 0:
        try:
            os.makedirs(output_dir, exist_ok=True)
            atomic_write_text(marker, "")
        except OSError as e:
            shared[1] = f"--output_dir {output_dir}: cannot write there ({e})"
    dist.broadcast_object_list(shared, src=0)
    marker, error = shared
    if error:
        raise SystemExit(f"train.py: error: {error}")
    deadline = time.monotonic() + wait_s
    while not visible(marker) and time.monotonic() < deadline:
        time.sleep(1.0)
    seen = torch.tensor([1.0 if visible(marker) else 0.0], device=device)
    dist.all_reduce(seen)
    dist.barrier()
    if rank == 0:
        os.remove(marker)
    if seen.item() < world_size:
        raise SystemExit(f"train.py: error: --output_dir {output_dir}: {world_size - int(seen.item())} of "
                         f"{world_size} ranks cannot see files that rank 0 writes there; with several machines it "
                         f"must be on a filesystem they all share (NFS, Lustre, ...)")


def visible(path: str) -> bool:
    """Whether `path` exists, listing its directory first (a listing makes NFS look again)."""
    try:
        return os.path.basename(path) in os.listdir(os.path.dirname(path))
    except OSError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_precision(choice: str, device: torch.device) -> str:
    """bf16 only where the hardware does it natively; fp32 elsewhere (CPU, pre-Ampere GPUs), never fp16."""
    bf16_ok = native_bf16(device)
    if choice == "auto":
        return "bf16" if bf16_ok else "fp32"
    if choice == "bf16" and device.type == "cuda" and not bf16_ok:
        fail("--precision bf16: this GPU does not support bf16")
    return choice


def library_versions() -> dict:
    import bitsandbytes
    import deepspeed
    import peft
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "deepspeed": deepspeed.__version__, "bitsandbytes": bitsandbytes.__version__}


def write_plots(history: dict, output_dir: str) -> None:
    """train_loss.png and test_ppl.png, like the chapter's TensorBoard figures: raw line plus a smoothed one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, column, title, filename in (("train", 1, "train_loss", "train_loss.png"),
                                         ("eval", 1, "test_ppl", "test_ppl.png")):
        rows = history[key]
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


def read_json(path: str) -> dict:
    """The JSON object in `path` (a checkpoint's state and settings); a file that is not one stops the run."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except OSError as e:
        fail(f"{path}: cannot read it ({e.strerror})")
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        fail(f"{path}: not valid JSON ({one_line(e)}); the checkpoint is damaged, resume from another one")
    if not isinstance(value, dict):
        fail(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def to_json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2, default=str) + "\n"


if __name__ == "__main__":
    main()
