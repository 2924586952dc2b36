"""Merge a LoRA adapter trained by train.py into the unquantized base model and save a standalone checkpoint
(safetensors shards, config.json, generation_config.json, tokenizer files, the run's train_args.json, from which
predict.py takes the training lengths, and its schema.json, the fields it answers) that loads with our qwen1_8
classes.

    python merge_params.py --ori_model_dir Qwen-1_8-chat --model_dir output_dir_qlora \\
        --save_model_dir output_dir_qlora/merged

--model_dir is a checkpoint (output_dir_qlora/epoch-3-step-909) or a run's output_dir, which stands for the best
checkpoint its best_checkpoint.json names. Without --ori_model_dir the base is the one the adapter names in its
adapter_config.json (train.py's --model_name_or_path, relative to where it ran). Without --save_model_dir the
merged model goes to merged/ in the run directory, where predict.py looks by default.

W <- W + (alpha / r) * B @ A is applied to the base loaded in --dtype, never to a 4-bit copy. The default is the base
config's dtype: bfloat16 for the published Qwen-1.8B-Chat, which rounds part of a small update away, as serving in
bf16 would anyway; --dtype float32 keeps it whole for fp32 serving. An adapter trained against an NF4 base meets
slightly different base weights here: the usual QLoRA caveat. Before anything is written, every merged weight is
checked element by element against W + (alpha / r) * B @ A computed in a wider float (only rounding to --dtype may
part them), and the merged model's logits are compared with base + adapter on a probe prompt; the merge fails if
either differs by more than the dtype allows. Output goes to a temporary directory that is renamed at the end, so an
interrupted merge leaves nothing half-written; a non-empty --save_model_dir is only replaced with --overwrite, and
only when it holds an earlier merge (never a directory that holds the inputs, or other files).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile

import torch

from medextract.cli import add_schema_argument
from medextract.checkpoints import CHECKPOINT_NAME
from medextract.model_files import LOAD_ERRORS, check_adapter_files, check_model_files, check_vocabulary
from medextract.schema import SCHEMA_FILE, resolve_schema
from utils import (DTYPES, HelpFormatter, apply_usual_permissions, build_chatml_ids, check_output_path, fail,
                   load_tokenizer, one_line, replace_dir, resolve_device, silence_library_deprecations)

PROG = "merge_params.py"

# Largest allowed |merged - (base + adapter)| logit difference, relative to the largest |logit| (at least 1):
# fp32 only reorders sums; 16-bit formats also round W + BA once.
RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
PROBE = "患者：孩子咳嗽三天了，有点发烧。\n医生：可以吃点布洛芬，多喝水。"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    paths = parser.add_argument_group("paths")
    paths.add_argument("--ori_model_dir", default=None,
                       help="the base checkpoint the adapter was trained on; default: the one its "
                            "adapter_config.json names (train.py's --model_name_or_path)")
    paths.add_argument("--model_dir", default="output_dir_qlora",
                       help="a train.py checkpoint (adapter_config.json + adapter_model.safetensors), or a run's "
                            "output_dir: its best checkpoint (best_checkpoint.json)")
    paths.add_argument("--save_model_dir", default=None,
                       help="where the merged checkpoint goes; default: merged/ in the run directory (--model_dir "
                            "itself when it is a run's output_dir, else the checkpoint's parent), which is where "
                            "predict.py looks by default")
    paths.add_argument("--overwrite", action="store_true",
                       help="replace an earlier merge (or other model directory) at --save_model_dir")
    add_schema_argument(paths, help="the schema file an adapter trained elsewhere answers, saved in the merged model; "
                                    "default: the checkpoint's schema.json (train.py --schema), else the chapter's "
                                    "eight fields")
    run = parser.add_argument_group("precision and output")
    run.add_argument("--device", default="auto",
                     help="auto (cuda if visible, else cpu), cpu, cuda, cuda:N, or the chapter's GPU index / -1")
    run.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                     help="merge and save dtype; auto = the base config.json's torch_dtype (float32 if absent)")
    run.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard, e.g. 2GB or 500MB")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    silence_library_deprecations()
    validate(args)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        fail(PROG, str(e))
    dtype = merge_dtype(args.dtype, args.ori_model_dir)
    print(f"merging {args.model_dir} into {args.ori_model_dir} in {str(dtype).removeprefix('torch.')} on {device}")

    from peft import PeftModel

    from qwen1_8.modeling_qwen import QWenLMHeadModel

    tokenizer = checkpoint_tokenizer(args.model_dir, args.ori_model_dir)
    # validate() read every header; what is left to fail here (a corrupt tensor body, a full disk) is still named
    try:
        base = QWenLMHeadModel.from_pretrained(args.ori_model_dir, dtype=dtype).to(device).eval()
    except LOAD_ERRORS as e:
        fail(PROG, f"--ori_model_dir {args.ori_model_dir}: cannot load the model ({one_line(e)})")
    try:
        # torch_device: peft would otherwise read the adapter onto cuda:0 whatever --device says
        model = PeftModel.from_pretrained(base, args.model_dir, torch_device=str(device)).eval()
    except LOAD_ERRORS as e:
        fail(PROG, f"--model_dir {args.model_dir}: cannot load the adapter ({one_line(e)})")
    probe = probe_input(tokenizer, device)
    with torch.no_grad():
        expected = model(input_ids=probe, use_cache=False).logits.float()
        lost = merge_checked(model, dtype)
        merged = model.unload()
        got = merged(input_ids=probe, use_cache=False).logits.float()
    diff = (got - expected).abs().max().item()
    allowed = RELATIVE_TOLERANCE[dtype] * max(1.0, expected.abs().max().item())
    print(f"max |merged - (base + adapter)| logit difference: {diff:.3e} (allowed {allowed:.3e})")
    if not diff <= allowed:
        hint = ("" if dtype == torch.float32 else
                f"; in {str(dtype).removeprefix('torch.')} part of this is rounding: --dtype float32 merges without "
                f"it and tells a rounding gap from a wrong merge")
        fail(PROG, f"the merged model's logits differ from base + adapter by {diff:.3e} > {allowed:.3e}; nothing "
                   f"written{hint}")

    # The precision flags in config.json describe the saved weights (the chapter persisted bf16=true over fp16).
    merged.config.bf16, merged.config.fp16, merged.config.fp32 = (dtype == torch.bfloat16, dtype == torch.float16,
                                                                  dtype == torch.float32)
    save(merged, tokenizer, args, {"ori_model_dir": args.ori_model_dir, "model_dir": args.model_dir,
                                   "dtype": str(dtype).removeprefix("torch."), "max_abs_logit_diff": diff,
                                   "update_rounded_away": lost})
    print(f"saved the merged model to {args.save_model_dir}")


def merge_checked(model, dtype: torch.dtype) -> float:
    """Merge every LoRA layer in place, one at a time, and check each merged weight element against W + s * B @ A
    computed exactly enough (float32 for a 16-bit merge, float64 for a float32 one): they may differ only by rounding
    to `dtype` (of the result, and of the update where the adapter is in 16 bits) plus float32 matmul error. Catches
    what the logit probe can miss in 16 bits: an update applied twice, to the wrong layer, transposed, or not at all.
    Returns the share of the update (relative L2 norm over all layers) that rounding to `dtype` took away. Memory:
    three buffers of one layer's size (the reference, its bound and the error) at a time."""
    from peft.tuners.lora import LoraLayer

    ref = torch.float64 if dtype == torch.float32 else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    eps, tiny, ref_eps, matmul_eps = (torch.finfo(dtype).eps, torch.finfo(dtype).tiny, torch.finfo(ref).eps,
                                      torch.finfo(torch.float32).eps)
    lost_sq = update_sq = worst_all = 0.0
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    if not layers:
        fail(PROG, "the adapter wraps no layer of the base model: nothing to merge")
    for name, module in layers:
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        if any(a in getattr(module, "lora_variant", {}) or module.lora_bias.get(a) for a in adapters):
            fail(PROG, f"{name}: DoRA-style variants and LoRA biases are not supported (train.py makes neither)")
        exact, bound, layer_update_sq, rank = merge_reference(module, adapters, ref)
        update_sq += layer_update_sq
        weight = module.get_base_layer().weight
        module.merge(adapter_names=adapters)
        err = weight.detach().to(ref) - exact
        lost_sq += torch.dot(err.view(-1), err.view(-1)).item()
        allowed = exact.abs_().mul_(eps + ref_eps).add_(bound, alpha=eps + (rank + 2) * matmul_eps).add_(tiny)
        worst = err.abs_().div_(allowed).max().item()
        if not worst <= 1.0:
            fail(PROG, f"{name}: the merged weight differs from W + (alpha / r) * B @ A by up to {worst:.1f}x what "
                       f"rounding to {dtype_name} allows; nothing written")
        worst_all = max(worst_all, worst)
        del exact, bound, err
    lost = (lost_sq / update_sq) ** 0.5 if update_sq else 0.0
    print(f"merged {len(layers)} layers; each weight is W + (alpha / r) * B @ A up to {dtype_name} rounding (the "
          f"largest gap is {worst_all:.0%} of what it allows), which took away {lost:.1%} of the update (relative L2 "
          f"norm: unbiased noise that averages out in the logits, checked next)")
    return lost


def merge_reference(module, adapters: list[str], ref: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """For one LoRA layer, before it is merged: W + sum of s * B @ A in `ref`, the bound s * |B| @ |A| that matmul
    and update-rounding errors are relative to, the sum over adapters of |s * B @ A|_F^2 (from r x r products, never
    the full update) and the summed rank."""
    exact = module.get_base_layer().weight.detach().to(ref, copy=True)
    bound = torch.zeros_like(exact)
    update_sq, rank = 0.0, 0
    for a in adapters:
        lora_a, lora_b, scale = module.lora_A[a].weight.to(ref), module.lora_B[a].weight.to(ref), module.scaling[a]
        if module.fan_in_fan_out:  # the base stores W transposed
            lora_a, lora_b = lora_b.T, lora_a.T
        exact.addmm_(lora_b, lora_a, alpha=scale)
        bound.addmm_(lora_b.abs(), lora_a.abs(), alpha=abs(scale))
        update_sq += scale ** 2 * ((lora_b.T @ lora_b) * (lora_a @ lora_a.T)).sum().item()
        rank += lora_a.shape[0]
    return exact, bound, update_sq, rank


def validate(args: argparse.Namespace) -> None:
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*[KMGT]B\s*", args.max_shard_size, flags=re.IGNORECASE):
        fail(PROG, f"--max_shard_size {args.max_shard_size!r}: expected a number and a unit, KB, MB, GB or TB "
                   f"(e.g. 2GB)")
    given = args.model_dir
    if not os.path.isdir(given):
        fail(PROG, f"--model_dir {given}: no such directory (a train.py checkpoint, or the run's --output_dir)")
    args.model_dir = resolve_checkpoint(given)
    if args.save_model_dir is None:
        run_dir = given if args.model_dir != given else os.path.dirname(os.path.abspath(args.model_dir))
        args.save_model_dir = os.path.join(run_dir, "merged")
        print(f"saving to {args.save_model_dir} (--save_model_dir)")
    if not os.path.isfile(os.path.join(args.model_dir, "adapter_config.json")):
        fail(PROG, f"--model_dir {args.model_dir}: no adapter_config.json (not a train.py checkpoint)")
    if not os.path.isfile(os.path.join(args.model_dir, "adapter_model.safetensors")):
        fail(PROG, f"--model_dir {args.model_dir}: no adapter_model.safetensors (adapters are loaded from "
                   f"safetensors only, never from pickled .bin files)")
    named_by = ""
    if args.ori_model_dir is None:
        args.ori_model_dir, named_by = recorded_base(args.model_dir), " (named by its adapter_config.json)"
    if not os.path.isfile(os.path.join(args.ori_model_dir, "config.json")):
        problem = "no config.json (not a model directory)" if os.path.isdir(args.ori_model_dir) else \
            "no such directory (the base model train.py started from; README §1 says how to get Qwen-1_8B-Chat)"
        fail(PROG, f"--ori_model_dir {args.ori_model_dir}{named_by}: {problem}"
                   + ("; pass --ori_model_dir" if named_by else ""))
    try:
        check_adapter_files(args.model_dir, check_model_files(args.ori_model_dir))
        check_vocabulary(tokenizer_dir(args.model_dir, args.ori_model_dir))
        args.answer_schema = resolve_schema(args.model_dir, args.schema)
    except ValueError as e:
        fail(PROG, str(e))
    save = os.path.realpath(args.save_model_dir)
    # The save directory is replaced as a whole: it must not be, nor hold, anything the merge reads (a run directory
    # given as --model_dir holds the checkpoint merged, and all the others).
    for flag, path in (("--ori_model_dir", args.ori_model_dir), ("--model_dir", given),
                       ("--model_dir's checkpoint", args.model_dir)):
        if os.path.commonpath([save, os.path.realpath(path)]) == save:
            fail(PROG, f"--save_model_dir {args.save_model_dir} is or holds {flag} {path}, which replacing it would "
                       f"delete; save the merged model somewhere else")
    if os.path.exists(save) and not os.path.isdir(save):
        fail(PROG, f"--save_model_dir {args.save_model_dir} is a file")
    try:
        check_output_path(args.save_model_dir, "--save_model_dir", directory=True, replaced=True)
    except ValueError as e:
        fail(PROG, str(e))
    if os.path.isdir(save) and os.listdir(save):
        if not args.overwrite:
            fail(PROG, f"--save_model_dir {args.save_model_dir} is not empty; pass --overwrite to replace it")
        if not any(os.path.isfile(os.path.join(save, name)) for name in ("merge_info.json", "config.json")):
            fail(PROG, f"--save_model_dir {args.save_model_dir} holds no model (no config.json): --overwrite "
                       f"replaces an earlier merge or model directory only, never other files; empty it yourself or "
                       f"pick another")


def resolve_checkpoint(model_dir: str) -> str:
    """A run's output_dir stands for its best checkpoint; anything else is taken as a checkpoint."""
    best_file = os.path.join(model_dir, "best_checkpoint.json")
    if os.path.isfile(os.path.join(model_dir, "adapter_config.json")) or not os.path.isfile(best_file):
        return model_dir
    try:
        with open(best_file, encoding="utf-8") as f:
            best = json.load(f)["path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(PROG, f"{best_file}: cannot read the best checkpoint's 'path' ({e})")
    if not isinstance(best, str) or not best:
        fail(PROG, f"{best_file}: its 'path' is {best!r:.60}, not the path of a checkpoint")
    # The checkpoint of that name inside model_dir first: the recorded path may be relative to where train.py ran,
    # or name the original of a copied run.
    inside = os.path.join(model_dir, os.path.basename(os.path.normpath(best)))
    best = inside if os.path.isdir(inside) else best
    if not os.path.isdir(best):
        left = sorted(d for d in os.listdir(model_dir) if CHECKPOINT_NAME.match(d))
        fail(PROG, f"--model_dir {model_dir}: its best checkpoint {os.path.basename(os.path.normpath(best))} (named "
                   f"by best_checkpoint.json) no longer exists, in {model_dir} or at {best}; pass one of its "
                   f"checkpoints as --model_dir" + (f" ({', '.join(left)})" if left else " (it holds none)"))
    print(f"{model_dir}: its best checkpoint is {best}")
    return best


def recorded_base(checkpoint: str) -> str:
    """The base model an adapter was trained on, as peft recorded it (train.py's --model_name_or_path, relative to
    where train.py ran)."""
    path = os.path.join(checkpoint, "adapter_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as e:
        fail(PROG, f"{path}: cannot read it ({e})")
    if not isinstance(base, str) or not base:
        fail(PROG, f"{path}: names no base_model_name_or_path; pass --ori_model_dir")
    print(f"base model (from {path}): {base}")
    return base


def merge_dtype(choice: str, model_dir: str) -> torch.dtype:
    """The dtype the merge is done and saved in: --dtype, or for auto the base config.json's torch_dtype."""
    if choice != "auto":
        return DTYPES[choice]
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    if name not in DTYPES:
        fail(PROG, f"{model_dir}/config.json: unsupported dtype {name!r}; pass --dtype")
    return DTYPES[name]


def tokenizer_dir(model_dir: str, ori_model_dir: str) -> str:
    """Where the tokenizer comes from: the checkpoint's own files (train.py saves them), else the base's."""
    return model_dir if os.path.isfile(os.path.join(model_dir, "qwen.tiktoken")) else ori_model_dir


def checkpoint_tokenizer(model_dir: str, ori_model_dir: str):
    """The tokenizer of `tokenizer_dir`."""
    source = tokenizer_dir(model_dir, ori_model_dir)
    try:
        return load_tokenizer(source)
    except (OSError, ValueError) as e:  # validate() parsed the vocabulary, so rare
        fail(PROG, f"{os.path.join(source, 'qwen.tiktoken')}: cannot load the tokenizer ({one_line(e)})")


def probe_input(tokenizer, device: torch.device) -> torch.Tensor:
    """A short generation prompt in the training layout, so the probe runs through every adapted layer."""
    ids = build_chatml_ids(tokenizer, PROBE, None, max_len=512, max_src_len=256).input_ids
    return torch.tensor([ids], dtype=torch.long, device=device)


def save(model, tokenizer, args: argparse.Namespace, info: dict) -> None:
    target = os.path.abspath(args.save_model_dir)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(target)}-", dir=parent)
    try:
        model.save_pretrained(tmp, max_shard_size=args.max_shard_size, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name in ("generation_config.json", "qwen.tiktoken"):  # in case the base had no generation config loaded
            if not os.path.exists(os.path.join(tmp, name)) and os.path.exists(os.path.join(args.ori_model_dir, name)):
                shutil.copyfile(os.path.join(args.ori_model_dir, name), os.path.join(tmp, name))
        if os.path.isfile(os.path.join(args.model_dir, "train_args.json")):  # predict.py reads the lengths from it
            shutil.copyfile(os.path.join(args.model_dir, "train_args.json"), os.path.join(tmp, "train_args.json"))
        if not args.answer_schema.is_chapter or os.path.isfile(os.path.join(args.model_dir, SCHEMA_FILE)):
            with open(os.path.join(tmp, SCHEMA_FILE), "w", encoding="utf-8") as f:  # the fields the model answers
                f.write(args.answer_schema.text())
        with open(os.path.join(tmp, "merge_info.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, ensure_ascii=False, indent=2)
        apply_usual_permissions(tmp)
        replace_dir(tmp, target)  # validate() allowed an existing target: empty, or --overwrite was given
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


if __name__ == "__main__":
    main()
