"""export_qwen2.py: a tiny model with a LoRA adapter, merged by merge_params.py (in bf16, as the published model is)
and exported, then loaded by stock transformers in a process that cannot import this project: fp32 logits equal ours,
greedy decoding equals ours, a left-padded batch equals its rows alone. The tokenizer gives our ids on every dialogue
of data/all.json, on strings built to split differently and on the vocabulary itself, and its chat template gives
build_chatml_ids's prompt. A model's schema.json travels into the export, its instruction into instruction.txt.
The 1.8B layout is checked on meta tensors; refusals and interruptions leave nothing."""
import json
import os
import random
import subprocess
import sys
import unicodedata

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import export_qwen2
import merge_params
from medextract.schema import CHAPTER_SCHEMA, SCHEMA_FILE, load_schema, schema_from_json
from utils import INSTRUCTION, build_chatml_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS_IDS = [151645, 151643]  # <|im_end|>, <|endoftext|>
THREE = schema_from_json({"fields": [{"name": "症状", "kind": "spans"}, {"name": "药品名称", "kind": "spans"},
                                     {"name": "诊断结果", "kind": "text"}]}, "three.json")

# Run by the stock interpreter (`python -I`, cwd elsewhere, no PYTHONPATH): only the standard library, torch,
# safetensors and transformers. Reads ids from inputs.json, writes its logits and generations to stock.safetensors.
STOCK_SCRIPT = r'''
import importlib.util, json, os, sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2ForCausalLM

export, work, root = sys.argv[1:4]
for name in ("qwen1_8", "utils", "export_qwen2", "predict"):
    spec = importlib.util.find_spec(name)
    assert spec is None or not spec.origin or not os.path.realpath(spec.origin).startswith(root), spec.origin
assert not [p for p in sys.path if os.path.realpath(p or ".") == root], sys.path
with open(os.path.join(work, "inputs.json"), encoding="utf-8") as f:
    inputs = json.load(f)
model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
assert type(model) is Qwen2ForCausalLM and model.dtype == torch.float32, (type(model), model.dtype)
config = GenerationConfig.from_pretrained(export)
assert (config.do_sample, config.repetition_penalty, config.eos_token_id, config.pad_token_id) == \
    (False, 1.1, [151645, 151643], 151643), config
out = {}
with torch.no_grad():
    for name in ("prompt", "random"):
        out[name + "_logits"] = model(input_ids=torch.tensor([inputs[name]])).logits
    steps = dict(max_new_tokens=30, min_new_tokens=30)  # the rest from generation_config.json: greedy, penalty 1.1
    out["greedy"] = model.generate(torch.tensor([inputs["prompt"]]), **steps)[0]
    rows = inputs["batch"]
    width = max(map(len, rows))
    ids = torch.tensor([[151643] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    batch = model.generate(ids, attention_mask=mask, **steps)[:, width:]
    for i, r in enumerate(rows):
        out[f"batch_{i}"] = batch[i]
        out[f"alone_{i}"] = model.generate(torch.tensor([r]), **steps)[0, len(r):]
save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(work, "stock.safetensors"))
'''


def lora_checkpoint(base: str, out) -> str:
    """A checkpoint as train.py leaves one: a LoRA adapter on every linear layer but lm_head (random, B too, so the
    update is not zero), the tokenizer files, train_args.json and schema.json. The export carries the merge,
    not the training: train.py -> merge_params.py is run whole by the recall tests (test_memorise_recall.py,
    test_schema_recall.py)."""
    from peft import LoraConfig, get_peft_model

    from medextract.qlora import lora_target_names
    from qwen1_8.modeling_qwen import QWenLMHeadModel
    from utils import load_tokenizer

    model = QWenLMHeadModel.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=lora_target_names(model), task_type="CAUSAL_LM")
    adapted = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero; a few training steps' worth of update instead
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    adapted.save_pretrained(str(out), safe_serialization=True)
    load_tokenizer(base).save_pretrained(str(out))
    (out / "train_args.json").write_text(json.dumps({"args": {"max_len": 160, "max_src_len": 64,
                                                              "truncation": "tokens"}}), encoding="utf-8")
    (out / SCHEMA_FILE).write_text(CHAPTER_SCHEMA.text(), encoding="utf-8")
    return str(out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA checkpoint -> merge_params.py --dtype bf16 -> export_qwen2.py, on a tiny model whose 0.2 init gives
    logits with clear winners (Qwen's 0.02 makes a width-64 model's logits nearly flat)."""
    from qwen1_8.make_tiny import make_tiny

    d = tmp_path_factory.mktemp("export")
    base = make_tiny(str(d / "tiny"), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=256, seed=0, initializer_range=0.2)
    checkpoint = lora_checkpoint(base, d / "run" / "epoch-1-step-2")
    merged, export = str(d / "merged"), str(d / "merged-qwen2")
    merge_params.main(["--ori_model_dir", base, "--model_dir", checkpoint, "--save_model_dir", merged, "--device",
                       "cpu", "--dtype", "bf16"])
    export_qwen2.main(["--model_path", merged, "--max_shard_size", "30MB"])  # default output: merged-qwen2
    return merged, export


@pytest.fixture(scope="module")
def stock_tokenizer(trained):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained[1])
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    return tokenizer


def test_export_files_dtype_and_permissions(trained):
    merged, export = trained
    files = set(os.listdir(export))
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "train_args.json",
            "export_info.json", "model.safetensors.index.json", "instruction.txt"} <= files
    with open(os.path.join(export, "instruction.txt"), encoding="utf-8") as f:
        assert f.read() == INSTRUCTION  # what a client with no project code puts before the dialogue
    assert load_schema(os.path.join(export, SCHEMA_FILE)) == load_schema(os.path.join(merged, SCHEMA_FILE)) \
        == CHAPTER_SCHEMA  # the checkpoint's, carried by merge_params.py and on into the export
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) >= 2 and not [f for f in files if f.endswith((".py", ".bin", ".tiktoken"))]
    for shard in shards:
        with safe_open(os.path.join(export, shard), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # the source dtype, as merged
    assert not [f for f in os.listdir(os.path.dirname(export)) if f.startswith(".tmp")]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(export).st_mode & 0o777 == 0o777 & ~umask
    assert {os.stat(os.path.join(export, f)).st_mode & 0o777 for f in files} == {0o666 & ~umask}

    with open(os.path.join(export, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert (config["head_dim"], config["intermediate_size"], config["max_position_embeddings"]) == (16, 128, 8192)
    assert not config["tie_word_embeddings"] and not config["use_sliding_window"] and config["sliding_window"] is None
    assert config["dtype"] == config["torch_dtype"] == "bfloat16" and config["rope_theta"] == 10000.0
    assert "auto_map" not in config
    assert config["random_weights"] is True  # make_tiny's mark, through train, merge and export
    with open(os.path.join(export, "tokenizer_config.json"), encoding="utf-8") as f:
        tok_config = json.load(f)
    assert "You are a helpful assistant." in tok_config["chat_template"]
    with open(os.path.join(export, "export_info.json"), encoding="utf-8") as f:
        check = json.load(f)["check"]
    assert check["float32_prompt_max_gap"] <= 1e-5 and check["float32_random_max_gap"] <= 1e-5
    assert check["source_model_dtype"] == "bfloat16" and check["source_prompt_max_gap"] >= 0  # reported
    assert check["prompt_ids_equal"] and not check["text_id_mismatches"] and not check["project_importable"]


def test_stock_transformers_in_a_process_without_project_code(trained, stock_tokenizer, tmp_path):
    from transformers import GenerationConfig

    from qwen1_8.modeling_qwen import QWenLMHeadModel
    from utils import load_tokenizer

    merged, export = trained
    tokenizer = load_tokenizer(merged)
    prompt = build_chatml_ids(tokenizer, INSTRUCTION + "患者：咳嗽三天了。\n医生：吃点布洛芬。\n", None, 2048,
                              1560).input_ids
    short = build_chatml_ids(tokenizer, "患者：发烧。", None, 2048, 1560).input_ids
    inputs = {"prompt": prompt, "random": torch.randint(0, 151851, (80,), generator=torch.Generator().manual_seed(1))
              .tolist(), "batch": [prompt, short]}
    (tmp_path / "inputs.json").write_text(json.dumps(inputs), encoding="utf-8")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", STOCK_SCRIPT, export, str(tmp_path), os.path.realpath(ROOT)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = load_file(tmp_path / "stock.safetensors")

    ours = QWenLMHeadModel.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        for name in ("prompt", "random"):
            expected = ours(input_ids=torch.tensor([inputs[name]]), use_cache=False).logits
            torch.testing.assert_close(stock[name + "_logits"], expected, atol=1e-5, rtol=0)
        config = GenerationConfig(max_new_tokens=30, min_new_tokens=30, do_sample=False, repetition_penalty=1.1,
                                  eos_token_id=EOS_IDS, pad_token_id=151643)
        greedy = ours.generate(torch.tensor([prompt]), generation_config=config)[0]
    assert greedy.tolist() == stock["greedy"].tolist() and len(greedy) == len(prompt) + 30
    for i in range(2):
        assert stock[f"batch_{i}"].tolist() == stock[f"alone_{i}"].tolist()


def test_tokenizer_ids_equal_ours(trained, stock_tokenizer, tokenizer):
    from tokenizers import Tokenizer

    with open(os.path.join(ROOT, "data", "all.json"), encoding="utf-8") as f:
        dialogues = [r["dialogue_text"] for r in json.load(f)]
    rng = random.Random(0)
    blocks = [(0x20, 0x7F), (0xA0, 0x250), (0x300, 0x370), (0x400, 0x500), (0x600, 0x700), (0x3000, 0x3040),
              (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xFF00, 0xFFEF), (0x1F300, 0x1FAFF)]
    fuzz = ["".join(chr(rng.randrange(*rng.choice(blocks))) if rng.random() < 0.9 else rng.choice(" \n\r\t0123456789")
                    for _ in range(rng.randrange(1, 40))) for _ in range(3000)]
    tricky = list(export_qwen2.PROBE_TEXTS) + [
        "👨‍👩‍👧‍👦 family, 🏳️‍🌈, skin tone 👍🏽, keycap 1️⃣",
        unicodedata.normalize("NFD", "Việt Nam, Ελληνικά, éàü, ㄱㅏ") + "e\u0301\u0323 (combining order changes)",
        "a\r\nb\rc\n\rd\r\n\r\n  \r\n",
        "0 12 345 6789 3.1415926 1e-5 ２０２４ ①②③ ¹²³",
        "，。！？；：“”‘’（）【】《》〈〉「」『』—…·、～",
        "中文English日本語한국어Русскийالعربية",
        " <|im_start|>system\n<|im_end|><|endoftext|><|extra_0|><|extra_204|> <|im_end",
    ]
    texts = dialogues + fuzz + tricky
    got = stock_tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    expected = [tokenizer.encode(t, allowed_special=set()) for t in texts]
    assert [i for i, (a, b) in enumerate(zip(got, expected)) if a != b] == []
    # the file as transformers 4, servers and converters read it (transformers 5 rebuilds pattern and normaliser)
    raw = Tokenizer.from_file(os.path.join(trained[1], "tokenizer.json"))
    raw.encode_special_tokens = True
    got_raw = [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)]
    assert [i for i, (a, b) in enumerate(zip(got_raw, expected)) if a != b] == []
    decoded = stock_tokenizer.batch_decode(got)
    assert [i for i, (t, d) in enumerate(zip(texts, decoded)) if d != unicodedata.normalize("NFC", t)] == []
    # every vocabulary entry that is whole UTF-8 text in NFC
    entries = []
    for token in tokenizer.mergeable_ranks:
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if unicodedata.is_normalized("NFC", text):
            entries.append(text)
    got = stock_tokenizer(entries, add_special_tokens=False)["input_ids"]
    assert sum(a != tokenizer.encode(t, allowed_special=set()) for a, t in zip(got, entries)) == 0
    assert len(entries) > 100_000
    # without split_special_tokens literal special text is a control token: the known difference (README, Deploy)
    assert stock_tokenizer.encode("a<|im_end|>", add_special_tokens=False) == [64, 151645]
    assert len(stock_tokenizer) == 151851
    assert (stock_tokenizer.eos_token_id, stock_tokenizer.pad_token_id, stock_tokenizer.bos_token_id) == \
        (151645, 151643, None)


def test_chat_template_is_build_chatml_ids_prompt(trained, stock_tokenizer, tokenizer):
    with open(os.path.join(ROOT, "data", "all.json"), encoding="utf-8") as f:
        users = [INSTRUCTION + r["dialogue_text"] for r in json.load(f)]
    system = "你是一名医疗信息抽取助手。"
    for messages, kwargs in (([[{"role": "user", "content": u}] for u in users], {}),
                             ([[{"role": "system", "content": system}, {"role": "user", "content": u}]
                               for u in users], {"system": system})):
        got = stock_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        expected = [build_chatml_ids(tokenizer, u, None, 10**6, 10**6 - 1, **kwargs).input_ids for u in users]
        assert [i for i, (a, b) in enumerate(zip(got, expected)) if list(a) != b] == []


def test_the_1_8b_layout_on_meta_tensors():
    """The same mapping and config code export uses, on a meta 1.8B model: Qwen2's names and shapes, same count."""
    from transformers import Qwen2ForCausalLM

    from qwen1_8.configuration_qwen import QWenConfig
    from qwen1_8.modeling_qwen import QWenLMHeadModel

    config = QWenConfig()  # the 1.8B defaults, as the published config.json
    with torch.device("meta"):
        ours = QWenLMHeadModel(config)
    mapped = export_qwen2.qwen2_state_dict(ours.state_dict(), config.num_hidden_layers)
    q2_config = export_qwen2.qwen2_config(config, torch.bfloat16)
    with torch.device("meta"):
        stock = Qwen2ForCausalLM(q2_config)
    shapes = {k: tuple(v.shape) for k, v in mapped.items()}
    assert shapes == {k: tuple(v.shape) for k, v in stock.state_dict().items()}
    assert list(shapes) == list(stock.state_dict())  # Qwen2's order too
    assert sum(v.numel() for v in mapped.values()) == sum(v.numel() for v in ours.state_dict().values()) \
        == 1_836_828_672
    assert sum(k.startswith("model.layers.") and k.endswith("q_proj.weight") for k in shapes) == 24
    layer = "model.layers.23."
    assert all(shapes[layer + f"self_attn.{p}_proj.weight"] == (2048, 2048) and
               shapes[layer + f"self_attn.{p}_proj.bias"] == (2048,) for p in "qkvo" if p != "o")
    assert shapes[layer + "self_attn.o_proj.weight"] == (2048, 2048) and layer + "self_attn.o_proj.bias" not in shapes
    assert shapes[layer + "mlp.gate_proj.weight"] == shapes[layer + "mlp.up_proj.weight"] == (5504, 2048)
    assert shapes[layer + "mlp.down_proj.weight"] == (2048, 5504)
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (151936, 2048)
    assert (q2_config.head_dim, q2_config.num_key_value_heads, q2_config.max_position_embeddings,
            q2_config.rms_norm_eps, q2_config.tie_word_embeddings) == (128, 16, 8192, 1e-6, False)
    # the mapping is a renaming: gate is w2 (the SiLU side), up is w1, q/k/v are c_attn's thirds in that order
    small = QWenConfig(hidden_size=8, num_attention_heads=2, kv_channels=4, num_hidden_layers=1, intermediate_size=12,
                       vocab_size=16)
    state = {k: torch.randn(v.shape) for k, v in QWenLMHeadModel(small).state_dict().items()}
    out = export_qwen2.qwen2_state_dict(state, 1)
    assert out["model.layers.0.mlp.gate_proj.weight"] is state["transformer.h.0.mlp.w2.weight"]
    assert out["model.layers.0.mlp.up_proj.weight"] is state["transformer.h.0.mlp.w1.weight"]
    assert torch.equal(torch.cat([out[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]),
                       state["transformer.h.0.attn.c_attn.weight"])
    with pytest.raises(ValueError, match="no Qwen2 counterpart: extra"):
        export_qwen2.qwen2_state_dict({**state, "extra": torch.zeros(1)}, 1)


def test_refusals_leave_everything_as_it_was(tiny_ckpt, trained, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    argv = ["--model_path", tiny_ckpt, "--output_dir", str(target)]
    with pytest.raises(SystemExit, match="--output_dir .*out is not empty; pass --overwrite to replace it"):
        export_qwen2.main(argv)
    with pytest.raises(SystemExit, match="holds no model .no config.json.: --overwrite replaces an earlier export"):
        export_qwen2.main(argv + ["--overwrite"])
    assert os.listdir(target) == ["keep.txt"]
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    for path, message in ((trained[1], "already in the Qwen2 format"), (str(tmp_path / "nope"), "no such directory"),
                          (str(tmp_path / "adapter"), "a train.py checkpoint .a LoRA adapter.*merge_params.py"),
                          (str(target), "no config.json .not a model directory.")):
        with pytest.raises(SystemExit, match=f"export_qwen2.py: error: --model_path .*{message}"):
            export_qwen2.main(["--model_path", path, "--output_dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--max_shard_size 'lots': expected a number and a unit"):
        export_qwen2.main(["--model_path", tiny_ckpt, "--output_dir", str(tmp_path / "x"), "--max_shard_size", "lots"])
    with pytest.raises(SystemExit, match="is, holds or lies inside --model_path"):
        export_qwen2.main(["--model_path", tiny_ckpt, "--output_dir", os.path.join(tiny_ckpt, "qwen2")])
    assert not os.path.exists(tmp_path / "x")
    assert export_qwen2.parse_size("2GB") == 2 * 10**9 and export_qwen2.parse_size("1.5 MiB") == 1572864


def model_with_schema(tiny_ckpt: str, directory, schema) -> str:
    """tiny_ckpt's files (linked, not copied) in `directory`, with `schema` as its schema.json."""
    directory.mkdir()
    for name in os.listdir(tiny_ckpt):
        os.symlink(os.path.join(tiny_ckpt, name), directory / name)
    (directory / SCHEMA_FILE).write_text(schema.text(), encoding="utf-8")
    return str(directory)


def test_the_export_carries_the_models_schema(tiny_ckpt, tmp_path):
    """schema.json equal to the model's, its instruction in instruction.txt and in the self-check's chat prompt."""
    model = model_with_schema(tiny_ckpt, tmp_path / "model", THREE)
    export = tmp_path / "export"
    export_qwen2.main(["--model_path", model, "--output_dir", str(export)])
    assert load_schema(str(export / SCHEMA_FILE)) == THREE
    assert (export / SCHEMA_FILE).read_text(encoding="utf-8") == THREE.text()
    assert (export / "instruction.txt").read_text(encoding="utf-8") == THREE.instruction
    with open(export / "export_info.json", encoding="utf-8") as f:
        assert json.load(f)["check"]["prompt_ids_equal"]


def test_a_schema_other_than_the_models_is_refused_in_one_line(tiny_ckpt, tmp_path, capsys):
    model = model_with_schema(tiny_ckpt, tmp_path / "model", THREE)
    other = tmp_path / "other.json"
    other.write_text(CHAPTER_SCHEMA.text(), encoding="utf-8")
    with pytest.raises(SystemExit) as refused:
        export_qwen2.main(["--model_path", model, "--output_dir", str(tmp_path / "out"), "--schema", str(other)])
    message = str(refused.value)
    assert "\n" not in message and message.startswith("export_qwen2.py: error: --schema ")
    assert f"differs from the schema {os.path.join(model, SCHEMA_FILE)} the model was trained with" in message
    assert "症状 (spans), 药品名称 (spans), 诊断结果 (text)" in message
    bad = tmp_path / "bad.json"
    bad.write_text('{"fields": []}', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"^export_qwen2.py: error: --schema .*bad.json: \"fields\" must be a "
                                         r"non-empty list"):
        export_qwen2.main(["--model_path", tiny_ckpt, "--output_dir", str(tmp_path / "out"), "--schema", str(bad)])
    assert sorted(os.listdir(tmp_path)) == ["bad.json", "model", "other.json"]


def test_the_self_check_catches_a_wrong_mapping_and_the_converters_digit_pattern(tiny_ckpt, tmp_path, monkeypatch):
    """Swapping gate and up (w1/w2, the easy mistake) and the converter's default split pattern (digits in threes)
    are both caught by the stock process, and nothing is written."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    real_map = export_qwen2.qwen2_state_dict

    def swapped(state, num_layers):
        out = real_map(state, num_layers)
        for i in range(num_layers):
            gate, up = f"model.layers.{i}.mlp.gate_proj.weight", f"model.layers.{i}.mlp.up_proj.weight"
            out[gate], out[up] = out[up], out[gate]
        return out

    monkeypatch.setattr(export_qwen2, "qwen2_state_dict", swapped)
    real_init = TikTokenConverter.__init__

    def default_pattern(self, *args, pattern=None, **kwargs):
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(TikTokenConverter, "__init__", default_pattern)
    with pytest.raises(SystemExit, match=r"tokenizer.json read as it stands gives other ids than ours on probe "
                                         r"text\(s\) \[.*4.*\].*fp32 logits on the prompt probe differ from ours by "
                                         r".*; nothing written"):
        export_qwen2.main(["--model_path", tiny_ckpt, "--output_dir", str(tmp_path / "out")])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["writing the second shard", "during the stock check"])
def test_an_interrupted_export_leaves_no_loadable_directory(tiny_ckpt, tmp_path, monkeypatch, where):
    target = tmp_path / "out"
    if where == "writing the second shard":
        real_save, calls = export_qwen2.save_file, []

        def interrupted(tensors, path, metadata=None):
            calls.append(path)
            if len(calls) == 2:
                with open(path, "wb") as f:
                    f.write(b"half a shard")
                raise KeyboardInterrupt
            real_save(tensors, path, metadata=metadata)

        monkeypatch.setattr(export_qwen2, "save_file", interrupted)
    else:
        def interrupted(export_dir, work_dir):
            assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= set(os.listdir(export_dir))
            raise KeyboardInterrupt

        monkeypatch.setattr(export_qwen2, "run_stock_check", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_qwen2.main(["--model_path", tiny_ckpt, "--output_dir", str(target), "--max_shard_size", "50MB"])
    assert os.listdir(tmp_path) == []  # no output, nothing half-written beside it


def test_replace_dir_keeps_the_old_export_until_the_new_one_is_in(tmp_path, monkeypatch):
    old, new = tmp_path / "export", tmp_path / ".tmp-export-1"
    old.mkdir()
    (old / "config.json").write_text("old")
    new.mkdir()
    (new / "config.json").write_text("new")
    real_replace = os.replace

    def failing(src, dst):
        if src == str(new):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(export_qwen2.os, "replace", failing)
    with pytest.raises(OSError):
        export_qwen2.replace_dir(str(new), str(old))
    assert (old / "config.json").read_text() == "old"  # put back
    monkeypatch.setattr(export_qwen2.os, "replace", real_replace)
    export_qwen2.replace_dir(str(new), str(old))
    assert (old / "config.json").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["export"]
