"""Extract the eight medical elements from doctor–patient dialogues with the fine-tuned (merged) Qwen-1.8B-Chat.

Interactive: paste a dialogue (as many lines as it has), end it with an empty line, and the extracted JSON is printed;
`quit`, `exit`, Ctrl-D or Ctrl-C leave.

    python predict.py --model_path output_dir_qlora/merged

Batch: one JSON line per input record, `{"id", "output", "num_new_tokens", "input_digest"}`, appended as each batch
finishes, so a rerun with the same --output_file resumes where the last one stopped (refused for other settings or
another input file); `python evaluate.py` scores the file.

    python predict.py --model_path output_dir_qlora/merged \
        --input_file data/test.json --output_file predictions.jsonl --batch_size 8

The prompt is `utils.build_chatml_ids(..., output=None)`, token for token the prefix the model was trained on (the
chapter's predict.py dropped the `<|im_start|>` before `assistant`). Decoding is greedy unless --do_sample is given,
because an extraction should not change from one run to the next.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from tqdm import tqdm
from transformers import GenerationConfig
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from model_files import LOAD_ERRORS, check_adapter_files, check_model_files, check_vocabulary, read_json_object
from utils import (DTYPES, INSTRUCTION, TRUNCATIONS, WEIGHT_FILES, HelpFormatter, append_jsonl, build_chatml_ids,
                   check_output_path, check_run_settings, input_digest, iter_jsonl, load_tokenizer, native_bf16,
                   one_line, parse_output, pending, resolve_device, set_random_seed, silence_library_deprecations)

DEFAULT_MODEL_PATH = "output_dir_qlora/merged"  # merge_params.py's default --save_model_dir
# How training cut prompts: the chapter's, where a checkpoint does not record it
TRAINING_TRUNCATION = {"max_len": 2048, "max_src_len": 1560, "truncation": "tokens"}


def build_arg_parser(description: str = __doc__, model_path: str = DEFAULT_MODEL_PATH,
                     output_file: str = "predictions.jsonl") -> argparse.ArgumentParser:
    """The flags of predict.py; test_qwen.py uses the same ones with its own defaults."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model_path", type=str, default=model_path,
                       help="checkpoint directory (weights, config.json and the tokenizer's qwen.tiktoken); a "
                            "train.py checkpoint also works, its adapter put unmerged on the base it names")
    model.add_argument("--device", type=str, default="auto",
                       help="'auto' (a GPU if one is visible, else the CPU), 'cpu', 'cuda', 'cuda:N' or a bare GPU index")
    model.add_argument("--dtype", type=str, default="auto", choices=["auto", *DTYPES],
                       help="weights and compute dtype; auto = bf16 on a GPU that supports it, fp16 on other GPUs, "
                            "fp32 on the CPU")

    gen = parser.add_argument_group("generation")
    gen.add_argument("--max_tgt_len", type=int, default=512, help="most new tokens generated per answer")
    gen.add_argument("--do_sample", action="store_true",
                     help="sample with --top_p/--temperature instead of greedy decoding (greedy is reproducible)")
    gen.add_argument("--top_p", type=float, default=0.8, help="nucleus sampling mass (only with --do_sample)")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (only with --do_sample)")
    gen.add_argument("--repetition_penalty", type=float, default=1.1,
                     help="penalty on tokens already in the prompt or answer; 1.0 turns it off")
    gen.add_argument("--seed", type=int, default=42, help="random seed (matters only with --do_sample)")
    gen.add_argument("--max_len", type=int, default=None,
                     help="the training --max_len; with --max_src_len it truncates prompts exactly as training did. "
                          "Default: the model's train_args.json (merge_params.py copies it), else 2048")
    gen.add_argument("--max_src_len", type=int, default=None,
                     help="the training --max_src_len: a longer user block is cut as in training. "
                          "Default: from train_args.json as --max_len, else 1560")
    gen.add_argument("--truncation", choices=TRUNCATIONS, default=None,
                     help="the training --truncation (tokens: keep a long dialogue's first tokens; turns: its leading "
                          "whole turns). Default: from train_args.json as --max_len, else tokens")

    io = parser.add_argument_group("batch mode")
    io.add_argument("--input_file", type=str, default=None,
                    help="JSON Lines with {instruction, input[, output]} per line (data_helper's test.json) or just "
                         "{input}; without it the script is interactive")
    io.add_argument("--output_file", type=str, default=output_file,
                    help="predictions, one JSON line per input; ids already in it are skipped (resume)")
    io.add_argument("--batch_size", type=int, default=8,
                    help="prompts generated together (left-padded, grouped by length)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_arg_parser().parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace, prog: str = "predict.py") -> None:
    """Every flag checked before anything loads; an error names the script, as argparse's own do."""
    try:
        check_flags(args)
    except SystemExit as e:
        if isinstance(e.code, str):
            raise SystemExit(f"{prog}: error: {e.code}") from None
        raise


def check_flags(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise SystemExit(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.max_tgt_len < 1:
        raise SystemExit(f"--max_tgt_len must be at least 1, got {args.max_tgt_len}")
    check_model_path(args.model_path)
    if args.do_sample and not (args.temperature > 0 and 0 < args.top_p <= 1):
        raise SystemExit(f"--do_sample needs --temperature > 0 and 0 < --top_p <= 1, got {args.temperature} and "
                         f"{args.top_p}")
    if args.repetition_penalty <= 0:
        raise SystemExit(f"--repetition_penalty must be positive (1.0 = off), got {args.repetition_penalty}")
    fill_training_truncation(args)
    if not 0 < args.max_src_len < args.max_len:
        raise SystemExit(f"--max_src_len ({args.max_src_len}) must be positive and below --max_len ({args.max_len})")
    if args.input_file is not None and not os.path.isfile(args.input_file):
        raise SystemExit(f"--input_file {args.input_file}: no such file")
    if args.input_file is not None and os.path.realpath(args.output_file) == os.path.realpath(args.input_file):
        raise SystemExit(f"--output_file {args.output_file} is the --input_file: the predictions would be appended "
                         f"to the dialogues; give another --output_file")


def check_model_path(path: str) -> None:
    """A model directory (config.json, or a train.py checkpoint's adapter on the base it names) with the tokenizer's
    vocabulary; a run's output_dir is named as such, since it is the easy mistake after training."""
    if not os.path.isdir(path):
        raise SystemExit(f"--model_path {path}: " + ("a file, not a model directory" if os.path.exists(path)
                                                     else "no such directory"))
    has = set(os.listdir(path))
    if "best_checkpoint.json" in has and not {"config.json", "adapter_config.json"} & has:
        raise SystemExit(f"--model_path {path} is a train.py run directory, not a model: merge its best checkpoint "
                         f"first (python merge_params.py --model_dir {path} --save_model_dir {path}/merged) and pass "
                         f"the merged directory, or pass one of its checkpoints (best_checkpoint.json names the best)")
    if not {"config.json", "adapter_config.json"} & has:
        raise SystemExit(f"--model_path {path}: no config.json (not a model directory)")
    if "config.json" not in has:
        check_adapter_base(path)
    if "qwen.tiktoken" not in has:
        raise SystemExit(f"--model_path {path}: no qwen.tiktoken (the tokenizer's vocabulary; merge_params.py and "
                         f"train.py checkpoints carry it)")
    if "config.json" in has and not has & set(WEIGHT_FILES):
        raise SystemExit(f"--model_path {path}: no weights ({' / '.join(WEIGHT_FILES)})")


def check_adapter_base(checkpoint: str) -> None:
    """An unmerged train.py checkpoint loads on the base model its adapter_config.json names: train.py's
    --model_name_or_path as given, so a relative path only holds from the directory train.py ran in."""
    try:
        base = read_adapter_config(checkpoint).get("base_model_name_or_path")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if not isinstance(base, str) or not os.path.isfile(os.path.join(base, "config.json")):
        raise SystemExit(f"--model_path {checkpoint} is a train.py checkpoint whose adapter_config.json names the base "
                         f"model {base!r}, which is no model directory from {os.getcwd()} (train.py records the path "
                         f"as it was given). Run from the directory train.py ran in, or merge the checkpoint "
                         f"(python merge_params.py --model_dir {checkpoint} --ori_model_dir <base model>) and pass "
                         f"the merged directory")


def read_adapter_config(checkpoint: str) -> dict:
    """A checkpoint's adapter_config.json, which must hold a JSON object."""
    return read_json_object(os.path.join(checkpoint, "adapter_config.json"))


def fill_training_truncation(args: argparse.Namespace) -> None:
    """--max_len / --max_src_len / --truncation not given: what the model was trained with (train_args.json, which
    train.py writes into each checkpoint and merge_params.py copies into the merged model), else the chapter's."""
    missing = [key for key in TRAINING_TRUNCATION if getattr(args, key) is None]
    if not missing:
        return
    path = os.path.join(args.model_path, "train_args.json")
    if not os.path.isfile(path):
        for key in missing:
            setattr(args, key, TRAINING_TRUNCATION[key])
        return
    try:
        with open(path, encoding="utf-8") as f:
            saved = {"truncation": "tokens", **json.load(f)["args"]}  # runs older than --truncation cut by tokens
        trained = {key: saved[key] if key == "truncation" else int(saved[key]) for key in missing}
        if trained.get("truncation", "tokens") not in TRUNCATIONS:
            raise ValueError(f"unknown truncation {trained['truncation']!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{path}: cannot read how training cut prompts ({e}); pass "
                         f"{', '.join('--' + key for key in missing)}")
    for key in missing:
        setattr(args, key, trained[key])
    print(f"prompt truncation: --max_len {args.max_len} --max_src_len {args.max_src_len} --truncation "
          f"{args.truncation} ({', '.join('--' + key for key in missing)} from {path})", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    model, tokenizer, generation_config = prepare(args, "predict.py")
    if args.input_file is None:
        def answer(dialogue: str) -> str:
            ids = build_chatml_ids(tokenizer, INSTRUCTION + dialogue, None, args.max_len, args.max_src_len,
                                   truncation=args.truncation, instruction_chars=len(INSTRUCTION))
            if ids.truncated:
                cut = "its last turns were left out" if args.truncation == "turns" else "its end was cut"
                print(f"The dialogue is longer than --max_src_len {args.max_src_len} tokens: {cut}, as in training.",
                      flush=True)
            return generate_from_ids(model, tokenizer, [ids.input_ids], generation_config)[0][0]
        return interactive(answer)
    predict_file(model, tokenizer, args.input_file, args.output_file, args.batch_size, generation_config,
                 args.max_len, args.max_src_len, args.truncation)
    return 0


def prepare(args: argparse.Namespace, prog: str):
    """(model, tokenizer, generation config) from the flags, after the inputs were checked; test_qwen.py too."""
    silence_library_deprecations()
    set_random_seed(args.seed)
    device = check_inputs(args, prog)
    model, tokenizer = load_model(args.model_path, device, resolve_dtype(args.dtype, device), prog)
    generation_config = build_generation_config(tokenizer, args.max_tgt_len, args.do_sample, args.top_p,
                                                args.temperature, args.repetition_penalty)
    return model, tokenizer, generation_config


def check_inputs(args: argparse.Namespace, prog: str) -> torch.device:
    """The device, after every input has been read once: a bad --device, input line or results line stops here
    with its file and line, not after minutes of loading the model."""
    try:
        device = resolve_device(args.device)
        if args.input_file is not None:
            for path, flag in ((args.output_file, "--output_file"),
                               (args.output_file + ".settings.json", "the settings file of --output_file")):
                check_output_path(path, flag)
            pending(read_examples(args.input_file), args.output_file, args.input_file)
        check_model_dir_files(args.model_path)
        if args.input_file is not None:  # last: it records the settings of a new results file
            check_run_settings(args.output_file, run_settings(args, device))
    except ValueError as e:
        raise SystemExit(f"{prog}: error: {e}") from None
    return device


def check_model_dir_files(model_path: str) -> None:
    """The files check_model_path found, read as far as their headers: config.json, the safetensors weights, the
    vocabulary, and for a train.py checkpoint its adapter against the base it names (which must have its shape)."""
    if os.path.isfile(os.path.join(model_path, "config.json")):
        check_model_files(model_path)
    else:  # check_adapter_base found the base
        base = read_adapter_config(model_path)["base_model_name_or_path"]
        check_adapter_files(model_path, check_model_files(base))
    check_vocabulary(model_path)


def model_fingerprint(model_path: str) -> str:
    """Names, sizes and modification times of the weights and config.json: a model merged again into the same
    directory, or replaced there, gets another fingerprint (cheap: no file is read)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(model_path)):
        if name.endswith(".safetensors") or name == "config.json":
            stat = os.stat(os.path.join(model_path, name))
            digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def run_settings(args: argparse.Namespace, device: torch.device) -> dict:
    """What decides the answers in a results file (the batch size and the device do not, in greedy fp32)."""
    sampling = {"top_p": args.top_p, "temperature": args.temperature, "seed": args.seed} if args.do_sample else {}
    return {"model_path": os.path.realpath(args.model_path), "model_files": model_fingerprint(args.model_path),
            "dtype": str(resolve_dtype(args.dtype, device)).removeprefix("torch."), "max_new_tokens": args.max_tgt_len,
            "do_sample": args.do_sample, **sampling, "repetition_penalty": args.repetition_penalty,
            "max_len": args.max_len, "max_src_len": args.max_src_len, "truncation": args.truncation}


# --------------------------------------------------------------------------------------------------------------
# Model and generation
# --------------------------------------------------------------------------------------------------------------


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if native_bf16(device) else torch.float16
        return torch.float32  # CPU half-precision matmuls are slow or missing on most CPUs
    return DTYPES[name]


def load_model(model_path: str, device: torch.device, dtype: torch.dtype, prog: str = "predict.py"):
    """The model in eval mode on `device`, and its tokenizer with the pad id set to `<|endoftext|>`; a file that
    fails to load stops the script (`prog`) with its path."""
    from qwen1_8.modeling_qwen import QWenLMHeadModel

    # check_inputs read every header; what is left to fail here (a corrupt tensor body, a disk error) is still named
    try:
        tokenizer = load_tokenizer(model_path)
        model = QWenLMHeadModel.from_pretrained(model_path, dtype=dtype).to(device).eval()
    except LOAD_ERRORS as e:
        raise SystemExit(f"{prog}: error: --model_path {model_path}: cannot load the model ({one_line(e)})") from None
    return model, tokenizer


def stop_token_ids(tokenizer) -> list[int]:
    """An answer ends at `<|im_end|>`; `<|im_start|>` (a new turn) and `<|endoftext|>` end it too."""
    return [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]


def build_generation_config(tokenizer, max_new_tokens: int, do_sample: bool = False, top_p: float = 0.8,
                            temperature: float = 0.8, repetition_penalty: float = 1.1,
                            min_new_tokens: int | None = None) -> GenerationConfig:
    """A fresh config per run, so the model's own generation_config (sampling on, eos 151643) is never mutated and
    never decides the stop tokens. Unset fields fall back to the model's config inside generate()."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample,
                              repetition_penalty=repetition_penalty, eos_token_id=stop_token_ids(tokenizer),
                              pad_token_id=tokenizer.eod_id, use_cache=True)
    if do_sample:
        config.top_p, config.temperature, config.top_k = top_p, temperature, 0  # top_k 0: no top-k cut, as Qwen's
    else:  # transformers' neutral values: unset, they would be filled from the model's sampling settings
        config.top_p, config.temperature, config.top_k = 1.0, 1.0, 50
    if min_new_tokens is not None:
        config.min_new_tokens = min_new_tokens
    return config


def prompt_ids(tokenizer, user_text: str, max_len: int, max_src_len: int, truncation: str = "tokens",
               instruction_chars: int = 0) -> list[int]:
    """The generation prompt, truncated like training: token-identical to the training prefix."""
    return build_chatml_ids(tokenizer, user_text, None, max_len, max_src_len, truncation=truncation,
                            instruction_chars=instruction_chars).input_ids


def generate_batch(model, tokenizer, user_texts: Sequence[str], generation_config: GenerationConfig,
                   max_len: int = 2048, max_src_len: int = 1560, truncation: str = "tokens") -> list[tuple[str, int]]:
    """Answer several user messages at once. Returns (answer text, number of new tokens) per message, in order."""
    prompts = [prompt_ids(tokenizer, text, max_len, max_src_len, truncation) for text in user_texts]
    return generate_from_ids(model, tokenizer, prompts, generation_config)


@torch.inference_mode()
def generate_from_ids(model, tokenizer, prompts: Sequence[Sequence[int]],
                      generation_config: GenerationConfig) -> list[tuple[str, int]]:
    """Generate for a left-padded batch of prompts. Returns (answer text, new tokens incl. the stop token) per prompt.

    Left padding puts every prompt's last token in the last column, so all rows take their next token from the
    same step; the attention mask hides the pads and the model derives each row's positions from it, so a row's
    answer is the one its prompt gets alone. The cache comes from `prefill_cache`: everything but the last column
    is already in it, and generate() starts from that column.
    """
    if not prompts:
        return []
    if generation_config.max_new_tokens is None:
        raise ValueError("generation_config.max_new_tokens must be set (it sizes the KV cache)")
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), tokenizer.eod_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    cache = prefill_cache(model, prompts, capacity=width - 1 + generation_config.max_new_tokens)
    output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                            past_key_values=cache, generation_config=generation_config)
    stops = set(stop_token_ids(tokenizer))
    results = []
    for row in output[:, width:].tolist():
        n_new = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        results.append((tokenizer.decode(row[:n_new], skip_special_tokens=True), n_new))
    return results


class PreallocatedLayer(DynamicLayer):
    """One layer's KV cache written in place into buffers sized for the whole generation, shape (B, H, capacity, D).

    transformers' DynamicLayer re-concatenates the cache at every new token, copying all B x S cached keys and
    values: on a CPU that copy was most of a batched decoding step. The buffers may be views into a larger cache
    (one row of it), which is how `prefill_cache` fills a batch cache one prompt at a time.
    """

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int = 0):
        super().__init__()
        self.key_buffer, self.value_buffer, self.length = key_buffer, value_buffer, length
        self.dtype, self.device = key_buffer.dtype, key_buffer.device
        self.keys, self.values = key_buffer[:, :, :length], value_buffer[:, :, :length]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[2]:
            raise RuntimeError(f"KV cache full: {end} positions > capacity {self.key_buffer.shape[2]}")
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.length


def common_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every prompt shares, leaving at least each prompt's last token out of it."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for other in prompts[1:]:
        n = next((i for i in range(n) if other[i] != first[i]), n)
    return n


@torch.inference_mode()
def prefill_cache(model, prompts: Sequence[Sequence[int]], capacity: int) -> Cache:
    """The KV cache of a left-padded batch, holding every prompt but its last token (width - 1 columns).

    Two savings over one padded forward pass: the prefix all prompts share (system block, instruction: about 190
    tokens of each 600-900-token prompt) is computed once, and each prompt's remainder is run alone at its own
    length, so no compute goes into padding. Pad columns are zero and masked during generation.
    """
    config = model.config
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    heads = config.num_attention_heads
    head_dim = getattr(config, "kv_channels", config.hidden_size // heads)
    batch, width = len(prompts), max(len(p) for p in prompts)
    buffers = [(torch.empty(batch, heads, capacity, head_dim, dtype=dtype, device=device),
                torch.empty(batch, heads, capacity, head_dim, dtype=dtype, device=device))
               for _ in range(config.num_hidden_layers)]

    # The base model (no LM head): prefill needs the keys and values, not logits.
    body = model.base_model
    shared = common_prefix_len(prompts)
    prefix = DynamicCache()
    if shared:
        body(input_ids=torch.tensor([prompts[0][:shared]], device=device), past_key_values=prefix, use_cache=True)
    for row, ids in enumerate(prompts):
        start = width - len(ids)  # left padding: the prompt occupies columns [start, width)
        layers = []
        for i, (keys, values) in enumerate(buffers):
            keys[row, :, :start].zero_()  # masked, but 0 x NaN from uninitialised memory would still be NaN
            values[row, :, :start].zero_()
            if shared:
                keys[row, :, start:start + shared] = prefix.layers[i].keys[0]
                values[row, :, start:start + shared] = prefix.layers[i].values[0]
            layers.append(PreallocatedLayer(keys[row:row + 1, :, start:], values[row:row + 1, :, start:], shared))
        rest = ids[shared:-1]
        if rest:  # no mask needed: this row alone has no padding, and the cache continues its positions
            body(input_ids=torch.tensor([rest], device=device), past_key_values=Cache(layers=layers), use_cache=True)
    return Cache(layers=[PreallocatedLayer(keys, values, width - 1) for keys, values in buffers])


# --------------------------------------------------------------------------------------------------------------
# Batch mode
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Example:
    id: int  # 0-based line number in the input file
    user_text: str  # instruction + dialogue, as in training
    instruction_chars: int = 0  # where the dialogue starts in user_text (the turns cut never keeps less than that)


def read_examples(path: str) -> list[Example]:
    """data_helper's {instruction, input, output} lines, or bare {input} lines (the chapter's instruction is used)."""
    examples = []
    for lineno, record in iter_jsonl(path):
        dialogue = record.get("input")
        if not isinstance(dialogue, str):
            raise ValueError(f"{path}:{lineno}: field 'input' (the dialogue) is missing or not a string")
        instruction = record.get("instruction", INSTRUCTION)
        if not isinstance(instruction, str):
            raise ValueError(f"{path}:{lineno}: field 'instruction' is not a string")
        examples.append(Example(lineno - 1, instruction + dialogue, len(instruction)))
    if not examples:
        raise ValueError(f"{path}: no records (the file is empty)")
    return examples


def length_sorted_batches(prompts: dict[int, list[int]], batch_size: int) -> list[list[int]]:
    """Ids grouped into batches of similar prompt length, longest first (so running out of memory happens at once,
    not an hour in), which keeps the left padding in each batch small."""
    order = sorted(prompts, key=lambda i: (-len(prompts[i]), i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def predict_batches(model, tokenizer, prompts: dict[int, list[int]], batch_size: int,
                    generation_config: GenerationConfig) -> Iterator[list[dict]]:
    """Yield the result records of each length-sorted batch as soon as it is generated."""
    for batch in length_sorted_batches(prompts, batch_size):
        answers = generate_from_ids(model, tokenizer, [prompts[i] for i in batch], generation_config)
        yield [{"id": i, "output": text, "num_new_tokens": n} for i, (text, n) in zip(batch, answers)]


def predict_file(model, tokenizer, input_file: str, output_file: str, batch_size: int,
                 generation_config: GenerationConfig, max_len: int, max_src_len: int,
                 truncation: str = "tokens") -> None:
    examples = read_examples(input_file)
    todo, done = pending(examples, output_file, input_file)
    print(f"{input_file}: {len(examples)} records, {done} already in {output_file}, {len(todo)} to generate",
          flush=True)
    if not todo:
        return
    chatml = {e.id: build_chatml_ids(tokenizer, e.user_text, None, max_len, max_src_len, truncation=truncation,
                                     instruction_chars=e.instruction_chars) for e in todo}
    truncated = sum(ids.truncated for ids in chatml.values())
    if truncated:
        lost = "their last turns" if truncation == "turns" else "the end of their dialogue"
        print(f"{truncated} prompts were longer than --max_src_len {max_src_len} and lost {lost} (as in training)",
              flush=True)
    prompts = {i: ids.input_ids for i, ids in chatml.items()}
    directory = os.path.dirname(os.path.abspath(output_file))
    os.makedirs(directory, exist_ok=True)
    digests = {e.id: input_digest(e.user_text) for e in todo}
    start, new_tokens, written = time.perf_counter(), 0, 0
    try:
        with tqdm(total=len(todo), desc="predict", unit="sample") as bar:
            for records in predict_batches(model, tokenizer, prompts, batch_size, generation_config):
                append_jsonl(output_file, [{**r, "input_digest": digests[r["id"]]} for r in records])
                new_tokens += sum(r["num_new_tokens"] for r in records)
                written += len(records)
                bar.update(len(records))
    except KeyboardInterrupt:
        print(f"\ninterrupted: the {done + written} predictions in {output_file} are kept; rerun the same "
              f"command to resume", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except OSError as e:  # checked before the model loaded, so rare: a full disk, a folder made read-only since
        raise SystemExit(f"error: --output_file {output_file}: cannot append to it ({e.strerror}); the "
                         f"{done + written} predictions written before are kept, and a rerun resumes") from None
    seconds = time.perf_counter() - start
    print(f"wrote {len(todo)} predictions to {output_file} | {seconds:.1f} s | {len(todo) / seconds:.2f} samples/s | "
          f"{new_tokens / seconds:.1f} new tokens/s", flush=True)


# --------------------------------------------------------------------------------------------------------------
# Interactive mode
# --------------------------------------------------------------------------------------------------------------

QUIT_WORDS = ("quit", "exit")


def read_dialogue(read_line: Callable[[str], str] | None = None) -> str | None:
    """Lines (from `input()` by default) up to an empty line, each followed by a newline as in the training data.
    None means leave: `quit`/`exit` as the first line, or Ctrl-D before any text."""
    read_line = read_line or input
    lines: list[str] = []
    while True:
        try:
            line = read_line("> " if not lines else "")
        except EOFError:
            return "".join(l + "\n" for l in lines) if lines else None
        if not lines and line.strip().lower() in QUIT_WORDS:
            return None
        if not line.strip():
            if lines:
                return "".join(l + "\n" for l in lines)
            continue
        lines.append(line.rstrip("\r"))


def show_answer(text: str) -> None:
    fields, valid = parse_output(text)
    if valid:
        print(json.dumps(fields, ensure_ascii=False, indent=2))
    else:
        print("The answer is not valid JSON; the model wrote:")
        print(text)


def interactive(answer: Callable[[str], str], show: Callable[[str], None] = show_answer,
                read_line: Callable[[str], str] | None = None) -> int:
    """The terminal loop: paste a dialogue, finish with an empty line, read the extraction."""
    print("Paste a doctor–patient dialogue and finish it with an empty line. Type quit or exit (or press Ctrl-D / "
          "Ctrl-C) to leave.", flush=True)
    try:
        while True:
            dialogue = read_dialogue(read_line)
            if dialogue is None:
                break
            print("Extracting…", flush=True)
            show(answer(dialogue))
            print(flush=True)
    except KeyboardInterrupt:
        print()
    print("Bye.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
