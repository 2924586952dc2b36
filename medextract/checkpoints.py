"""train.py's checkpoints: how they are named, written, pruned and resumed from, and what a resume must find unchanged.

A checkpoint, output_dir/epoch-E-step-G (G = optimizer steps so far), holds the adapter (safetensors) with its
config, the tokenizer files, the run's resolved settings (train_args.json), its counters (trainer_state.json), each
rank's RNG streams and unlogged loss window (rng_state_rank{r}.json) and DeepSpeed's own state (deepspeed/state/:
adapter, optimizer and scheduler; ZeRO-2 writes one optimizer file per rank). Beside the checkpoints, of one run:
best_checkpoint.json (what merge_params.py merges), the plots and the TensorBoard events.

A resume continues the run exactly, so it is refused where the checkpoint's data, base model or tokenizer changed
(fingerprints recorded in train_args.json), and DeepSpeed's state is unpickled with weights_only=True.
Every function raises the typed errors of medextract.errors; nothing here exits the process.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from utils import apply_usual_permissions, atomic_write_text, log_rank_0, print_rank_0

from .errors import ConfigError, InputError
from .model_files import has_random_weights, read_json_object, safetensors_header, weight_shards

if TYPE_CHECKING:
    from .training import StepPlan

CHECKPOINT_NAME = re.compile(r"^epoch-(\d+)-step-(\d+)$")  # output_dir/epoch-E-step-G, G = optimizer steps so far
DS_STATE_DIR, DS_STATE_TAG = "deepspeed", "state"  # DeepSpeed's optimizer/scheduler state in each checkpoint
BEST_CHECKPOINT = "best_checkpoint.json"  # beside the checkpoints: {"path", "step", "ppl"} of the best so far
RUN_OUTPUTS = (BEST_CHECKPOINT, "train_loss.png", "test_ppl.png", "test_f1.png")  # beside the checkpoints, of one run


@dataclass
class TrainState:
    """Counters that a checkpoint records, so a resume continues from the same place."""

    epoch: int = 1  # 1-based, as in the checkpoint names
    micro_in_epoch: int = 0  # micro-batches of this epoch already applied
    global_step: int = 0  # optimizer steps taken
    last_saved_step: int = -1
    best: dict | None = None  # {"path", "step", "ppl", "f1"}
    # [step, loss, lr], [step, ppl], and with --select_by f1 [step, macro F1, list micro F1]
    history: dict = field(default_factory=lambda: {"train": [], "eval": [], "f1": []})


def checkpoint_step(name: str) -> int:
    """G of a checkpoint named epoch-E-step-G."""
    return int(CHECKPOINT_NAME.match(name).group(2))


def list_checkpoints(directory: str) -> list[str]:
    """The names in `directory` that are checkpoint names, sorted by name; [] if it is not a directory."""
    return sorted(d for d in os.listdir(directory) if CHECKPOINT_NAME.match(d)) if os.path.isdir(directory) else []


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def save_checkpoint(engine, tokenizer, output_dir: str, name: str, state: TrainState, plan: StepPlan, run_info: dict,
                    loss_window: torch.Tensor, rank: int, world_size: int,
                    carried: dict[str, str] | None = None) -> None:
    """output_dir/`name`/: adapter_model.safetensors + adapter_config.json, tokenizer files, train_args.json
    (`run_info`), trainer_state.json, rng_state_rank{r}.json (the rank's RNG streams and unlogged `loss_window`)
    and deepspeed/state/ (DeepSpeed's adapter, optimizer and scheduler state; ZeRO-2 writes one optimizer file per
    rank), and on rank 0 the text files in `carried` ({name: text}: the evaluation's answers and report). Every rank
    calls it. Written under a temporary name and renamed, so a crash leaves no half checkpoint."""
    final = os.path.join(output_dir, name)
    tmp = os.path.join(output_dir, f".tmp-{name}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    engine.save_checkpoint(os.path.join(tmp, DS_STATE_DIR), tag=DS_STATE_TAG, save_latest=False,
                           exclude_frozen_parameters=True)  # the frozen base is not copied into checkpoints
    atomic_write_text(rank_state_path(tmp, rank), json.dumps({**get_rng_state(), "loss_window": loss_window.tolist()}))
    if rank == 0:
        engine.module.save_pretrained(tmp, safe_serialization=True)
        # ours in place of PEFT's empty template ("Model Card for Model ID")
        atomic_write_text(os.path.join(tmp, "README.md"), model_card(final, run_info, state, adapter_targets(tmp)))
        tokenizer.save_pretrained(tmp)
        atomic_write_text(os.path.join(tmp, "train_args.json"), to_json(run_info))
        atomic_write_text(os.path.join(tmp, "trainer_state.json"),
                          to_json({**asdict(state), "plan": asdict(plan), "world_size": world_size}))
        for filename, text in (carried or {}).items():
            atomic_write_text(os.path.join(tmp, filename), text)
    dist.barrier()
    if rank == 0:
        apply_usual_permissions(tmp)  # safetensors writes the adapter 0600
        if os.path.exists(final):  # left by an abandoned run past the point this one resumed from
            shutil.rmtree(final)
        os.replace(tmp, final)
        log_rank_0(f"saved {final}", rank)
    dist.barrier()


def adapter_targets(checkpoint: str) -> list[str]:
    """The layer names the adapter in `checkpoint` wraps (adapter_config.json's target_modules)."""
    with open(os.path.join(checkpoint, "adapter_config.json"), encoding="utf-8") as f:
        targets = json.load(f).get("target_modules") or []
    return sorted(targets) if isinstance(targets, list) else [str(targets)]


def model_card(path: str, run_info: dict, state: TrainState, targets: list[str]) -> str:
    """README.md of the checkpoint at `path`: what it is, how it was trained (from train_args.json), its test metrics
    when this step was evaluated, and how to merge and use it."""
    args = run_info["args"]
    base = args["model_name_or_path"]
    step, total = state.global_step, run_info["total_optimizer_steps"]
    ppl = next((row[1] for row in state.history.get("eval", []) if row[0] == step), None)
    f1 = next((row[1:] for row in state.history.get("f1", []) if row[0] == step), None)
    metrics = []
    if ppl is not None:
        metrics.append(f"- test perplexity (token-weighted): {ppl:.4f}")
    if f1 is not None:
        fields = (run_info.get("schema") or {}).get("fields") or [None] * 8
        metrics.append(f"- extraction F1 on the test set: macro {f1[0]:.4f} over the {len(fields)} fields, list micro "
                       f"{f1[1]:.4f} (answers and per-field report: eval_predictions.jsonl, eval_report.json)")
    if not metrics:
        metrics.append("- not evaluated (train.py ran without a test file)")
    if has_random_weights(base):
        metrics.append("- the base has random weights (qwen1_8.make_tiny): these figures show the pipeline, not "
                       "extraction quality")
    best = state.best or {}
    if best.get("step") == step:
        metrics.append("- the best checkpoint of the run so far (best_checkpoint.json)")
    ranks = run_info["world_size"]
    rows = [("base model", f"`{base}` (train.py's --model_name_or_path, as given)"),
            ("epochs", f"{args['num_train_epochs']} (this is epoch {state.epoch}, optimizer step {step} of {total})"),
            ("learning rate", f"{args['learning_rate']:g} peak, linear warmup over {run_info['warmup_steps']} steps "
                              f"then linear decay to 0; weight decay {args['weight_decay']:g}"),
            ("batch", f"{args['per_device_train_batch_size']} per rank × {args['gradient_accumulation_steps']} "
                      f"accumulation × {ranks} rank(s)"),
            ("LoRA", f"r {args['lora_dim']}, alpha {args['lora_alpha']}, dropout {args['lora_dropout']:g}, on "
                     f"{', '.join(targets)}"),
            ("quantization", "4-bit NF4 base with double quantisation (QLoRA)" if run_info["quantization"] == "nf4"
             else "none (plain LoRA on the unquantized base)"),
            ("precision", f"{run_info['precision']} on {run_info['device']}"),
            ("world size", str(ranks)),
            ("fields", ", ".join(f"{f['name']} ({f['kind']})" for f in run_info["schema"]["fields"])
             if run_info.get("schema") else "the chapter's eight"),
            ("data", f"{run_info['train_samples']} training samples ({args['train_path']}), "
                     f"{run_info['test_samples']} test samples, --max_len {args['max_len']}, --max_src_len "
                     f"{args['max_src_len']}, seed {args['seed']}")]
    run_dir = os.path.dirname(path)
    return "\n".join([
        f"# LoRA adapter {os.path.basename(path)}",
        "",
        "A LoRA adapter written by this project's train.py (QLoRA fine-tuning of Qwen-1.8B-Chat to extract the eight "
        "medical elements of a Chinese doctor–patient dialogue as JSON, chapter 7 of 《大型语言模型实战指南》), for "
        f"the base model `{base}`. It is not a model by itself: merge it into that base, or let predict.py put it on "
        "the base unmerged.",
        "",
        "## How it was trained",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in rows),
        "",
        "All resolved settings are in train_args.json; trainer_state.json and deepspeed/ let "
        "`--resume_from_checkpoint` continue the run exactly.",
        "",
        "## At this checkpoint",
        "",
        *metrics,
        "",
        "## Use",
        "",
        "```bash",
        f"python merge_params.py --ori_model_dir {base} --model_dir {path} --save_model_dir {run_dir}/merged",
        f"python predict.py --model_path {run_dir}/merged",
        f"python predict.py --model_path {path}   # unmerged, from the directory train.py ran in",
        "```",
        "",
    ])


def rank_state_path(checkpoint: str, rank: int) -> str:
    return os.path.join(checkpoint, f"rng_state_rank{rank}.json")


def write_best_checkpoint(output_dir: str, best: dict) -> None:
    """best_checkpoint.json: {"path", "step", "ppl", "f1", ...} of the best checkpoint so far (merge_params.py merges
    its "path")."""
    atomic_write_text(os.path.join(output_dir, BEST_CHECKPOINT), to_json(best))


def clear_run_outputs(output_dir: str, best: dict | None, resumed: bool) -> None:
    """Rank 0, before the first step: no file beside the checkpoints may speak of another run. A new run (into a
    directory started over with --overwrite_output_dir, say) removes the last run's best_checkpoint.json, which
    merge_params.py would otherwise merge, its plots and its TensorBoard events; a resume rewrites
    best_checkpoint.json from the checkpoint, since a run abandoned past that point may have recorded a later one.
    Either way, what a killed run left half-made (a checkpoint or plot under its temporary .tmp- name) goes."""
    for name in os.listdir(output_dir):
        if name.startswith(".tmp-") and (CHECKPOINT_NAME.match(name[len(".tmp-"):]) or name.endswith(".png")):
            path = os.path.join(output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if not resumed:
        for name in RUN_OUTPUTS:
            if os.path.isfile(os.path.join(output_dir, name)):
                os.remove(os.path.join(output_dir, name))
        events = os.path.join(output_dir, "tensorboard")
        for name in os.listdir(events) if os.path.isdir(events) else []:
            if name.startswith("events.out.tfevents."):
                os.remove(os.path.join(events, name))
    elif best is not None:
        write_best_checkpoint(output_dir, best)
    elif os.path.isfile(os.path.join(output_dir, BEST_CHECKPOINT)):
        os.remove(os.path.join(output_dir, BEST_CHECKPOINT))


def prune_checkpoints(output_dir: str, keep: int, best: dict | None, saved: str) -> list[str]:
    """Delete all but the `keep` newest epoch-E-step-G checkpoints of output_dir up to the one just `saved`, never
    that one nor the best; returns the names deleted. Checkpoints past `saved` (from a run this one resumed before
    the end of, or one started over with --overwrite_output_dir) are not this run's to judge and stay."""
    current = checkpoint_step(saved)
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


def to_json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2, default=str) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------------------------------


def check_resume_checkpoint(checkpoint: str, flag: str = "--resume_from_checkpoint") -> None:
    """Before anything loads: `checkpoint` is a train.py checkpoint whose state files can be read (a torn or
    hand-edited file is named now, not at the resume); a mistyped one is answered with the checkpoints there are."""
    if not os.path.isdir(checkpoint):
        parent = os.path.dirname(os.path.normpath(checkpoint)) or "."
        found = list_checkpoints(parent)
        raise ConfigError(f"{flag} {checkpoint}: no such directory"
                          + (f"; {parent} holds {', '.join(found)}" if found else ""))
    for needed in ("trainer_state.json", os.path.join(DS_STATE_DIR, DS_STATE_TAG), "rng_state_rank0.json"):
        if not os.path.exists(os.path.join(checkpoint, needed)):
            raise ConfigError(f"{flag} {checkpoint}: {needed} is missing (not a checkpoint of train.py?)")
    for name in ("trainer_state.json", "train_args.json", "rng_state_rank0.json"):
        if os.path.exists(os.path.join(checkpoint, name)):
            read_checkpoint_json(os.path.join(checkpoint, name))


def saved_args(checkpoint: str) -> dict:
    """The flags a checkpoint's run was started with (train_args.json's "args"; {} if it has none)."""
    path = os.path.join(checkpoint, "train_args.json")
    return read_checkpoint_json(path).get("args", {}) if os.path.isfile(path) else {}


def saved_step(checkpoint: str) -> int:
    """The optimizer steps a checkpoint had taken."""
    return read_checkpoint_json(os.path.join(checkpoint, "trainer_state.json")).get("global_step", 0)


def resume(engine, checkpoint: str, plan: StepPlan, world_size: int, rank: int,
           group_by_length: bool = False) -> TrainState:
    """Load DeepSpeed's state (adapter, optimizer, scheduler) from `checkpoint` into `engine` and return the counters
    to continue from, once the run's step plan, world size and sample order are found to be the checkpoint's."""
    saved = read_checkpoint_json(os.path.join(checkpoint, "trainer_state.json"))
    saved_plan = saved.pop("plan")
    saved_world = saved.pop("world_size")
    if saved_world != world_size:
        raise ConfigError(f"{checkpoint} was written by {saved_world} ranks; resume it with {saved_world}, not "
                          f"{world_size}")
    if saved_plan != asdict(plan):
        raise ConfigError(f"{checkpoint} was taken with a different step plan {saved_plan}; now {asdict(plan)} "
                          f"(same data, batch size, accumulation, epochs and warmup are needed to resume)")
    grouped = read_checkpoint_json(os.path.join(checkpoint, "train_args.json")).get("args", {}).get(
        "group_by_length")
    if bool(grouped) != group_by_length:
        raise ConfigError(f"{checkpoint} was taken with{'' if grouped else 'out'} --group_by_length; resume it the "
                          f"same way (it decides the order of the samples)")
    load_path, _ = engine.load_checkpoint(os.path.join(checkpoint, DS_STATE_DIR), tag=DS_STATE_TAG,
                                          load_module_strict=False)  # strict=False: only the adapter was saved
    if load_path is None:
        raise InputError(f"{checkpoint}/{DS_STATE_DIR}: DeepSpeed could not load it")
    engine.lr_scheduler.step(engine.lr_scheduler.last_batch_iteration)  # put the restored lr into the optimizer
    state = TrainState(**saved)
    if state.micro_in_epoch >= plan.micro_batches_per_epoch:  # saved at an epoch end: start the next epoch
        state.epoch, state.micro_in_epoch = state.epoch + 1, 0
    loader = "weights_only" if getattr(engine.checkpoint_engine, "weights_only", False) else "pickle"
    print_rank_0(f"resumed from {checkpoint} ({loader} load): step {state.global_step}, epoch {state.epoch}, "
                 f"micro-batch {state.micro_in_epoch}/{plan.micro_batches_per_epoch}", rank)
    return state


def restore_rank_state(checkpoint: str, rank: int) -> list[float]:
    """Put this rank's RNG streams back as `checkpoint` saved them; returns its unlogged (loss sum, count)."""
    saved = read_checkpoint_json(rank_state_path(checkpoint, rank))
    set_rng_state(saved)
    return saved.get("loss_window", [0.0, 0.0])


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


def read_checkpoint_json(path: str) -> dict:
    """The JSON object in `path` (a checkpoint's state and settings); InputError if it is not one."""
    try:
        return read_json_object(path)
    except ValueError as e:
        damaged = "" if "cannot read it" in str(e) or "expected a JSON object" in str(e) else \
            "; the checkpoint is damaged, resume from another one"
        raise InputError(f"{e}{damaged}") from None


# ---------------------------------------------------------------------------------------------------------------
# RNG streams
# ---------------------------------------------------------------------------------------------------------------


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
# Fingerprints of what a run reads
# ---------------------------------------------------------------------------------------------------------------


def run_fingerprints(train_path: str, test_path: str, model_dir: str) -> dict:
    """What the run reads, fingerprinted: the training and test files and the tokenizer's vocabulary by their
    contents (sha256), the base model by `base_model_fingerprint`. Recorded in train_args.json, so that a resume can
    tell that it would continue on other data or another base, where neither the saved position in the data nor
    the adapter would mean what it meant. An empty `test_path` (no evaluation) has none."""
    return {"train_path": file_sha256(train_path),
            "test_path": file_sha256(test_path) if test_path else None,
            "model_name_or_path": base_model_fingerprint(model_dir),
            "tokenizer": file_sha256(os.path.join(model_dir, "qwen.tiktoken"))}


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
    saved = read_checkpoint_json(path).get("fingerprints") if os.path.isfile(path) else None
    if not isinstance(saved, dict):
        print_rank_0(f"note: {checkpoint} records no fingerprints of its data and base model (it was taken before "
                     f"train.py recorded them): resuming without checking that they are the same", rank)
        return
    changed = [FINGERPRINT_NAMES.get(key, key) for key, value in fingerprints.items()
               if key in saved and saved[key] != value]
    if changed:
        raise ConfigError(f"--resume_from_checkpoint {checkpoint} was trained on other inputs: {'; '.join(changed)} "
                          f"{'has' if len(changed) == 1 else 'have'} changed since. A resume continues the run "
                          f"exactly, which needs the same data, base model and tokenizer; restore them, or start a "
                          f"new run (--overwrite_output_dir or another --output_dir)")
