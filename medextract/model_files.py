"""Checks of model and adapter files before anything loads them, shared by train.py, merge_params.py and predict.py.

A truncated or garbage safetensors file, a malformed adapter_config.json or an adapter trained on a base of another
shape each made a library fail minutes in, with a traceback that named neither the file nor what was wrong with it.
These checks read only JSON and the safetensors headers (a few kilobytes per file, never the weights), so they cost
nothing next to loading, and each failure is one ValueError naming the file and the fault.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct

from safetensors import SafetensorError

# Bytes per element of the safetensors dtypes a checkpoint may hold
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit

# What loading a checked model or adapter can still raise for a bad file (a corrupt tensor body, a full disk), the
# safetensors library's own error included
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, SafetensorError)

# peft's name of a LoRA matrix in adapter_model.safetensors: base_model.model.<layer>.lora_A.weight
LORA_TENSOR = re.compile(r"^base_model\.model\.(?P<layer>.+)\.lora_(?P<which>[AB])\.weight$")


def read_json_object(path: str) -> dict:
    """The JSON object in `path`; ValueError naming the file when it cannot be read or is not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def safetensors_header(path: str) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} of a safetensors file, after checking that the header is
    well formed and that the file holds exactly the bytes it describes (so a truncated copy is caught here)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
            if length is None or length > min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"{path}: not a safetensors file ({size} bytes, no valid header length)")
            raw = f.read(length)
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (its header is not a JSON object)")
    tensors, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not (all(isinstance(n, int) and n >= 0 for n in (*shape, begin, stop)) and begin <= stop):
                raise ValueError
            nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors header (tensor {name!r:.80} is not described by a dtype, "
                             f"a shape and two data offsets)") from None
        if stop - begin != nbytes:
            raise ValueError(f"{path}: corrupt safetensors header (tensor {name!r:.80} of shape {shape} {dtype} "
                             f"would need {nbytes} bytes, its offsets give {stop - begin})")
        tensors[name] = entry
        end = max(end, stop)
    data = size - 8 - length
    if data < end:
        raise ValueError(f"{path}: truncated: its header describes {end} bytes of tensor data, the file holds "
                         f"{data}; copy or download it again")
    if data > end:
        raise ValueError(f"{path}: corrupt: {data - end} bytes beyond the tensors its header describes")
    return tensors


def weight_shards(model_dir: str) -> list[str]:
    """The safetensors files of a model directory, as transformers would load them: model.safetensors, or the shards
    its model.safetensors.index.json names; [] for a model with pickled .bin weights only."""
    single = os.path.join(model_dir, "model.safetensors")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if not os.path.isfile(index):
        return []
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: has no 'weight_map' of tensor names to shard files")
    shards = [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not os.path.isfile(shard):
            raise ValueError(f"{index}: names the shard {os.path.basename(shard)}, which is missing")
    return shards


def check_model_files(model_dir: str) -> dict[str, list[int]]:
    """Check a model directory's config.json and safetensors weights; returns {tensor name: shape} of its weights
    ({} for .bin weights, which are not read until they load)."""
    read_json_object(os.path.join(model_dir, "config.json"))
    shapes = {}
    for shard in weight_shards(model_dir):
        shapes.update({name: entry["shape"] for name, entry in safetensors_header(shard).items()})
    return shapes


def check_vocabulary(model_dir: str) -> None:
    """Check that a model directory's qwen.tiktoken holds `<base64 bytes> <rank>` lines (the tokenizer's own parser
    names the first bad line), at least one."""
    from qwen1_8.tokenization_qwen import load_tiktoken_bpe

    path = os.path.join(model_dir, "qwen.tiktoken")
    try:
        ranks = load_tiktoken_bpe(path)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the tokenizer's vocabulary ({e.strerror})") from None
    if not ranks:
        raise ValueError(f"{path}: the tokenizer's vocabulary is empty; copy qwen.tiktoken from the base model")


def check_adapter_files(checkpoint: str, base_shapes: dict[str, list[int]] | None = None) -> dict:
    """Check a train.py checkpoint's adapter_config.json and adapter_model.safetensors, and, given the base's
    {tensor name: shape}, that every LoRA pair fits the layer it adapts (an adapter trained on another base shape
    would fail deep inside peft). Returns the adapter config."""
    config_path = os.path.join(checkpoint, "adapter_config.json")
    config = read_json_object(config_path)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path}: peft_type is {config['peft_type']!r:.40}, not LORA (train.py trains LoRA)")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
        raise ValueError(f"{config_path}: 'r' (the LoRA rank) must be a positive integer, got {rank!r:.40}")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool)):
        raise ValueError(f"{config_path}: 'lora_alpha' must be a number, got {alpha!r:.40}")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise ValueError(f"{config_path}: 'base_model_name_or_path' must be a path, got {base!r:.40}")

    weights_path = os.path.join(checkpoint, "adapter_model.safetensors")
    layers: dict[str, dict[str, list[int]]] = {}
    for name, entry in safetensors_header(weights_path).items():
        match = LORA_TENSOR.match(name)
        if match:
            layers.setdefault(match["layer"], {})[match["which"]] = entry["shape"]
    if not layers:
        raise ValueError(f"{weights_path}: holds no LoRA weights (no base_model.model.*.lora_A/B.weight tensors)")
    fixed_rank = not config.get("rank_pattern")  # a rank_pattern gives some layers another rank
    for layer, pair in sorted(layers.items()):
        a, b = pair.get("A"), pair.get("B")
        if a is None or b is None or len(a) != 2 or len(b) != 2 or a[0] != b[1] or (fixed_rank and a[0] != rank):
            raise ValueError(f"{weights_path}: {layer} has no rank-{rank} pair of lora_A (r x in) and lora_B (out x r) "
                             f"matrices (lora_A {a}, lora_B {b}; adapter_config.json says r = {rank})")
        if base_shapes is None:
            continue
        weight = base_shapes.get(f"{layer}.weight")
        if weight is None:
            raise ValueError(f"{weights_path}: adapts {layer}, a layer the base model does not have (an adapter of "
                             f"another model)")
        if config.get("fan_in_fan_out"):  # the base stores W as in x out
            weight = weight[::-1]
        if [b[0], a[1]] != list(weight):
            raise ValueError(f"{weights_path}: adapts {layer} as a {b[0]} x {a[1]} layer, but the base model's is "
                             f"{' x '.join(map(str, weight))}: an adapter trained on a base of another shape")
    return config


# config.json key that qwen1_8.make_tiny sets; QWenConfig keeps it, so merge_params.py and export_qwen2.py carry it
RANDOM_WEIGHTS_KEY = "random_weights"
# What every place that shows a random model's answers says, once (predict.py, test_qwen.py; the service's page)
RANDOM_WEIGHTS_NOTE = ("note: this model has random weights (made by qwen1_8.make_tiny): its answers show the "
                       "pipeline, not extraction quality")


def has_random_weights(model_dir: str) -> bool:
    """Whether `model_dir` holds a model made by qwen1_8.make_tiny, or one merged or exported from it (config.json
    says "random_weights": true), or is a train.py checkpoint whose base is such a model (its adapter_config.json
    names the base). A directory whose files cannot be read counts as not: the checks that load it say why."""
    config = os.path.join(model_dir, "config.json")
    try:
        if not os.path.isfile(config):
            base = read_json_object(os.path.join(model_dir, "adapter_config.json")).get("base_model_name_or_path")
            if not isinstance(base, str):
                return False
            config = os.path.join(base, "config.json")
        return read_json_object(config).get(RANDOM_WEIGHTS_KEY) is True
    except ValueError:
        return False
