"""QLoRA fine-tuning of Qwen-1.8B-Chat under DeepSpeed ZeRO-2: the base is loaded in 4-bit NF4 (double
quantisation), LoRA adapters go on every linear layer but lm_head, and the model learns to answer the medical
extraction prompt with the eight fields as JSON. Checkpoints hold the adapter (safetensors), the tokenizer, the
resolved settings and the state needed to resume exactly.

The chapter's command, on one or many GPUs (add --hostfile for many machines; output_dir must then be shared):

    deepspeed train.py --train_path data/train.json --test_path data/test.json \\
        --model_name_or_path Qwen-1_8-chat --per_device_train_batch_size 2 --max_len 2048 --max_src_len 1560 \\
        --learning_rate 1e-4 --weight_decay 0.1 --num_train_epochs 3 --gradient_accumulation_steps 4 \\
        --warmup_ratio 0.03 --seed 1234 --show_loss_step 10 --lora_dim 16 --lora_alpha 64 --save_model_step 100 \\
        --lora_dropout 0.1 --output_dir ./output_dir_qlora --gradient_checkpointing \\
        --ds_file ds_zero2_no_offload.json --is_skip

The same script and flags also run as two CPU ranks over gloo, `DS_ACCELERATOR=cpu deepspeed --num_gpus 2 train.py ...`,
and as one process without the launcher, `python train.py ...` (CPU or GPU). Resume an interrupted run with
`--resume_from_checkpoint ./output_dir_qlora/epoch-1-step-200` and otherwise the same flags.

Fields of your own: `--schema my_schema.json` (the file data_helper.py split the data with) trains the model to
answer that schema's fields; the run and every checkpoint keep it as schema.json, which merge_params.py, predict.py,
serve.py and the rest then read by themselves.

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
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from medextract.checkpoints import (TrainState, check_resume_checkpoint, check_resume_fingerprints, checkpoint_step,
                                    clear_run_outputs, list_checkpoints, prune_checkpoints, restore_rank_state, resume,
                                    read_checkpoint_json, run_fingerprints, save_checkpoint, saved_args,
                                    saved_step, to_json, write_best_checkpoint)
from medextract.cli import add_lora_args, add_schema_argument
from medextract.distributed import check_output_dir_shared, init_distributed
from medextract.errors import MedextractError, OutputError
from medextract.evaluation import (F1Evaluation, answer_share, f1_summary, gather_answers, load_f1_evaluation,
                                   score_answers)
from medextract.grammar import build_vocabulary
from medextract.inference import MIN_CONSTRAINED_TOKENS, Truncation
from medextract.model_files import check_model_files, check_vocabulary, has_random_weights
from medextract.qlora import QLoRASettings, build_model, precision_note, resolve_precision
from medextract.schema import CHAPTER_SCHEMA, SCHEMA_FILE, Schema, check_samples, load_schema, model_schema
from medextract.training import (OptimizerSettings, ResumableDistributedSampler, StepPlan, build_ds_config,
                                 build_engine, library_versions, load_ds_json, model_inputs, write_plots)
from utils import (IGNORE_INDEX, TRUNCATIONS, WEIGHT_FILES, DataCollator, HelpFormatter, QwenPromptDataSet,
                   atomic_write_text, check_output_path, fail, load_tokenizer, log_rank_0, one_line, print_rank_0,
                   return_freed_memory, set_random_seed, silence_library_deprecations)

PROG = "train.py"


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
    add_schema_argument(data, help="the schema file data_helper.py split the data with (fields of your own); saved "
                                   "in the run and its checkpoints as schema.json; default: the chapter's eight fields")

    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", default="Qwen-1_8-chat",
                       help="checkpoint dir: config.json, weights, qwen.tiktoken, generation_config.json")
    model.add_argument("--quantization", choices=("nf4", "none"), default="nf4",
                       help="nf4: QLoRA on a 4-bit NF4 base with double quantisation; none: plain LoRA")
    model.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                       help="compute dtype; auto = bf16 where the hardware computes it natively (Ampere and later "
                            "GPUs, CPUs with AVX512-BF16 or AMX), else fp32 (older GPUs, other CPUs)")
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
    run.add_argument("--select_by", choices=("f1", "ppl"), default="f1",
                     help="what picks the best checkpoint (best_checkpoint.json, which merge_params.py merges): f1 = "
                          "extraction F1 of the test set's answers, generated at each evaluation as predict.py would "
                          "(grounded, greedy); ppl = test perplexity alone, no generation (faster)")
    run.add_argument("--eval_max_new_tokens", type=int, default=512,
                     help="with --select_by f1: most new tokens per test answer (predict.py's --max_tgt_len)")
    run.add_argument("--eval_samples", type=int, default=0,
                     help="with --select_by f1: answer only the first N test records (bounds the cost on a large "
                          "test set); 0 = all")
    run.add_argument("--eval_generation_batch_size", type=int, default=8,
                     help="with --select_by f1: test answers generated together per rank")
    run.add_argument("--save_total_limit", type=int, default=0,
                     help="keep only the N newest checkpoints, plus the best one; 0 = keep all (a 1.8B "
                          "checkpoint is ~0.28 GB: the adapter and its fp32 Adam state)")
    run.add_argument("--resume_from_checkpoint", default="",
                     help="a checkpoint dir of this run (epoch-E-step-G) to continue from exactly; by default a new "
                          "run")
    run.add_argument("--stop_after_steps", type=int, default=0,
                     help="stop after this many optimizer steps in total, as if interrupted (the schedule still "
                          "spans all epochs); 0 = run to the end")
    run.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher; LOCAL_RANK wins")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    silence_library_deprecations()
    try:
        run_training(args)
    except MedextractError as e:  # the library names what is wrong in one line
        fail(PROG, e)
    except OSError as e:  # a write that failed (a full disk): atomic_write_text names its file, and left no half
        if not e.filename:
            raise
        fail(PROG, f"{e.filename}: cannot write it ({e.strerror}); the checkpoints saved before are kept")


def run_training(args: argparse.Namespace) -> None:
    # Everything that can be wrong with the inputs is checked before the process group exists.
    validate_args(args)
    schema = load_schema(args.schema) if args.schema else CHAPTER_SCHEMA
    fingerprints = run_fingerprints(args.train_path, args.test_path, args.model_name_or_path)
    if args.resume_from_checkpoint:
        check_resume_schema(args.resume_from_checkpoint, schema)
        check_resume_fingerprints(args.resume_from_checkpoint, fingerprints, rank=int(os.environ.get("RANK", "0")))
    ds_template = load_ds_json(args.ds_file)
    try:
        tokenizer = load_tokenizer(args.model_name_or_path)
    except (OSError, ValueError) as e:
        fail(PROG, f"--model_name_or_path {args.model_name_or_path}: cannot load the tokenizer ({one_line(e)})")
    train_set, test_set = build_datasets(args, tokenizer, schema, rank=int(os.environ.get("RANK", "0")))
    f1_evaluation = None
    if args.select_by == "f1" and args.test_path:
        f1_evaluation = load_f1_evaluation(args.test_path, args.eval_samples, args.eval_max_new_tokens,
                                           Truncation(args.max_len, args.max_src_len, args.truncation),
                                           args.eval_generation_batch_size, schema)

    rank, world_size, device = init_distributed()
    return_freed_memory(device)  # batches of every length: in bf16 on a CPU, glibc would keep each one's blocks
    check_output_dir_shared(args.output_dir, rank, world_size, device)
    precision = resolve_precision(args.precision, device)
    if note := precision_note(args.precision, precision, device):
        print_rank_0(note, rank)
    if args.resume_from_checkpoint:
        check_resume_precision(args.resume_from_checkpoint, args.precision, precision)
    set_random_seed(args.seed)  # the same LoRA init on every rank
    train_loader, train_sampler, test_loader = build_dataloaders(args, train_set, test_set, tokenizer, rank,
                                                                 world_size)
    plan = StepPlan(micro_batches_per_epoch=len(train_loader), gas=args.gradient_accumulation_steps,
                    epochs=args.num_train_epochs, warmup_ratio=args.warmup_ratio)
    ds_config = build_ds_config(ds_template, optimizer_settings_of(args), world_size, precision, plan, args.ds_file)
    model = build_model(qlora_settings_of(args), precision, device)
    run_info = describe_run(args, model, ds_config, plan, world_size, device, precision, train_set, test_set, rank,
                            fingerprints, schema)
    engine = build_engine(model, ds_config)

    state = TrainState()
    if args.resume_from_checkpoint:
        state = resume(engine, args.resume_from_checkpoint, plan, world_size, rank, args.group_by_length)
    set_random_seed(args.seed + rank)  # dropout differs across ranks; a resume restores the saved streams below
    loss_window = torch.zeros(2, dtype=torch.float64, device=device)  # this rank's unlogged (loss sum, count)
    if args.resume_from_checkpoint:
        loss_window += torch.tensor(restore_rank_state(args.resume_from_checkpoint, rank), dtype=torch.float64,
                                    device=device)

    writer = None
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        clear_run_outputs(args.output_dir, best_record(state, args.select_by) if state.best else None,
                          resumed=bool(args.resume_from_checkpoint))
        atomic_write_text(os.path.join(args.output_dir, "train_args.json"), to_json(run_info))
        atomic_write_text(os.path.join(args.output_dir, SCHEMA_FILE), schema.text())
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"),
                               purge_step=state.global_step + 1 if state.global_step else None)
    ctx = RunContext(args=args, plan=plan, engine=engine, tokenizer=tokenizer, device=device, rank=rank,
                     world_size=world_size, test_loader=test_loader, writer=writer, run_info=run_info,
                     loss_window=loss_window, f1_evaluation=f1_evaluation, schema=schema)

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
# Arguments and their checks
# ---------------------------------------------------------------------------------------------------------------


def validate_args(args: argparse.Namespace) -> None:
    if args.max_src_len >= args.max_len:
        fail(PROG, f"--max_src_len ({args.max_src_len}) must be smaller than --max_len ({args.max_len})")
    for flag in ("max_len", "max_src_len", "per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps", "num_train_epochs", "show_loss_step", "lora_dim"):
        if getattr(args, flag) < 1:
            fail(PROG, f"--{flag} must be at least 1 (got {getattr(args, flag)})")
    for flag in ("save_model_step", "stop_after_steps", "weight_decay", "save_total_limit"):
        if getattr(args, flag) < 0:
            fail(PROG, f"--{flag} must not be negative (got {getattr(args, flag)})")
    if args.select_by == "f1" and args.test_path:  # (no test file: no evaluation at all)
        if args.eval_max_new_tokens < MIN_CONSTRAINED_TOKENS:
            fail(PROG, f"--eval_max_new_tokens must be at least {MIN_CONSTRAINED_TOKENS} (the empty answer alone "
                       f"takes 46 tokens), got {args.eval_max_new_tokens}")
        if args.eval_samples < 0 or args.eval_generation_batch_size < 1:
            fail(PROG, "--eval_samples must not be negative and --eval_generation_batch_size at least 1")
    if args.learning_rate <= 0:
        fail(PROG, f"--learning_rate must be positive (got {args.learning_rate})")
    if not 0 <= args.warmup_ratio < 1:
        fail(PROG, f"--warmup_ratio must be in [0, 1) (got {args.warmup_ratio})")
    if not 0 <= args.lora_dropout < 1:
        fail(PROG, f"--lora_dropout must be in [0, 1) (got {args.lora_dropout})")

    model_dir = args.model_name_or_path
    if not os.path.isdir(model_dir):
        fail(PROG, f"--model_name_or_path {model_dir}: no such directory")
    for needed, what in (("config.json", "config.json"), ("qwen.tiktoken", "the tokenizer vocabulary qwen.tiktoken")):
        if not os.path.isfile(os.path.join(model_dir, needed)):
            fail(PROG, f"--model_name_or_path {model_dir}: {what} is missing")
    if not any(os.path.isfile(os.path.join(model_dir, w)) for w in WEIGHT_FILES):
        fail(PROG, f"--model_name_or_path {model_dir}: no weights ({' / '.join(WEIGHT_FILES)})")
    try:
        check_model_files(model_dir)
        check_vocabulary(model_dir)
    except ValueError as e:
        fail(PROG, e)
    for flag in ("train_path", "test_path", "ds_file"):
        path = getattr(args, flag)
        if (path or flag != "test_path") and not os.path.isfile(path):
            fail(PROG, f"--{flag} {path}: no such file")
    try:
        check_output_path(args.output_dir, "--output_dir", directory=True)
    except ValueError as e:
        fail(PROG, e)

    if args.resume_from_checkpoint:
        check_resume_checkpoint(args.resume_from_checkpoint)
        check_resume_flags(args.resume_from_checkpoint, args)
    elif not args.overwrite_output_dir:
        old = list_checkpoints(args.output_dir)
        if old:
            latest = max(old, key=checkpoint_step)
            fail(PROG, f"--output_dir {args.output_dir} already holds {len(old)} checkpoint(s), the latest {latest}; "
                       f"pass --resume_from_checkpoint {os.path.join(args.output_dir, latest)} to continue, "
                       f"--overwrite_output_dir to start over, or another --output_dir")


# What decides the weights a run ends with, beyond the step plan and world size that resume() compares, and the
# precision, compared once resolved (check_resume_precision): auto and the dtype it resolves to train alike.
RESUME_SAME_FLAGS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "seed", "max_len",
                     "max_src_len", "truncation", "is_skip", "quantization", "lora_dim", "lora_alpha", "lora_dropout",
                     "select_by", "eval_max_new_tokens", "eval_samples")


def check_resume_flags(checkpoint: str, args: argparse.Namespace) -> None:
    """A resume continues the run exactly, so the flags that decide its result must be the ones it was started
    with (DeepSpeed would silently take a new learning rate mid-schedule, for one), and --stop_after_steps, a total,
    must lie ahead of the checkpoint."""
    saved = saved_args(checkpoint)
    changed = [f"--{k} {saved[k]} -> {getattr(args, k)}" for k in RESUME_SAME_FLAGS
               if k in saved and saved[k] != getattr(args, k)]
    if changed:
        fail(PROG, f"--resume_from_checkpoint {checkpoint} was taken with other settings ({'; '.join(changed)}); "
                   f"resume it with the same ones, or start a new run")
    step = saved_step(checkpoint)
    if args.stop_after_steps and args.stop_after_steps <= step:
        fail(PROG, f"--stop_after_steps {args.stop_after_steps} counts steps in total, and {checkpoint} is already "
                   f"at step {step}: nothing to do")


def check_resume_schema(checkpoint: str, schema: Schema) -> None:
    """A run goes on with the fields it was started with (a checkpoint without schema.json had the chapter's)."""
    try:
        taken = model_schema(checkpoint) or CHAPTER_SCHEMA
    except MedextractError as e:
        fail(PROG, f"--resume_from_checkpoint {checkpoint}: {e}")
    if taken != schema:
        fail(PROG, f"--resume_from_checkpoint {checkpoint} was trained with another schema ({taken.describe()}) than "
                   f"this run's ({schema.describe()}); resume with the --schema it was started with, or start a new "
                   f"run")


def check_resume_precision(checkpoint: str, choice: str, precision: str) -> None:
    """`--precision auto` resolves on the machine at hand, so the same flag can mean fp32 where the run began (a CPU
    without native bf16, or a train.py from before auto took bf16 on CPUs) and bf16 here; a resume continues in the
    precision the checkpoint was trained in, or not at all."""
    path = os.path.join(checkpoint, "train_args.json")
    saved = read_checkpoint_json(path).get("precision") if os.path.isfile(path) else None
    if saved is not None and saved != precision:
        fail(PROG, f"--resume_from_checkpoint {checkpoint} was trained in {saved}, and --precision {choice} is "
                   f"{precision} here; pass --precision {saved} to resume it")


def qlora_settings_of(args: argparse.Namespace) -> QLoRASettings:
    """The model the flags describe: the base, its quantization, activation checkpointing and the adapter."""
    return QLoRASettings(model_name_or_path=args.model_name_or_path, quantization=args.quantization,
                         gradient_checkpointing=args.gradient_checkpointing, lora_dim=args.lora_dim,
                         lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)


def optimizer_settings_of(args: argparse.Namespace) -> OptimizerSettings:
    """The optimisation flags that fill the DeepSpeed JSON's "auto" fields (with the step plan)."""
    return OptimizerSettings(micro_batch_size=args.per_device_train_batch_size, learning_rate=args.learning_rate,
                             weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon)


# ---------------------------------------------------------------------------------------------------------------
# Data and the record of the run
# ---------------------------------------------------------------------------------------------------------------


def build_datasets(args: argparse.Namespace, tokenizer, schema: Schema = CHAPTER_SCHEMA, rank: int = 0):
    try:
        for path in (args.train_path, args.test_path):
            if path:
                check_samples(path, schema)
        train_set = QwenPromptDataSet(args.train_path, tokenizer, args.max_len, args.max_src_len, args.is_skip, rank,
                                      args.truncation)
        # The test set keeps truncated samples: the chapter's silent exclusion made its PPL cover 49 of 50.
        test_set = (QwenPromptDataSet(args.test_path, tokenizer, args.max_len, args.max_src_len, False, rank,
                                      args.truncation) if args.test_path else None)
    except ValueError as e:
        fail(PROG, e)
    if len(train_set) == 0:
        fail(PROG, f"{args.train_path}: every sample was skipped (--is_skip with --max_len {args.max_len})")
    return train_set, test_set


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


def describe_run(args, model, ds_config, plan, world_size, device, precision, train_set, test_set, rank,
                 fingerprints: dict | None = None, schema: Schema = CHAPTER_SCHEMA) -> dict:
    """The resolved settings, printed as counts and saved as train_args.json beside every checkpoint, with the
    fingerprints of what the run reads (run_fingerprints), which a resume must find unchanged."""
    trainable, total = model.get_nb_trainable_parameters()  # 4-bit weights counted at their logical size
    print_rank_0(f"trainable params: {trainable:,} || all params: {total:,} || "
                 f"trainable%: {100 * trainable / total:.4f}", rank)
    print_rank_0(f"train samples {len(train_set)} ({train_set.skipped} skipped) | micro-batches per epoch per rank "
                 f"{plan.micro_batches_per_epoch} | optimizer steps {plan.total_steps} "
                 f"({plan.steps_per_epoch} per epoch) | warmup {plan.warmup_steps} | world size {world_size} | "
                 f"{precision} on {device.type}", rank)
    if not schema.is_chapter:
        print_rank_0(f"schema: {len(schema.fields)} fields ({schema.describe()}) from --schema {args.schema}", rank)
    if has_random_weights(args.model_name_or_path):
        print_rank_0("note: the base model has random weights (make_tiny): perplexity near the vocabulary size "
                     "(~150,000) and F1 near 0 are expected", rank)
    return {"args": vars(args), "ds_config": ds_config, "world_size": world_size, "device": device.type,
            "precision": precision, "quantization": args.quantization,
            "bnb_4bit_compute_dtype": precision if args.quantization == "nf4" else None,
            "micro_batches_per_epoch": plan.micro_batches_per_epoch, "optimizer_steps_per_epoch": plan.steps_per_epoch,
            "total_optimizer_steps": plan.total_steps, "warmup_steps": plan.warmup_steps,
            "trainable_params": trainable, "all_params": total, "train_samples": len(train_set),
            "train_skipped": train_set.skipped, "test_samples": len(test_set) if test_set is not None else 0,
            "fingerprints": fingerprints, "schema": schema.to_json(), "versions": library_versions()}


# ---------------------------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------------------------


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
    f1_evaluation: F1Evaluation | None = None  # with --select_by f1: the test records to answer and score
    vocabulary: object = None  # the answer grammar's, built at the first F1 evaluation
    schema: Schema = CHAPTER_SCHEMA  # the fields the model learns, saved with every checkpoint


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
            break  # (at an epoch end run_training() saves first, then stops)
    bar.close()


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
    carried = {SCHEMA_FILE: ctx.schema.text()}  # files the checkpoint carries: its schema, test answers and report
    if ctx.test_loader is not None:
        ppl = evaluate(ctx.engine, ctx.test_loader, ctx.device)
        state.history["eval"].append([state.global_step, ppl])
        f1 = None
        if ctx.f1_evaluation is not None:
            summary, answers = evaluate_f1(ctx)
            carried.update(answers)
            f1 = summary["f1"]
            state.history.setdefault("f1", []).append([state.global_step, f1, summary["list_micro_f1"]])
        best_f1 = state.best.get("f1") if state.best is not None else None
        if state.best is None or (f1 > (-1.0 if best_f1 is None else best_f1) if f1 is not None
                                  else ppl < state.best["ppl"]):
            state.best = {"path": path, "step": state.global_step, "ppl": ppl, "f1": f1}  # ties: the earliest
        if ctx.rank == 0:
            ctx.writer.add_scalar("test_ppl", ppl, state.global_step)
            scores = f" | test_ppl {ppl:.4f}"
            if f1 is not None:
                scores += (f" | f1 {f1:.4f} | list_f1 {summary['list_micro_f1']:.4f} | "
                           + " ".join(f"{key} {value:.3f}" for key, value in summary["fields"].items())
                           + f" | answered in {summary['seconds']:.1f} s")
                ctx.writer.add_scalar("test_f1/macro", f1, state.global_step)
                ctx.writer.add_scalar("test_f1/list_micro", summary["list_micro_f1"], state.global_step)
                for key, value in summary["fields"].items():
                    ctx.writer.add_scalar(f"test_f1/{key}", value, state.global_step)
            best = state.best["f1"] if f1 is not None else state.best["ppl"]
            log_rank_0(f"eval | epoch {state.epoch}/{ctx.plan.epochs} | step {state.global_step}/"
                       f"{ctx.plan.total_steps}{scores} | best {ctx.args.select_by} {best:.4f} at step "
                       f"{state.best['step']}", ctx.rank)
    state.last_saved_step = state.global_step
    try:
        save_checkpoint(ctx.engine, ctx.tokenizer, ctx.args.output_dir, name, state, ctx.plan, ctx.run_info,
                        ctx.loss_window, ctx.rank, ctx.world_size, carried)
    except (OSError, RuntimeError) as e:  # a full disk, say (torch reports it as a RuntimeError of its writer)
        if isinstance(e, RuntimeError) and "writ" not in str(e).lower():
            raise
        raise OutputError(f"{path}: cannot write the checkpoint ({getattr(e, 'strerror', None) or one_line(e)}); "
                          f"the checkpoints saved before are kept (the next run removes this one's temporary "
                          f".tmp-{name}), and --resume_from_checkpoint continues from the latest") from None
    if ctx.rank == 0:
        if state.best is not None:
            write_best_checkpoint(ctx.args.output_dir, best_record(state, ctx.args.select_by))
        if ctx.args.save_total_limit:
            prune_checkpoints(ctx.args.output_dir, ctx.args.save_total_limit, state.best, name)
        ctx.writer.flush()


def evaluate_f1(ctx: RunContext) -> tuple[dict, dict[str, str]]:
    """The test set answered by the model as it stands (each rank its share, rank 0 gathers and scores): the F1
    summary on every rank, and on rank 0 the files the checkpoint carries (eval_predictions.jsonl, eval_report.json)."""
    started = time.perf_counter()
    if ctx.vocabulary is None:
        ctx.vocabulary = build_vocabulary(ctx.tokenizer, ctx.engine.module.config.vocab_size)
    ctx.engine.eval()
    records = answer_share(ctx.engine.module, ctx.tokenizer, ctx.vocabulary, ctx.f1_evaluation, ctx.rank,
                           ctx.world_size)
    ctx.engine.train()
    gathered = gather_answers(records, ctx.rank, ctx.world_size)
    carried, message = {}, [None]
    if ctx.rank == 0:
        report = score_answers(ctx.f1_evaluation, gathered)
        message = [{**f1_summary(report), "seconds": time.perf_counter() - started}]
        carried = {"eval_predictions.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in gathered),
                   "eval_report.json": json.dumps(report, ensure_ascii=False, indent=2) + "\n"}
    if ctx.world_size > 1:
        dist.broadcast_object_list(message, src=0)  # every rank picks the same best checkpoint
    return message[0], carried


def best_record(state: TrainState, select_by: str) -> dict:
    """best_checkpoint.json: the best checkpoint by `select_by`, and both metrics of every evaluation so far."""
    f1_at = {row[0]: row[1] for row in state.history.get("f1", [])}
    evaluations = [{"step": step, "ppl": ppl, "f1": f1_at.get(step)} for step, ppl in state.history["eval"]]
    return {**state.best, "select_by": select_by, "evaluations": evaluations}


def should_stop(args: argparse.Namespace, state: TrainState) -> bool:
    return bool(args.stop_after_steps) and state.global_step >= args.stop_after_steps


def finish(ctx: RunContext, state: TrainState) -> None:
    if ctx.rank == 0:
        ctx.writer.close()
        try:
            write_plots(state.history, ctx.args.output_dir)
        except OSError as e:
            raise OutputError(f"{e.filename or ctx.args.output_dir}: cannot draw the plots ({e.strerror}); the "
                              f"checkpoints are saved") from None
        if state.best is not None:
            best = state.best
            f1 = f", test F1 {best['f1']:.4f}" if best.get("f1") is not None else ""
            print_rank_0(f"best checkpoint: {best['path']} (step {best['step']}, test ppl {best['ppl']:.4f}{f1})")
        print_rank_0(f"done: {state.global_step}/{ctx.plan.total_steps} optimizer steps; outputs in "
                     f"{ctx.args.output_dir}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
