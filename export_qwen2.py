"""Export a Qwen v1 model directory (the downloaded Qwen-1_8B-Chat, a merge_params.py merge, a tiny test model) in the
standard Qwen2 format, so that stock transformers (`AutoModelForCausalLM`, `AutoTokenizer`, no project code and no
trust_remote_code), vLLM, SGLang and llama.cpp's converter run it as they run any Qwen2 model.

    python export_qwen2.py --model_path output_dir_qlora/merged --output_dir output_dir_qlora/merged-qwen2

Qwen v1 is, weight for weight, Qwen2: the fused `attn.c_attn` is split into the q/k/v
projections (with their biases), `mlp.w2` (the SiLU side) becomes gate_proj and `mlp.w1` up_proj; RMSNorm, split-half
rotary with base 10000 and the untied head are the same. The output directory holds:

- config.json for Qwen2ForCausalLM and safetensors shards in the source dtype;
- generation_config.json: greedy, predict.py's repetition penalty, ends on <|im_end|> or <|endoftext|>;
- tokenizer.json built by transformers' own tiktoken converter with Qwen's split pattern and an NFC normaliser, and
  tokenizer_config.json with a ChatML chat template whose default system prompt is training's, so
  `apply_chat_template(messages, add_generation_prompt=True)` gives the ids predict.py builds;
- instruction.txt: the extraction instruction (the schema's; the chapter's utils.INSTRUCTION by default; UTF-8),
  which a user message puts before the dialogue, so a client with no project code sends the prompt the model was
  trained on;
- schema.json, the fields the model answers, if the source has one (train.py --schema, carried on by
  merge_params.py) or --schema names one; none means the chapter's eight fields;
- the run's train_args.json if the source has one, and export_info.json (what the self-check measured).

Before anything is put in place, a fresh interpreter that cannot import this project (`python -I`, another working
directory) loads the export with stock transformers and compares its logits with this project's model on a probe
prompt and on random ids (fp32: at most 1e-5; in the source dtype the gap is only reported, since Qwen2 applies the
rotary step in that dtype where Qwen v1 uses fp32), and its token ids with ours on the probe texts and the
instruction prompt. The export is written into a temporary directory beside --output_dir and renamed when checked,
so a failed or interrupted export leaves nothing that half loads; a non-empty --output_dir is replaced only with
--overwrite, and only when it holds a model.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata

import torch
from safetensors.torch import save_file

from medextract.cli import add_schema_argument
from medextract.model_files import LOAD_ERRORS, RANDOM_WEIGHTS_KEY, check_model_files, check_vocabulary
from medextract.schema import SCHEMA_FILE, model_schema, resolve_schema
from utils import (INSTRUCTION, SYSTEM_PROMPT, WEIGHT_FILES, HelpFormatter, apply_usual_permissions,
                   build_chatml_ids, check_output_path, fail, load_tokenizer, one_line, replace_dir,
                   silence_library_deprecations)

PROG = "export_qwen2.py"

INSTRUCTION_FILE = "instruction.txt"  # the schema's instruction, for clients without this project's code
FP32_TOLERANCE = 1e-5  # largest |stock - ours| fp32 logit gap the self-check accepts
# Modules of this project: the self-check's interpreter must find none of them
PROJECT_MODULES = ("qwen1_8", "utils", "medextract", "export_qwen2", "predict", "train", "merge_params")
STOCK_CLASS = "transformers.models.qwen2.modeling_qwen2.Qwen2ForCausalLM"

PROBE_DIALOGUE = "医生: 孩子咳嗽几天了？\n患者: 三天了，晚上更厉害，体温38.5℃，吃过布洛芬。\n医生: 先查个血常规。\n"
# Texts whose ids the self-check compares: what tends to split differently between tokenizers.
PROBE_TEXTS = (
    INSTRUCTION + PROBE_DIALOGUE,
    "emoji 👩‍⚕️🩺💊❤️ 😷🤒 and a flag 🇨🇳",
    unicodedata.normalize("NFD", "café, naïve, Ångström, 한국어 and ﬁ"),  # NFC changes these
    "患者: 头痛\r\n医生: 多久了？\r\n\r\n患者: 两天\r",
    "体温39.5℃，血压120/80mmHg，2024年3月15日，白细胞12345678901，1,000,000, 3.14159, ２０２４年１０月",
    "（１）咳嗽；（２）发热！？：、。“引号”‘单引号’『书名』【检查】……——～",
    "Ibuprofen 布洛芬 イブプロフェン ибупрофен إيبوبروفين ไอบูโพรเฟน",
    "  leading spaces\t\ttabs   and trailing  \n\n\n",
    "literal <|im_end|> text and <|endoftext|><|im_start|>user\n<|extra_3|> typed by a user",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    paths = parser.add_argument_group("paths")
    paths.add_argument("--model_path", default="output_dir_qlora/merged",
                       help="a Qwen v1 model directory: config.json (model_type qwen), weights and qwen.tiktoken; "
                            "merge_params.py's output, or the downloaded Qwen-1_8B-Chat")
    paths.add_argument("--output_dir", default=None,
                       help="where the Qwen2-format model goes; default: --model_path with '-qwen2' appended")
    paths.add_argument("--overwrite", action="store_true",
                       help="replace a non-empty --output_dir that holds a model (an earlier export)")
    paths.add_argument("--max_shard_size", default="5GB",
                       help="largest safetensors shard, e.g. 2GB or 500MB (GB = 10^9 bytes, GiB = 2^30)")
    add_schema_argument(paths, help="the schema file a model trained elsewhere answers, saved in the export as "
                                    "schema.json (its instruction in instruction.txt); default: the model's "
                                    "schema.json, else the chapter's eight fields")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    silence_library_deprecations()
    validate(args)
    started = time.time()
    config = source_config(args.model_path)
    tokenizer = load_tokenizer(args.model_path)
    print(f"exporting {args.model_path} ({config.num_hidden_layers} layers, width {config.hidden_size}) in the "
          f"Qwen2 format to {args.output_dir}", flush=True)

    target = os.path.abspath(args.output_dir)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(target)}-", dir=parent)
    try:
        with tempfile.TemporaryDirectory(prefix="export-qwen2-check-") as work_dir:
            dtype = write_model(args.model_path, config, tokenizer, tmp, work_dir, args.max_shard_bytes,
                                args.answer_schema.instruction)
            write_tokenizer(tokenizer, config, tmp)
            with open(os.path.join(tmp, INSTRUCTION_FILE), "w", encoding="utf-8") as f:
                f.write(args.answer_schema.instruction)
            if args.schema or model_schema(args.model_path) is not None:  # the fields the model answers
                with open(os.path.join(tmp, SCHEMA_FILE), "w", encoding="utf-8") as f:
                    f.write(args.answer_schema.text())
            run_args = os.path.join(args.model_path, "train_args.json")  # the run's lengths, for whoever serves it
            if os.path.isfile(run_args):
                shutil.copyfile(run_args, os.path.join(tmp, "train_args.json"))
            report = run_stock_check(tmp, work_dir)
        judge(report, dtype)
        info = {"model_path": os.path.abspath(args.model_path), "dtype": str(dtype).removeprefix("torch."),
                "check": report}
        with open(os.path.join(tmp, "export_info.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, ensure_ascii=False, indent=2)
        apply_usual_permissions(tmp)  # mkdtemp makes 0700 and safetensors may write 0600
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"saved the Qwen2-format model to {args.output_dir} in {time.time() - started:.0f} s; serve it with "
          f"e.g. `vllm serve {args.output_dir}` (README, Deploy)", flush=True)


# --------------------------------------------------------------------------------------------------------------
# Checks before any work
# --------------------------------------------------------------------------------------------------------------


def validate(args: argparse.Namespace) -> None:
    """The source is a Qwen v1 directory, the output may be written, the shard size parses: all before loading."""
    path = args.model_path
    if not os.path.isdir(path):
        fail(PROG, f"--model_path {path}: " + ("a file, not a model directory" if os.path.exists(path)
                                               else "no such directory"))
    has = set(os.listdir(path))
    if "config.json" not in has:
        if "adapter_config.json" in has:
            fail(PROG, f"--model_path {path} is a train.py checkpoint (a LoRA adapter), not a model: merge it first "
                       f"(python merge_params.py --model_dir {path}) and export the merged directory")
        fail(PROG, f"--model_path {path}: no config.json (not a model directory)")
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        fail(PROG, f"--model_path {path}: cannot read config.json ({e})")
    if model_type == "qwen2":
        fail(PROG, f"--model_path {path} is already in the Qwen2 format (config.json model_type qwen2): nothing to "
                   f"export")
    if model_type != "qwen":
        fail(PROG, f"--model_path {path}: config.json model_type is {model_type!r}, not 'qwen' (a Qwen v1 model "
                   f"such as Qwen-1_8B-Chat or a merge_params.py merge)")
    if not has & set(WEIGHT_FILES):
        fail(PROG, f"--model_path {path}: no weights ({' / '.join(WEIGHT_FILES)})")
    if "qwen.tiktoken" not in has:
        fail(PROG, f"--model_path {path}: no qwen.tiktoken (the tokenizer's vocabulary)")
    try:
        args.max_shard_bytes = parse_size(args.max_shard_size)
    except ValueError as e:
        fail(PROG, f"--max_shard_size {args.max_shard_size!r}: {e}")

    if args.output_dir is None:
        args.output_dir = os.path.normpath(path) + "-qwen2"
        print(f"saving to {args.output_dir} (--output_dir)")
    out, source = os.path.realpath(args.output_dir), os.path.realpath(path)
    if os.path.commonpath([out, source]) in (out, source):
        fail(PROG, f"--output_dir {args.output_dir} is, holds or lies inside --model_path {path}; export somewhere "
                   f"else")
    if os.path.exists(out) and not os.path.isdir(out):
        fail(PROG, f"--output_dir {args.output_dir} is a file")
    if os.path.isdir(out) and os.listdir(out):
        if not args.overwrite:
            fail(PROG, f"--output_dir {args.output_dir} is not empty; pass --overwrite to replace it")
        if not os.path.isfile(os.path.join(out, "config.json")):
            fail(PROG, f"--output_dir {args.output_dir} holds no model (no config.json): --overwrite replaces an "
                       f"earlier export only, never other files; empty it yourself or pick another")
    try:  # written beside itself and renamed into place; then the source's files, read as far as headers
        check_output_path(args.output_dir, "--output_dir", directory=True, replaced=True)
        check_model_files(path)
        check_vocabulary(path)
    except LOAD_ERRORS as e:
        fail(PROG, one_line(e))
    try:
        args.answer_schema = resolve_schema(path, args.schema)
    except ValueError as e:
        fail(PROG, str(e))


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])(i?)B\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError("expected a number and a unit, KB, MB, GB or TB (or KiB ... TiB), e.g. 2GB")
    power = "KMGT".index(match.group(2).upper()) + 1
    return int(float(match.group(1)) * (1024 if match.group(3) else 1000) ** power)


def source_config(model_path: str):
    """The source's QWenConfig, refused where Qwen2 cannot express it."""
    from qwen1_8.configuration_qwen import QWenConfig
    from qwen1_8.tokenization_qwen import SPECIAL_START_ID, SPECIAL_TOKENS

    where = os.path.join(model_path, "config.json")
    try:
        config = QWenConfig.from_pretrained(model_path)
    except (ValueError, TypeError, OSError) as e:
        fail(PROG, f"{where}: {e}")
    unsupported = [(config.rotary_pct != 1.0, f"rotary_pct {config.rotary_pct} (Qwen2 rotates whole heads)"),
                   (not config.no_bias, "no_bias false (Qwen2's o_proj and MLP have no bias)"),
                   (not config.scale_attn_weights, "scale_attn_weights false (Qwen2 scales by 1/sqrt(head_dim))"),
                   (config.intermediate_size % 2, f"odd intermediate_size {config.intermediate_size}"),
                   (config.vocab_size < SPECIAL_START_ID + len(SPECIAL_TOKENS),
                    f"vocab_size {config.vocab_size} (fewer rows than the tokenizer's "
                    f"{SPECIAL_START_ID + len(SPECIAL_TOKENS)} tokens)")]
    for bad, what in unsupported:
        if bad:
            fail(PROG, f"{where}: {what}: not expressible as Qwen2")
    return config


# --------------------------------------------------------------------------------------------------------------
# Config and weights
# --------------------------------------------------------------------------------------------------------------


def qwen2_config(config, dtype: torch.dtype):
    """The Qwen2Config of the same model. Qwen v1's intermediate_size is twice the MLP width; its dynamic NTK and
    logN scaling (beyond seq_length tokens) have no Qwen2 counterpart, so max_position_embeddings = seq_length."""
    from transformers import Qwen2Config

    from qwen1_8.tokenization_qwen import ENDOFTEXT, IMEND, SPECIAL_START_ID, SPECIAL_TOKENS

    eod_id, im_end_id = SPECIAL_START_ID, SPECIAL_START_ID + SPECIAL_TOKENS.index(IMEND)
    assert SPECIAL_TOKENS.index(ENDOFTEXT) == 0
    return Qwen2Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size // 2, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_attention_heads,
        head_dim=config.kv_channels, hidden_act="silu", max_position_embeddings=config.seq_length,
        initializer_range=config.initializer_range, rms_norm_eps=config.layer_norm_epsilon, use_cache=True,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rotary_emb_base)},
        use_sliding_window=False, sliding_window=None, max_window_layers=config.num_hidden_layers,
        attention_dropout=config.attn_dropout_prob, bos_token_id=eod_id, eos_token_id=im_end_id,
        pad_token_id=eod_id, architectures=["Qwen2ForCausalLM"], dtype=dtype)


def qwen2_state_dict(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Qwen v1 weights under Qwen2's names, in Qwen2's order; q/k/v are views of c_attn's thirds (no copy,
    so meta tensors work too). Every source tensor must be used exactly once."""
    left = dict(state)

    def take(name: str) -> torch.Tensor:
        if name not in left:
            raise ValueError(f"the source has no {name}")
        return left.pop(name)

    out = {"model.embed_tokens.weight": take("transformer.wte.weight")}
    for i in range(num_layers):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        weight, bias = take(src + "attn.c_attn.weight"), take(src + "attn.c_attn.bias")
        if weight.shape[0] % 3 or bias.shape != weight.shape[:1]:
            raise ValueError(f"{src}attn.c_attn: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} are not "
                             f"three stacked projections")
        for proj, w, b in zip("qkv", weight.chunk(3, dim=0), bias.chunk(3, dim=0)):  # rows: q, then k, then v
            out[f"{dst}self_attn.{proj}_proj.weight"] = w
            out[f"{dst}self_attn.{proj}_proj.bias"] = b
        out[dst + "self_attn.o_proj.weight"] = take(src + "attn.c_proj.weight")
        out[dst + "mlp.gate_proj.weight"] = take(src + "mlp.w2.weight")  # w2 is the SiLU side
        out[dst + "mlp.up_proj.weight"] = take(src + "mlp.w1.weight")
        out[dst + "mlp.down_proj.weight"] = take(src + "mlp.c_proj.weight")
        out[dst + "input_layernorm.weight"] = take(src + "ln_1.weight")
        out[dst + "post_attention_layernorm.weight"] = take(src + "ln_2.weight")
    out["model.norm.weight"] = take("transformer.ln_f.weight")
    out["lm_head.weight"] = take("lm_head.weight")
    if left:
        raise ValueError(f"the source has tensors with no Qwen2 counterpart: {', '.join(sorted(left)[:5])}")
    return out


def write_weights(state: dict[str, torch.Tensor], directory: str, max_shard_bytes: int) -> list[str]:
    """Safetensors shards of at most max_shard_bytes (a larger single tensor gets a shard of its own), named as
    transformers names them, with model.safetensors.index.json when there are several."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for i, (name, shard) in enumerate(zip(names, shards), 1):
        megabytes = sum(t.numel() * t.element_size() for t in shard.values()) / 1e6
        print(f"  writing {name} ({i}/{len(shards)}, {megabytes:.0f} MB)", flush=True)
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {tensor: name for name, shard in zip(names, shards) for tensor in shard}}
        with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    return names


def generation_config():
    """predict.py's decoding (greedy, its repetition penalty and answer budget), ending where an answer ends."""
    from transformers import GenerationConfig

    from medextract.engine import Decoding
    from qwen1_8.tokenization_qwen import IMEND, SPECIAL_START_ID, SPECIAL_TOKENS

    defaults = Decoding()
    eod_id, im_end_id = SPECIAL_START_ID, SPECIAL_START_ID + SPECIAL_TOKENS.index(IMEND)
    return GenerationConfig(bos_token_id=eod_id, eos_token_id=[im_end_id, eod_id], pad_token_id=eod_id,
                            do_sample=False, repetition_penalty=defaults.repetition_penalty,
                            max_new_tokens=defaults.max_new_tokens)


def write_model(model_path: str, config, tokenizer, out_dir: str, work_dir: str, max_shard_bytes: int,
                instruction: str = INSTRUCTION) -> torch.dtype:
    """Weights, config.json and generation_config.json into out_dir; our model's reference outputs (ids and logits,
    in fp32 and in the source dtype, on a prompt with `instruction`) into work_dir for the self-check. Returns the
    source dtype."""
    from qwen1_8.modeling_qwen import QWenLMHeadModel

    print("  loading the source model", flush=True)
    model = QWenLMHeadModel.from_pretrained(model_path, dtype="auto").eval()
    dtype = model.dtype
    write_weights(qwen2_state_dict(model.state_dict(), config.num_hidden_layers), out_dir, max_shard_bytes)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        f.write(qwen2_config_json(config, dtype))
    generation_config().save_pretrained(out_dir)

    print("  computing this project's reference logits", flush=True)
    expected, tensors = reference_inputs(tokenizer, instruction)
    with torch.no_grad():
        if dtype != torch.float32:
            for probe in ("prompt", "random"):
                tensors[f"{probe}_logits_source"] = model(input_ids=tensors[f"{probe}_ids"],
                                                          use_cache=False).logits.float()
            del model  # a fresh fp32 copy, rather than upcasting buffers the source dtype may have rounded
            gc.collect()
            model = QWenLMHeadModel.from_pretrained(model_path, dtype=torch.float32).eval()
        for probe in ("prompt", "random"):
            tensors[f"{probe}_logits_float32"] = model(input_ids=tensors[f"{probe}_ids"], use_cache=False).logits
    del model
    gc.collect()  # before the check's interpreter loads its own copies
    expected["dtype"] = str(dtype).removeprefix("torch.")
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(work_dir, "expected.safetensors"))
    with open(os.path.join(work_dir, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False)
    return dtype


def qwen2_config_json(config, dtype: torch.dtype) -> str:
    """config.json as transformers 5 writes it, plus the rotary base and the dtype under the names transformers 4
    used (top-level rope_theta, torch_dtype), which servers and converters pinned to it still read: without
    torch_dtype, such a server takes a bf16 model for an fp32 one. transformers 5 reads both, consistently."""
    q2 = json.loads(qwen2_config(config, dtype).to_json_string())
    q2["rope_theta"] = q2["rope_parameters"]["rope_theta"]
    q2["torch_dtype"] = q2["dtype"]
    if getattr(config, RANDOM_WEIGHTS_KEY, False):  # a make_tiny model stays marked (stock transformers keeps the key)
        q2[RANDOM_WEIGHTS_KEY] = True
    return json.dumps(q2, indent=2, sort_keys=True) + "\n"


def reference_inputs(tokenizer, instruction: str = INSTRUCTION) -> tuple[dict, dict[str, torch.Tensor]]:
    """What the self-check compares: our ids of PROBE_TEXTS (content is text: allowed_special=set()), the generation
    prompt of the instruction (the schema's) + probe dialogue as a chat message, and two id sequences to compute
    logits on."""
    messages = [{"role": "user", "content": instruction + PROBE_DIALOGUE}]
    prompt = build_chatml_ids(tokenizer, messages[0]["content"], None, max_len=2048, max_src_len=1560).input_ids
    generator = torch.Generator().manual_seed(0)
    random_ids = torch.randint(0, tokenizer.eod_id, (1, 64), generator=generator)  # ordinary tokens only
    expected = {"texts": list(PROBE_TEXTS),
                "text_ids": [tokenizer.encode(t, allowed_special=set()) for t in PROBE_TEXTS],
                "messages": messages, "prompt_ids": prompt, "project_modules": list(PROJECT_MODULES),
                "project_root": os.path.dirname(os.path.realpath(__file__))}
    return expected, {"prompt_ids": torch.tensor([prompt]), "random_ids": random_ids}


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


def chat_template(system: str = SYSTEM_PROMPT) -> str:
    """ChatML exactly as utils.build_chatml_ids lays it out: every block followed by "\\n", the default system
    message first, and with add_generation_prompt the open assistant block."""
    return ("{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system_message = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
            "{%- else -%}"
            f"{{%- set system_message = {json.dumps(system, ensure_ascii=False)} -%}}{{%- set turns = messages -%}}"
            "{%- endif -%}"
            "{{- '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' -}}"
            "{%- for message in turns -%}"
            "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


def fast_tokenizer(tokenizer):
    """transformers' tiktoken converter over our tokenizer's ranks, with Qwen's split pattern (single digits, where
    the converter's default takes up to three: Qwen's vocabulary joins digits only in full-width １０ and ２０, so
    that is where it shows), NFC as our tokenizer normalises, and the 208 special tokens at 151643-151850."""
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from qwen1_8.tokenization_qwen import PAT_STR

    class QwenTikTokenConverter(TikTokenConverter):
        def load_tiktoken_bpe(self, _vocab_file: str) -> dict[bytes, int]:
            # the ranks our tokenizer already read and checked (tiktoken's own loader caches files by path)
            return tokenizer.mergeable_ranks

    specials = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
    converted = QwenTikTokenConverter(pattern=PAT_STR, extra_special_tokens=specials).converted()
    converted.normalizer = normalizers.NFC()
    wrong = [t for t in specials if converted.token_to_id(t) != tokenizer.special_tokens[t]]
    if converted.get_vocab_size() != len(tokenizer) or wrong:
        raise ValueError(f"the converted vocabulary has {converted.get_vocab_size()} tokens for {len(tokenizer)}, "
                         f"special tokens at other ids: {wrong[:3]}")
    return converted


def write_tokenizer(tokenizer, config, out_dir: str) -> None:
    """tokenizer.json and tokenizer_config.json (chat template inside it, where every consumer looks)."""
    from transformers import PreTrainedTokenizerFast

    from qwen1_8.tokenization_qwen import ENDOFTEXT, IMEND

    print("  converting the tokenizer (transformers' tiktoken converter)", flush=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=fast_tokenizer(tokenizer), eos_token=IMEND, pad_token=ENDOFTEXT,
                                   model_max_length=config.seq_length, clean_up_tokenization_spaces=False,
                                   chat_template=chat_template())
    fast.save_pretrained(out_dir, save_jinja_files=False)
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        settings = json.load(f)
    # Qwen2's own names: AutoTokenizer then builds Qwen2Tokenizer (Qwen2TokenizerFast in transformers 4) from
    # tokenizer.json. Special-token text in content stays text only with split_special_tokens=True (README).
    settings.update(tokenizer_class="Qwen2Tokenizer", bos_token=None, unk_token=None, errors="replace",
                    split_special_tokens=False, add_prefix_space=False)
    settings.pop("backend", None)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(settings, f, ensure_ascii=False, indent=2, sort_keys=True)


# --------------------------------------------------------------------------------------------------------------
# The self-check, in a fresh interpreter with stock transformers only
# --------------------------------------------------------------------------------------------------------------


def stock_check(export_dir: str, work_dir: str) -> None:
    """Runs in `python -I` (see run_stock_check), so it imports only the standard library, torch, safetensors and
    transformers: loads the export as any user would, measures it against work_dir's expectations and writes
    work_dir/report.json."""
    import importlib.util
    import json
    import os
    import unicodedata

    import torch
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(os.path.join(work_dir, "expected.json"), encoding="utf-8") as f:
        expected = json.load(f)
    tensors = load_file(os.path.join(work_dir, "expected.safetensors"))
    # this project's modules, found where they live: none may be importable here
    root = expected["project_root"]
    found = {m: importlib.util.find_spec(m) for m in expected["project_modules"]}
    report = {"project_importable": [m for m, spec in found.items() if spec is not None and spec.origin and
                                     os.path.realpath(spec.origin).startswith(root + os.sep)]}

    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    report["tokenizer_class"] = type(tokenizer).__name__
    pairs = list(zip(expected["texts"], expected["text_ids"]))
    report["texts"] = len(pairs)
    report["text_id_mismatches"] = [i for i, (text, ids) in enumerate(pairs) if tokenizer.encode(
        text, add_special_tokens=False, split_special_tokens=True) != ids]
    report["decode_mismatches"] = [i for i, (text, ids) in enumerate(pairs)
                                   if tokenizer.decode(ids) != unicodedata.normalize("NFC", text)]
    # transformers 5's Qwen2Tokenizer takes vocab and merges from tokenizer.json but builds its own split pattern and
    # normaliser; transformers 4, servers and converters read the file whole, so check it as it stands too
    raw = Tokenizer.from_file(os.path.join(export_dir, "tokenizer.json"))
    raw.encode_special_tokens = True
    report["tokenizer_json_mismatches"] = [i for i, (text, ids) in enumerate(pairs)
                                           if raw.encode(text, add_special_tokens=False).ids != ids]
    prompt = tokenizer.apply_chat_template(expected["messages"], add_generation_prompt=True, return_dict=False)
    report["prompt_tokens"] = len(expected["prompt_ids"])
    report["prompt_ids_equal"] = list(prompt) == expected["prompt_ids"]

    runs = [("float32", torch.float32)] + ([("source", "auto")] if expected["dtype"] != "float32" else [])
    for name, dtype in runs:
        model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=dtype).eval()
        report[f"{name}_model"] = f"{type(model).__module__}.{type(model).__name__}"
        report[f"{name}_model_dtype"] = str(model.dtype).removeprefix("torch.")
        for probe in ("prompt", "random"):
            with torch.no_grad():
                logits = model(input_ids=tensors[f"{probe}_ids"]).logits.float()
            ours = tensors[f"{probe}_logits_{name}"]
            report[f"{name}_{probe}_max_gap"] = (logits - ours).abs().max().item()
            report[f"{name}_{probe}_argmax_agree"] = (logits.argmax(-1) == ours.argmax(-1)).float().mean().item()
        del model
    with open(os.path.join(work_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)


def run_stock_check(export_dir: str, work_dir: str) -> dict:
    """stock_check's source in `python -I` (no PYTHON* variables, no script or working directory on sys.path),
    started in work_dir with PYTHONPATH removed: this project cannot be imported there."""
    print("  checking the export in a fresh process with stock transformers only", flush=True)
    code = inspect.getsource(stock_check) + f"\nstock_check({os.path.abspath(export_dir)!r}, {work_dir!r})\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=work_dir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        fail(PROG, f"the stock transformers check could not load or run the export: {last}; nothing written")
    with open(os.path.join(work_dir, "report.json"), encoding="utf-8") as f:
        return json.load(f)


def judge(report: dict, dtype: torch.dtype) -> None:
    """Print what the check measured; fail on anything but rounding in the source dtype."""
    problems = []
    if report["project_importable"]:
        problems.append(f"the check's interpreter could import this project "
                        f"({', '.join(report['project_importable'])})")
    if report["float32_model"] != STOCK_CLASS:
        problems.append(f"stock transformers loaded {report['float32_model']}, not {STOCK_CLASS}")
    source = str(dtype).removeprefix("torch.")
    if report.get("source_model_dtype", source) != source:
        problems.append(f"dtype='auto' loads the export in {report['source_model_dtype']}, not the source's {source}")
    if report["text_id_mismatches"]:
        problems.append(f"token ids differ from ours on probe text(s) {report['text_id_mismatches']}")
    if report["tokenizer_json_mismatches"]:
        problems.append(f"tokenizer.json read as it stands gives other ids than ours on probe text(s) "
                        f"{report['tokenizer_json_mismatches']}")
    if report["decode_mismatches"]:
        problems.append(f"decoding does not give back probe text(s) {report['decode_mismatches']}")
    if not report["prompt_ids_equal"]:
        problems.append("apply_chat_template(add_generation_prompt=True) differs from our instruction prompt")
    for probe in ("prompt", "random"):
        gap = report[f"float32_{probe}_max_gap"]
        if not gap <= FP32_TOLERANCE:
            problems.append(f"fp32 logits on the {probe} probe differ from ours by {gap:.3e} > {FP32_TOLERANCE:g}")
    same = report["texts"] - len(set(report["text_id_mismatches"]) | set(report["tokenizer_json_mismatches"]))
    print(f"  {report['float32_model'].rsplit('.', 1)[-1]}, {report['tokenizer_class']} and tokenizer.json as it "
          f"stands: token ids equal ours on {same}/{report['texts']} probe texts, the chat template's "
          f"{report['prompt_tokens']}-token instruction prompt "
          f"{'equal' if report['prompt_ids_equal'] else 'DIFFERENT'}",
          flush=True)
    print(f"  max |stock - ours| fp32 logit gap: {report['float32_prompt_max_gap']:.3e} (prompt), "
          f"{report['float32_random_max_gap']:.3e} (random ids); allowed {FP32_TOLERANCE:g}", flush=True)
    if "source_prompt_max_gap" in report:
        name = str(dtype).removeprefix("torch.")
        print(f"  in {name} (reported, not checked: Qwen2 rotates q/k in {name}, Qwen v1 in fp32): max gap "
              f"{report['source_prompt_max_gap']:.3e} (prompt), {report['source_random_max_gap']:.3e} (random ids); "
              f"same argmax at {report['source_prompt_argmax_agree']:.1%} / {report['source_random_argmax_agree']:.1%} "
              f"of positions", flush=True)
    if problems:
        fail(PROG, "; ".join(problems) + "; nothing written")


if __name__ == "__main__":
    main()
