"""The bad-input sweep: every script on a table of malformed inputs, unwritable paths and corrupt model files.

For each case the script runs as its own process, as a user starts it, and must exit non-zero with no traceback,
with a message naming the file or flag at fault, and with nothing created or changed: neither in the case's own
directory (its inputs, and where its outputs would go) nor in the inputs the cases share (the tiny checkpoint, an
adapter, the data files). The processes are forked from one that imported the libraries once
(tests/script_runner.py), so the whole table takes seconds, not a torch import per case; the cases that need a model
use the tiny one, and every error here is caught before any weights load.

Also here: the output-path check and the model-file checks the scripts share, on their own.
"""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import train
from medextract import model_files
from medextract.checkpoints import run_fingerprints
from medextract.qlora import lora_target_names
from utils import INSTRUCTION, check_output_path, format_output

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "tests" / "script_runner.py"
SECRET = "sk-sweep-never-printed-1234"
IS_ROOT = os.geteuid() == 0  # root may write anywhere, so the no-permission cases cannot fail for it
EXTRACT = {"药品名称": ["布洛芬"], "药物类别": [], "医疗检查": [], "医疗操作": [], "现病史": "发热两天", "辅助检查": "",
           "诊断结果": "", "医疗建议": "多喝水"}
DEEP = "[" * 1000 + "]" * 1000  # nested past json's recursion limit
OWN_SCHEMA = '{"fields": [{"name": "症状", "kind": "spans"}, {"name": "诊断结果", "kind": "text"}]}'.encode()


@dataclass
class Shared:
    """Valid inputs the cases share (never written to)."""
    tiny: str
    all_json: str
    gold: str
    pred: str
    train: str
    adapter: str  # a train.py-style checkpoint: adapter + tokenizer files, on the tiny base
    ds_file: str = str(ROOT / "ds_zero2_no_offload.json")


@dataclass
class Case:
    script: str  # a path under ROOT, or "-m module"
    argv: list
    names: list  # substrings the error must contain: the flag, the file, what is wrong
    env: dict = field(default_factory=dict)
    unset: list = field(default_factory=list)


_HELD_SOCKETS = []  # listening, so the port stays taken while the case runs


def held_port() -> str:
    """A port of 127.0.0.1 another server is listening on."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    _HELD_SOCKETS.append(taken)
    return str(taken.getsockname()[1])


@pytest.fixture(scope="module", autouse=True)
def release_held_ports():
    yield
    while _HELD_SOCKETS:
        _HELD_SOCKETS.pop().close()


def dialogue(i: int) -> str:
    return f"患者：孩子发烧{i}天了。\n医生：可以吃点布洛芬，多喝水。"


def write_jsonl(path, records) -> str:
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def model_copy(d: Path, source: str, name: str = "model", files: dict | None = None) -> str:
    """A model directory whose files link to `source`'s, except `files` ({file name: new bytes})."""
    target = d / name
    target.mkdir()
    files = files or {}
    for entry in os.listdir(source):
        if entry not in files:
            os.symlink(os.path.join(source, entry), target / entry)
    for entry, data in files.items():
        (target / entry).write_bytes(data)
    return str(target)


def truncated(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    return data[: len(data) // 2]


GARBAGE = bytes(range(128, 256)) * 32  # no newline, and never UTF-8


def wrong_shape_adapter(d: Path, shared: Shared) -> str:
    """A checkpoint whose adapter was trained on a base twice as wide (its LoRA matrices take 128 inputs)."""
    import torch
    from safetensors.torch import load_file, save_file

    target = Path(model_copy(d, shared.adapter, "ckpt", files={"adapter_model.safetensors": b""}))
    tensors = load_file(os.path.join(shared.adapter, "adapter_model.safetensors"))
    wide = {k: torch.zeros(v.shape[0], 2 * v.shape[1]) if "lora_A" in k else torch.zeros(2 * v.shape[0], v.shape[1])
            for k, v in tensors.items()}
    save_file(wide, str(target / "adapter_model.safetensors"))
    return str(target)


def adapter_with_config(d: Path, shared: Shared, text: str) -> str:
    return model_copy(d, shared.adapter, "ckpt", files={"adapter_config.json": text.encode()})


def fake_checkpoint(d: Path, argv: list, **fingerprint_changes) -> str:
    """output_dir/epoch-1-step-1 as train.py leaves it, as far as resume checks read it, with the fingerprints of
    the run `argv` describes (some changed)."""
    ckpt = d / "out" / "epoch-1-step-1"
    (ckpt / "deepspeed" / "state").mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"global_step": 1}')
    (ckpt / "rng_state_rank0.json").write_text("{}")
    args = train.parse_args(argv)
    fingerprints = {**run_fingerprints(args.train_path, args.test_path, args.model_name_or_path),
                    **fingerprint_changes}
    (ckpt / "train_args.json").write_text(json.dumps({"args": {}, "fingerprints": fingerprints}))
    return str(ckpt)


# --------------------------------------------------------------------------------------------------------------
# The table: case name -> (d, shared) -> Case
# --------------------------------------------------------------------------------------------------------------


def data_helper(d: Path, s: Shared, names: list, all_path: str | None = None, train_path: str | None = None,
                test_path: str | None = None) -> Case:
    return Case("data_helper.py", ["--all_path", all_path or s.all_json,
                                   "--train_path", train_path or str(d / "tr.json"),
                                   "--test_path", test_path or str(d / "te.json"), "--test_size", "2"], names)


def all_json(d: Path, records=None, raw: str | None = None) -> str:
    path = d / "all.json"
    path.write_text(raw if raw is not None else json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return str(path)


def records(n: int = 5) -> list:
    return [{"dialogue_text": dialogue(i), "extract_text": EXTRACT} for i in range(n)]


def a_file(d: Path) -> str:
    (d / "a_file").write_text("x")
    return str(d / "a_file")


def read_only_dir(d: Path) -> str:
    (d / "ro").mkdir()
    os.chmod(d / "ro", 0o555)
    return str(d / "ro")


def evaluate(s: Shared, *extra: str, gold: str | None = None, pred: str | None = None) -> list:
    return ["--gold", gold or s.gold, "--pred", pred or s.pred, *extra]


def predict(s: Shared, d: Path, *extra: str, model: str | None = None, output: str | None = None,
            input_file: str | None = None) -> list:
    return ["--model_path", model or s.tiny, "--input_file", input_file or s.gold, "--output_file",
            output or str(d / "pred.jsonl"), "--device", "cpu", *extra]


def openai_flags(s: Shared, d: Path, output: str | None = None, input_file: str | None = None) -> list:
    return ["--input_file", input_file or s.gold, "--output_file", output or str(d / "out.jsonl"),
            "--base_url", "http://127.0.0.1:9/v1", "--max_retries", "0", "--timeout", "1"]


def merge(s: Shared, d: Path, model_dir: str | None = None, ori: str | None = None, save: str | None = None) -> list:
    return ["--ori_model_dir", ori or s.tiny, "--model_dir", model_dir or s.adapter, "--save_model_dir",
            save or str(d / "merged"), "--device", "cpu"]


def train_flags(s: Shared, d: Path, **overrides) -> list:
    values = {"train_path": s.train, "test_path": s.train, "model_name_or_path": s.tiny, "max_len": 160,
              "max_src_len": 64, "num_train_epochs": 1, "gradient_accumulation_steps": 1, "save_model_step": 0,
              "lora_dim": 4, "output_dir": str(d / "out"), "ds_file": s.ds_file}
    values.update(overrides)
    return [f"--{k}={v}" for k, v in values.items()]


def make_tiny(output_dir: str, *extra: str) -> Case:
    return Case("-m qwen1_8.make_tiny", ["--output_dir", output_dir, "--vocab_size", "256", *extra], ["--output_dir"])


def deep_line(d: Path, name: str) -> str:
    (d / name).write_text('{"id": 0, "input": "x", "output": "y", "extra": ' + DEEP + "}\n", encoding="utf-8")
    return str(d / name)


def surrogate_line(d: Path, name: str) -> str:
    (d / name).write_text('{"input": "医生: 你好\\ud800\\n"}\n', encoding="utf-8")  # JSON's escape: valid JSON
    return str(d / name)


def reordered_train(d: Path, s: Shared) -> str:
    lines = Path(s.train).read_text(encoding="utf-8").splitlines(keepends=True)
    (d / "train.json").write_text("".join(reversed(lines)), encoding="utf-8")
    return str(d / "train.json")


def with_surrogate(d: Path, data: list) -> str:
    """all.json with the JSON escape \\ud800, half of a surrogate pair, where the records say SURROGATE."""
    return all_json(d, raw=json.dumps(data).replace("SURROGATE", "\\ud800"))


def garbage_file(d: Path, name: str) -> str:
    (d / name).write_bytes(GARBAGE)
    return str(d / name)


def text_file(d: Path, name: str, text: str) -> str:
    (d / name).write_text(text, encoding="utf-8")
    return str(d / name)


def settings_taken(d: Path) -> str:
    """An output file whose settings file's name is taken by a directory."""
    (d / "p.jsonl.settings.json").mkdir()
    return str(d / "p.jsonl")


def missing_shard(d: Path, s: Shared) -> str:
    """A sharded model whose index names a second shard that is not there."""
    index = {"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors",
                            "transformer.wte.weight": "model-00002-of-00002.safetensors"}}
    model = model_copy(d, s.tiny, files={"model.safetensors.index.json": json.dumps(index).encode()})
    os.remove(os.path.join(model, "model.safetensors"))
    os.symlink(os.path.join(s.tiny, "model.safetensors"), os.path.join(model, "model-00001-of-00002.safetensors"))
    return model


def run_dir(d: Path, best: str, *checkpoints: str) -> str:
    """A train.py output_dir holding `checkpoints` and a best_checkpoint.json of text `best`."""
    (d / "run").mkdir()
    for name in checkpoints:
        (d / "run" / name).mkdir()
    (d / "run" / "best_checkpoint.json").write_text(best)
    return str(d / "run")


def torn(checkpoint: str, name: str) -> str:
    with open(os.path.join(checkpoint, name), "r+", encoding="utf-8") as f:
        f.truncate(5)
    return checkpoint


def unset_key(case: Case) -> Case:
    case.unset.append("OPENAI_API_KEY")
    return case


def tiny_vocab(s: Shared) -> bytes:
    with open(os.path.join(s.tiny, "qwen.tiktoken"), "rb") as f:
        return f.read()


CASES = {
    # data_helper.py: unwritable outputs (the first one's folder must not be made), unreadable records
    "data_helper train_path is a directory": lambda d, s: data_helper(
        d, s, ["--train_path", "is a directory"], train_path=str(d)),
    "data_helper train_path under a file": lambda d, s: data_helper(
        d, s, ["--train_path", "is a file, not a directory"], train_path=os.path.join(a_file(d), "tr.json")),
    "data_helper test_path under a file, train_path in a new folder": lambda d, s: data_helper(
        d, s, ["--test_path", "is a file"], train_path=str(d / "new" / "tr.json"),
        test_path=os.path.join(a_file(d), "te.json")),
    "data_helper test_path in a read-only folder": lambda d, s: data_helper(
        d, s, ["--test_path", "no permission"], test_path=os.path.join(read_only_dir(d), "te.json")),
    "data_helper extract_text nested 1000 deep": lambda d, s: data_helper(
        d, s, ["all.json: record 2", "extract_text", "nested too deeply"],
        all_path=all_json(d, records()[:2] + [{"dialogue_text": "x", "extract_text": '{"药品名称": ' + DEEP + "}"}])),
    "data_helper all.json nested 3000 deep": lambda d, s: data_helper(
        d, s, ["all.json", "nested too deeply"], all_path=all_json(d, raw="[" * 3000 + "]" * 3000)),
    "data_helper lone surrogate": lambda d, s: data_helper(
        d, s, ["all.json: record 3", "dialogue_text", "lone surrogate"],
        all_path=with_surrogate(d, records(3) + [{"dialogue_text": "SURROGATE", "extract_text": EXTRACT}])),
    "data_helper lone surrogate in a field": lambda d, s: data_helper(
        d, s, ["all.json: record 1", "extract_text['现病史']", "lone surrogate"],
        all_path=with_surrogate(d, records(1) + [{"dialogue_text": "x", "extract_text": {**EXTRACT,
                                                                                      "现病史": "SURROGATE"}}])),
    "data_helper all.json not UTF-8": lambda d, s: data_helper(d, s, ["bin.json", "not UTF-8"],
                                                               all_path=garbage_file(d, "bin.json")),
    "data_helper all_path is a directory": lambda d, s: data_helper(d, s, [str(d), "cannot read"], all_path=str(d)),

    # evaluate.py
    "evaluate report is a directory": lambda d, s: Case("evaluate.py", evaluate(s, "--report", str(d)),
                                                        ["--report", "is a directory"]),
    "evaluate report under a file": lambda d, s: Case("evaluate.py", evaluate(s, "--report", a_file(d) + "/r.json"),
                                                      ["--report", "is a file"]),
    "evaluate report in a read-only folder": lambda d, s: Case(
        "evaluate.py", evaluate(s, "--report", read_only_dir(d) + "/r.json"), ["--report", "no permission"]),
    "evaluate report path empty": lambda d, s: Case("evaluate.py", evaluate(s, "--report", ""), ["--report"]),
    "evaluate html page is a directory": lambda d, s: Case("evaluate.py", evaluate(s, "--html", str(d)),
                                                            ["--html", "is a directory"]),
    "evaluate html page is the report": lambda d, s: Case("evaluate.py", evaluate(
        s, "--report", str(d / "r.json"), "--html", str(d / "r.json")), ["--report and --html name the same file"]),
    "evaluate prediction line nested 1000 deep": lambda d, s: Case(
        "evaluate.py", evaluate(s, "--report", str(d / "r.json"), pred=deep_line(d, "p.jsonl")),
        ["p.jsonl:1", "nested too deeply"]),
    "evaluate gold not UTF-8": lambda d, s: Case("evaluate.py", evaluate(s, gold=garbage_file(d, "g.json")),
                                                 ["g.json:1", "not UTF-8"]),

    # predict.py and test_qwen.py (the same checks): outputs, then each model file
    "predict output_file is a directory": lambda d, s: Case("predict.py", predict(s, d, output=str(d)),
                                                            ["--output_file", "is a directory"]),
    "predict output_file under a file": lambda d, s: Case("predict.py", predict(s, d, output=a_file(d) + "/p.jsonl"),
                                                          ["--output_file", "is a file, not a directory"]),
    "predict output_file in a read-only folder": lambda d, s: Case(
        "predict.py", predict(s, d, output=read_only_dir(d) + "/p.jsonl"), ["--output_file", "no permission"]),
    "predict its settings file is a directory": lambda d, s: Case(
        "predict.py", predict(s, d, output=settings_taken(d)), ["--output_file", "p.jsonl.settings.json",
                                                                "is a directory"]),
    "predict output_file is the input_file": lambda d, s: Case(
        "predict.py", predict(s, d, output=s.gold), ["--output_file", "is the --input_file", "another --output_file"]),
    "predict input line nested 1000 deep": lambda d, s: Case(
        "predict.py", predict(s, d, input_file=deep_line(d, "in.jsonl")), ["in.jsonl:1", "nested too deeply"]),
    "predict input line with a lone surrogate": lambda d, s: Case(
        "predict.py", predict(s, d, input_file=surrogate_line(d, "in.jsonl")),
        ["in.jsonl:1", "field 'input'", "lone surrogate"]),
    "predict max_tgt_len past the context": lambda d, s: Case(
        "predict.py", predict(s, d, "--max_tgt_len", "8000"), ["--max_tgt_len 8000", "8192-token context"]),
    "predict repetition_penalty nan": lambda d, s: Case(
        "predict.py", predict(s, d, "--repetition_penalty", "nan"), ["--repetition_penalty", "positive number"]),
    "predict max_tgt_len too short for the constraint": lambda d, s: Case(
        "predict.py", predict(s, d, "--max_tgt_len", "20"), ["--max_tgt_len 20", "--constraint grounded"]),
    "predict truncated weights": lambda d, s: Case("predict.py", predict(s, d, model=model_copy(
        d, s.tiny, files={"model.safetensors": truncated(os.path.join(s.tiny, "model.safetensors"))})),
        ["model.safetensors", "truncated"]),
    "predict garbage weights": lambda d, s: Case("predict.py", predict(s, d, model=model_copy(
        d, s.tiny, files={"model.safetensors": GARBAGE})), ["model.safetensors", "not a safetensors file"]),
    "predict config.json not JSON": lambda d, s: Case("predict.py", predict(s, d, model=model_copy(
        d, s.tiny, files={"config.json": b'{"hidden_size": 64,'})), ["config.json", "not valid JSON"]),
    "predict vocabulary corrupt": lambda d, s: Case("predict.py", predict(s, d, model=model_copy(
        d, s.tiny, files={"qwen.tiktoken": tiny_vocab(s)[:1000] + b"\nnot a line\n"})),
        ["qwen.tiktoken:", "<base64> <rank>"]),
    "predict shard index names a missing shard": lambda d, s: Case("predict.py", predict(
        s, d, model=missing_shard(d, s)), ["model.safetensors.index.json", "model-00002-of-00002.safetensors",
                                           "missing"]),
    "predict adapter_config.json not JSON": lambda d, s: Case("predict.py", predict(s, d, model=adapter_with_config(
        d, s, '{"r": 8,')), ["adapter_config.json", "not valid JSON"]),
    "predict adapter of another shape": lambda d, s: Case("predict.py", predict(s, d, model=wrong_shape_adapter(d, s)),
                                                          ["adapter_model.safetensors", "another shape"]),
    "predict garbage adapter": lambda d, s: Case("predict.py", predict(s, d, model=model_copy(
        d, s.adapter, "ckpt", files={"adapter_model.safetensors": GARBAGE})),
        ["adapter_model.safetensors", "not a safetensors"]),
    "test_qwen output_file is a directory": lambda d, s: Case("test_qwen.py", predict(s, d, output=str(d)),
                                                              ["--output_file", "is a directory"]),
    "test_qwen truncated weights": lambda d, s: Case("test_qwen.py", predict(s, d, model=model_copy(
        d, s.tiny, files={"model.safetensors": truncated(os.path.join(s.tiny, "model.safetensors"))})),
        ["model.safetensors", "truncated"]),

    # test_openai.py: outputs, inputs and endpoint settings, before any request
    "test_openai output_file is a directory": lambda d, s: Case("test_openai.py", openai_flags(s, d, output=str(d)),
                                                                ["--output_file", "is a directory"]),
    "test_openai output_file under a file": lambda d, s: Case(
        "test_openai.py", openai_flags(s, d, output=a_file(d) + "/o.jsonl"), ["--output_file", "is a file"]),
    "test_openai output_file in a read-only folder": lambda d, s: Case(
        "test_openai.py", openai_flags(s, d, output=read_only_dir(d) + "/o.jsonl"), ["--output_file", "permission"]),
    "test_openai output_file is the input_file": lambda d, s: Case(
        "test_openai.py", openai_flags(s, d, output=s.gold), ["--output_file", "is the --input_file"]),
    "test_openai input line nested 1000 deep": lambda d, s: Case(
        "test_openai.py", openai_flags(s, d, input_file=deep_line(d, "in.jsonl")), ["in.jsonl:1", "nested too deeply"]),
    "test_openai base_url with a bad port": lambda d, s: Case(
        "test_openai.py", openai_flags(s, d)[:-6] + ["--base_url", "http://[::1"], ["--base_url"]),
    "test_openai input line with a lone surrogate": lambda d, s: Case(
        "test_openai.py", openai_flags(s, d, input_file=surrogate_line(d, "in.jsonl")), ["in.jsonl:1", "surrogate"]),
    "test_openai json_mode with a constraint": lambda d, s: Case(
        "test_openai.py", openai_flags(s, d) + ["--json_mode", "--constraint", "grounded"],
        ["--json_mode", "--constraint"]),
    "test_openai no API key": lambda d, s: unset_key(Case("test_openai.py", openai_flags(s, d), ["OPENAI_API_KEY"])),

    # serve.py: its flags, the model directory and the key's variable, before anything loads or listens
    "serve no such model_path": lambda d, s: Case("serve.py", ["--model_path", str(d / "nowhere"), "--device", "cpu"],
                                                  ["--model_path", "no such directory"]),
    "serve port out of range": lambda d, s: Case("serve.py", ["--model_path", s.tiny, "--port", "70000"],
                                                 ["--port", "70000"]),
    "serve api_key_env unset": lambda d, s: Case("serve.py", ["--model_path", s.tiny, "--api_key_env",
                                                              "SERVE_SWEEP_KEY"], ["--api_key_env SERVE_SWEEP_KEY",
                                                                                   "not set"],
                                                 unset=["SERVE_SWEEP_KEY"]),
    "serve api_key_env empty": lambda d, s: Case("serve.py", ["--model_path", s.tiny, "--api_key_env",
                                                              "SERVE_SWEEP_KEY"], ["--api_key_env", "empty"],
                                                 env={"SERVE_SWEEP_KEY": " "}),
    "serve max_batch_size zero": lambda d, s: Case("serve.py", ["--model_path", s.tiny, "--max_batch_size", "0"],
                                                   ["--max_batch_size"]),
    "serve max_tgt_len too short for extraction": lambda d, s: Case(
        "serve.py", ["--model_path", s.tiny, "--max_tgt_len", "20"], ["--max_tgt_len 20"]),
    "serve port taken": lambda d, s: (lambda port: Case("serve.py", ["--model_path", s.tiny, "--port", port],
                                                        ["--port " + port, "cannot listen"]))(held_port()),
    "serve max_body_bytes too small": lambda d, s: Case("serve.py", ["--model_path", s.tiny, "--max_body_bytes",
                                                                    "10"], ["--max_body_bytes", "10"]),
    "serve served_model_name empty": lambda d, s: Case("serve.py", ["--model_path", s.tiny, "--served_model_name",
                                                                    " "], ["--served_model_name", "empty"]),
    "serve grammar_workers zero": lambda d, s: Case("serve.py", ["--model_path", s.tiny, "--grammar_workers", "0"],
                                                    ["--grammar_workers", "0"]),
    "serve grammar_timeout nan": lambda d, s: Case("serve.py", ["--model_path", s.tiny, "--grammar_timeout", "nan"],
                                                   ["--grammar_timeout", "nan"]),
    "serve grammar_timeout negative": lambda d, s: Case("serve.py", ["--model_path", s.tiny, "--grammar_timeout",
                                                                     "-1"], ["--grammar_timeout", "-1"]),
    "serve max_grammar_bytes too small": lambda d, s: Case("serve.py", ["--model_path", s.tiny, "--max_grammar_bytes",
                                                                        "100"], ["--max_grammar_bytes", "100"]),
    "serve grammar_memory_mb too small": lambda d, s: Case("serve.py", ["--model_path", s.tiny, "--grammar_memory_mb",
                                                                        "1"], ["--grammar_memory_mb", "1"]),
    "serve schema differs from the model's": lambda d, s: Case("serve.py", [
        "--model_path", model_copy(d, s.tiny, files={"schema.json": OWN_SCHEMA}), "--device", "cpu", "--schema",
        text_file(d, "other.json", '{"fields": [{"name": "药品名称", "kind": "spans"}]}')],
        ["--schema", "other.json", "differs", "schema.json"]),
    "serve schema.json of the model empty": lambda d, s: Case("serve.py", [
        "--model_path", model_copy(d, s.tiny, files={"schema.json": b'{"fields": []}'}), "--device", "cpu"],
        ["schema.json", "\"fields\"", "empty list"]),
    "serve truncated weights": lambda d, s: Case("serve.py", ["--model_path", model_copy(
        d, s.tiny, files={"model.safetensors": truncated(os.path.join(s.tiny, "model.safetensors"))}),
        "--device", "cpu"], ["model.safetensors", "truncated"]),

    # a schema of one's own (issue 29): a bad schema file, data or a model of another schema, one line each
    "data_helper schema of an unknown kind": lambda d, s: Case("data_helper.py", data_helper(d, s, [])
        .argv + ["--schema", text_file(d, "s.json", '{"fields": [{"name": "症状", "kind": "span"}]}')],
        ["--schema", "s.json", "field 1 (症状)", 'unknown kind "span"']),
    "data_helper record lacks a field of the schema": lambda d, s: Case("data_helper.py", data_helper(d, s, [])
        .argv + ["--schema", text_file(d, "s.json", OWN_SCHEMA.decode())],
        ["all.json: record 0", "missing key(s) 症状"]),
    "predict schema with a name used twice": lambda d, s: Case("predict.py", predict(s, d, "--schema", text_file(
        d, "s.json", '{"fields": [{"name": "a", "kind": "text"}, {"name": "a", "kind": "spans"}]}')),
        ["--schema", "s.json", "field 2", "used twice"]),
    "predict schema not JSON": lambda d, s: Case("predict.py", predict(s, d, "--schema", text_file(
        d, "s.json", "fields: []")), ["--schema", "s.json", "not valid JSON"]),
    "evaluate schema with an empty name": lambda d, s: Case("evaluate.py", evaluate(s, "--schema", text_file(
        d, "s.json", '{"fields": [{"name": "", "kind": "text"}]}')), ["--schema", "s.json", "field 1", "non-empty"]),
    "evaluate gold of another schema": lambda d, s: Case("evaluate.py", evaluate(s, "--schema", text_file(
        d, "s.json", OWN_SCHEMA.decode())), ["gold", "lacks the key(s) of the schema 症状"]),
    "train data of another schema": lambda d, s: Case("train.py", train_flags(s, d) + ["--schema", text_file(
        d, "s.json", OWN_SCHEMA.decode())], ["train.json:1", "are not the schema's", "data_helper.py"]),
    "train schema file missing": lambda d, s: Case("train.py", train_flags(s, d) + ["--schema", str(d / "no.json")],
                                                   ["--schema", "no.json", "no such file"]),
    "merge checkpoint schema.json not JSON": lambda d, s: Case("merge_params.py", merge(s, d, model_dir=model_copy(
        d, s.adapter, "ckpt", files={"schema.json": b"{"})), ["schema.json", "not valid JSON"]),
    "merge schema differs from the checkpoint's": lambda d, s: Case("merge_params.py", merge(s, d, model_dir=model_copy(
        d, s.adapter, "ckpt", files={"schema.json": OWN_SCHEMA})) + ["--schema", text_file(
            d, "other.json", '{"fields": [{"name": "药品名称", "kind": "spans"}]}')], ["--schema", "other.json",
                                                                                   "differs"]),

    "predict model's schema.json not JSON": lambda d, s: Case("predict.py", predict(s, d, model=model_copy(
        d, s.tiny, files={"schema.json": b'{"fields": '})), ["schema.json", "not valid JSON"]),
    "test_qwen schema of an unknown kind": lambda d, s: Case("test_qwen.py", predict(s, d, "--schema", text_file(
        d, "s.json", '{"fields": [{"name": "症状", "kind": "list"}]}')), ["--schema", "s.json", 'unknown kind "list"']),
    "test_openai schema without fields": lambda d, s: Case("test_openai.py", openai_flags(s, d) + ["--schema", text_file(
        d, "s.json", '{"instruction": "抽取：\\n"}')], ["--schema", "s.json", '"fields" must be a non-empty list']),
    "export schema file missing": lambda d, s: Case("export_qwen2.py", ["--model_path", s.tiny, "--output_dir",
                                                                        str(d / "q2"), "--schema", str(d / "no.json")],
                                                    ["--schema", "no.json", "no such file"]),

    # merge_params.py: the output folder, then the adapter, the base and the run directory
    "merge save_model_dir is a file": lambda d, s: Case("merge_params.py", merge(s, d, save=a_file(d)),
                                                        ["--save_model_dir", "is a file"]),
    "merge save_model_dir under a file": lambda d, s: Case("merge_params.py", merge(s, d, save=a_file(d) + "/m"),
                                                           ["--save_model_dir", "is a file, not a directory"]),
    "merge save_model_dir in a read-only folder": lambda d, s: Case(
        "merge_params.py", merge(s, d, save=read_only_dir(d) + "/m"), ["--save_model_dir", "no permission"]),
    "merge adapter_config.json not JSON": lambda d, s: Case("merge_params.py", merge(
        s, d, model_dir=adapter_with_config(d, s, "{'r': 8}")), ["adapter_config.json", "not valid JSON"]),
    "merge adapter_config.json a list": lambda d, s: Case("merge_params.py", merge(s, d, model_dir=adapter_with_config(
        d, s, "[8, 16]")), ["adapter_config.json", "expected a JSON object"]),
    "merge adapter_config.json rank not a number": lambda d, s: Case("merge_params.py", merge(
        s, d, model_dir=adapter_with_config(d, s, json.dumps({"r": "eight", "lora_alpha": 16}))),
        ["adapter_config.json", "'r'"]),
    "merge truncated adapter": lambda d, s: Case("merge_params.py", merge(s, d, model_dir=model_copy(
        d, s.adapter, "ckpt", files={"adapter_model.safetensors": truncated(
            os.path.join(s.adapter, "adapter_model.safetensors"))})),
        ["adapter_model.safetensors", "truncated"]),
    "merge adapter of another shape": lambda d, s: Case("merge_params.py", merge(s, d, model_dir=wrong_shape_adapter(
        d, s)), ["adapter_model.safetensors", "another shape"]),
    "merge truncated base": lambda d, s: Case("merge_params.py", merge(s, d, ori=model_copy(
        d, s.tiny, files={"model.safetensors": truncated(os.path.join(s.tiny, "model.safetensors"))})),
        ["model.safetensors", "truncated"]),
    "merge base config.json not JSON": lambda d, s: Case("merge_params.py", merge(s, d, ori=model_copy(
        d, s.tiny, files={"config.json": b""})), ["config.json", "not valid JSON"]),
    "merge checkpoint vocabulary corrupt": lambda d, s: Case("merge_params.py", merge(s, d, model_dir=model_copy(
        d, s.adapter, "ckpt", files={"qwen.tiktoken": b"YWJj x\n"})), ["qwen.tiktoken", "<base64> <rank>"]),
    "merge run whose best checkpoint was deleted": lambda d, s: Case("merge_params.py", merge(
        s, d, model_dir=run_dir(d, '{"path": "run/epoch-1-step-4"}', "epoch-1-step-2")),
        ["best checkpoint epoch-1-step-4", "no longer exists", "epoch-1-step-2"]),
    "merge best_checkpoint.json not JSON": lambda d, s: Case("merge_params.py", merge(
        s, d, model_dir=run_dir(d, '{"path": ')), ["best_checkpoint.json"]),

    # train.py: output_dir, model files, data, DeepSpeed JSON, and resumes on other inputs
    "train eval_max_new_tokens too small for F1": lambda d, s: Case("train.py", train_flags(
        s, d, eval_max_new_tokens=10), ["--eval_max_new_tokens must be at least 64"]),
    "train eval_generation_batch_size zero": lambda d, s: Case("train.py", train_flags(
        s, d, eval_generation_batch_size=0), ["--eval_generation_batch_size at least 1"]),
    "train select_by unknown": lambda d, s: Case("train.py", train_flags(s, d, select_by="loss"),
                                                 ["--select_by", "invalid choice"]),
    "train output_dir is a file": lambda d, s: Case("train.py", train_flags(s, d, output_dir=a_file(d)),
                                                    ["--output_dir", "is a file"]),
    "train output_dir under a file": lambda d, s: Case("train.py", train_flags(s, d, output_dir=a_file(d) + "/out"),
                                                       ["--output_dir", "is a file, not a directory"]),
    "train output_dir read-only": lambda d, s: Case("train.py", train_flags(s, d, output_dir=read_only_dir(d)),
                                                    ["--output_dir", "no permission"]),
    "train truncated base": lambda d, s: Case("train.py", train_flags(s, d, model_name_or_path=model_copy(
        d, s.tiny, files={"model.safetensors": truncated(os.path.join(s.tiny, "model.safetensors"))})),
        ["model.safetensors", "truncated"]),
    "train base config.json not JSON": lambda d, s: Case("train.py", train_flags(s, d, model_name_or_path=model_copy(
        d, s.tiny, files={"config.json": b"{"})), ["config.json", "not valid JSON"]),
    "train vocabulary corrupt": lambda d, s: Case("train.py", train_flags(s, d, model_name_or_path=model_copy(
        d, s.tiny, files={"qwen.tiktoken": b""})), ["qwen.tiktoken", "empty"]),
    "train data line nested 1000 deep": lambda d, s: Case("train.py", train_flags(
        s, d, train_path=deep_line(d, "train.json")), ["train.json:1", "nested too deeply"]),
    "train ds_file nested 1000 deep": lambda d, s: Case("train.py", train_flags(
        s, d, ds_file=text_file(d, "ds.json", "[" * 1000 + "]" * 1000)), ["ds.json", "nested too deeply"]),
    "train resume on reordered data": lambda d, s: Case("train.py", train_flags(
        s, d, train_path=reordered_train(d, s), resume_from_checkpoint=fake_checkpoint(d, train_flags(s, d))),
        ["epoch-1-step-1", "trained on other inputs", "the training file --train_path"]),
    "train resume on another base": lambda d, s: Case("train.py", train_flags(
        s, d, resume_from_checkpoint=fake_checkpoint(d, train_flags(s, d), model_name_or_path="sampled-sha256:0")),
        ["trained on other inputs", "the base model's weights"]),
    "train resume with a torn trainer_state.json": lambda d, s: Case("train.py", train_flags(
        s, d, resume_from_checkpoint=torn(fake_checkpoint(d, train_flags(s, d)), "trainer_state.json")),
        ["trainer_state.json", "not valid JSON"]),

    # export_qwen2.py: the output folder, then the source model's files, before anything loads
    "export output_dir is a file": lambda d, s: Case("export_qwen2.py", ["--model_path", s.tiny,
                                                                         "--output_dir", a_file(d)],
                                                     ["--output_dir", "is a file"]),
    "export output_dir under a file": lambda d, s: Case("export_qwen2.py", ["--model_path", s.tiny, "--output_dir",
                                                                            a_file(d) + "/q2"],
                                                        ["--output_dir", "is a file, not a directory"]),
    "export output_dir in a read-only folder": lambda d, s: Case(
        "export_qwen2.py", ["--model_path", s.tiny, "--output_dir", read_only_dir(d) + "/q2"],
        ["--output_dir", "no permission"]),
    "export truncated weights": lambda d, s: Case("export_qwen2.py", ["--model_path", model_copy(
        d, s.tiny, files={"model.safetensors": truncated(os.path.join(s.tiny, "model.safetensors"))}),
        "--output_dir", str(d / "q2")], ["model.safetensors", "truncated"]),
    "export vocabulary corrupt": lambda d, s: Case("export_qwen2.py", ["--model_path", model_copy(
        d, s.tiny, files={"qwen.tiktoken": b"YWJj x\n"}), "--output_dir", str(d / "q2")],
        ["qwen.tiktoken", "<base64> <rank>"]),
    "export a train.py checkpoint": lambda d, s: Case("export_qwen2.py", ["--model_path", s.adapter,
                                                                          "--output_dir", str(d / "q2")],
                                                      ["--model_path", "merge it first"]),

    # qwen1_8/make_tiny.py
    "make_tiny output_dir is a file": lambda d, s: make_tiny(a_file(d)),
    "make_tiny output_dir under a file": lambda d, s: make_tiny(a_file(d) + "/tiny"),
    "make_tiny output_dir not empty": lambda d, s: make_tiny(os.path.dirname(a_file(d))),
    "make_tiny output_dir in a read-only folder": lambda d, s: make_tiny(read_only_dir(d) + "/tiny"),
    "make_tiny zero heads": lambda d, s: Case("-m qwen1_8.make_tiny", ["--output_dir", str(d / "t"),
                                                                      "--num_attention_heads", "0"],
                                              ["--num_attention_heads"]),
}
NEEDS_PERMISSIONS = {name for name in CASES if "read-only" in name}


def snapshot(root: str) -> dict:
    """Every entry under `root` with its kind, size, mode, modification time and (small files) content hash."""
    entries = {}
    for directory, folders, files in os.walk(root):
        for name in folders + files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            digest = None
            if os.path.isfile(path) and not os.path.islink(path) and st.st_size < 1 << 20:
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            entries[os.path.relpath(path, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return entries


@pytest.fixture(scope="module")
def shared(tiny_ckpt, tmp_path_factory) -> Shared:
    import torch
    from peft import LoraConfig, get_peft_model

    from qwen1_8.modeling_qwen import QWenLMHeadModel

    d = tmp_path_factory.mktemp("sweep_shared")
    (d / "all.json").write_text(json.dumps(records(), ensure_ascii=False), encoding="utf-8")
    output = format_output(EXTRACT)
    write_jsonl(d / "gold.json", [{"instruction": INSTRUCTION, "input": dialogue(i), "output": output}
                                  for i in range(2)])
    write_jsonl(d / "pred.jsonl", [{"id": i, "output": output} for i in range(2)])
    write_jsonl(d / "train.json", [{"instruction": "抽取：\n", "input": dialogue(i), "output": output}
                                   for i in range(4)])
    adapter = d / "adapter"
    base = QWenLMHeadModel.from_pretrained(tiny_ckpt, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_names(base), task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(str(adapter), safe_serialization=True)
    for name in ("qwen.tiktoken", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(tiny_ckpt, name), adapter / name)
    return Shared(tiny=tiny_ckpt, all_json=str(d / "all.json"), gold=str(d / "gold.json"), pred=str(d / "pred.jsonl"),
                  train=str(d / "train.json"), adapter=str(adapter))


@pytest.fixture(scope="module")
def sweep(shared, tmp_path_factory):
    """Build every case's directory, run them all through the runner, and return {name: (case, result, stdout,
    stderr, directory snapshot before, after)}; shared inputs are snapshotted around the whole sweep."""
    root = tmp_path_factory.mktemp("sweep")
    shared_dirs = [shared.tiny, os.path.dirname(shared.gold)]
    shared_before = [snapshot(p) for p in shared_dirs]
    jobs, cases, before = [], {}, {}
    skipped = NEEDS_PERMISSIONS if IS_ROOT else set()
    for k, (name, build) in enumerate(CASES.items()):
        if name in skipped:
            continue
        d = root / f"case{k:02d}"
        d.mkdir()
        case = build(d, shared)
        cases[name] = (case, d)
        before[name] = snapshot(str(d))
        module = case.script[3:] if case.script.startswith("-m ") else None
        jobs.append({"id": name, "module": module, "script": None if module else str(ROOT / case.script),
                     "argv": [str(a) for a in case.argv], "cwd": str(d),
                     "env": {"OPENAI_API_KEY": SECRET, "TOKENIZERS_PARALLELISM": "false", **case.env},
                     "unset": case.unset, "stdout": str(root / f"case{k:02d}.out"),
                     "stderr": str(root / f"case{k:02d}.err"), "timeout": 120, "no_model_load": True})
    (root / "jobs.json").write_text(json.dumps(jobs, ensure_ascii=False), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "OPENAI_BASE_URL")}
    env["PYTHONPATH"] = str(ROOT)
    subprocess.run([sys.executable, str(RUNNER), str(root / "jobs.json"), str(root / "results.json")], cwd=ROOT,
                   env=env, check=True, timeout=600)
    results = json.loads((root / "results.json").read_text(encoding="utf-8"))
    out = {}
    for job in jobs:
        name = job["id"]
        case, d = cases[name]
        out[name] = (case, results[name], Path(job["stdout"]).read_text(errors="replace"),
                     Path(job["stderr"]).read_text(errors="replace"), before[name], snapshot(str(d)))
    for d in root.iterdir():  # the read-only folders, so that pytest can clean up
        if d.is_dir() and (d / "ro").exists():
            os.chmod(d / "ro", 0o755)
    return out, shared_before, [snapshot(p) for p in shared_dirs]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.skipif(
    IS_ROOT and n in NEEDS_PERMISSIONS, reason="root may write anywhere")) for n in CASES])
def test_bad_input_is_named_and_nothing_is_written(sweep, name):
    case, result, stdout, stderr, before, after = sweep[0][name]
    where = f"{case.script} {' '.join(map(str, case.argv))}\nstdout: {stdout[-2000:]}\nstderr: {stderr[-4000:]}"
    assert result["returncode"] not in (0, -9), where  # -9: killed at the timeout
    assert "Traceback" not in stderr, where
    message = [line for line in stderr.splitlines() if "error" in line]
    assert message, where
    for needle in case.names:
        assert any(needle in line for line in message), (needle, where)
    assert after == before, where  # nothing created, removed or changed
    assert SECRET not in stdout + stderr


def test_the_sweep_changes_none_of_the_inputs_it_shares(sweep):
    _, before, after = sweep
    assert before == after


def test_the_sweep_catches_every_error_before_a_model_loads(sweep):
    """The runner stops any case that goes to load weights (ModelLoadAttempted): every error here is found by the
    checks, which read headers and JSON only, so each case takes a fraction of a second."""
    for name, (_, result, _, stderr, *_) in sweep[0].items():
        assert "ModelLoadAttempted" not in stderr, name
        assert result["seconds"] < 30, name


# --------------------------------------------------------------------------------------------------------------
# The shared checks on their own
# --------------------------------------------------------------------------------------------------------------


def test_check_output_path_names_the_flag_and_creates_nothing(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    (tmp_path / "dir").mkdir()
    check_output_path(str(tmp_path / "new" / "deeper" / "out.json"), "--x")  # folders to be made: fine
    check_output_path(str(tmp_path / "dir"), "--x", directory=True)
    for path, directory, expected in ((tmp_path / "dir", False, "is a directory"),
                                      (tmp_path / "f", True, "is a file; give a directory"),
                                      (tmp_path / "f" / "out.json", False, f"{tmp_path / 'f'} is a file, not a dir"),
                                      ("", False, "the path is empty")):
        with pytest.raises(ValueError, match="^--x" + (" " if path else "")) as excinfo:
            check_output_path(str(path), "--x", directory=directory)
        assert expected in str(excinfo.value)
    assert sorted(os.listdir(tmp_path)) == ["dir", "f"]

    # No permission (simulated: this suite may run as root, who may write anywhere)
    monkeypatch.setattr(os, "access", lambda path, mode: os.path.abspath(path) != str(tmp_path / "dir"))
    with pytest.raises(ValueError, match=f"--x {tmp_path / 'dir' / 'o.json'}: no permission to write in "):
        check_output_path(str(tmp_path / "dir" / "o.json"), "--x")
    with pytest.raises(ValueError, match="no permission to write in it"):
        check_output_path(str(tmp_path / "dir"), "--x", directory=True)
    with pytest.raises(ValueError, match="no permission to write in"):  # to be made in it
        check_output_path(str(tmp_path / "dir" / "m" / "n"), "--x", directory=True)
    monkeypatch.setattr(os, "access", lambda path, mode: os.path.abspath(path) != str(tmp_path / "f"))
    with pytest.raises(ValueError, match="no permission to write the file"):
        check_output_path(str(tmp_path / "f"), "--x")


def test_model_file_checks_accept_real_files_and_name_each_fault(shared, tmp_path):
    shapes = model_files.check_model_files(shared.tiny)
    assert shapes["transformer.h.0.attn.c_attn.weight"] == [192, 64]
    config = model_files.check_adapter_files(shared.adapter, shapes)  # peft's own adapter fits its base
    assert config["r"] == 4
    model_files.check_vocabulary(shared.tiny)
    weights = os.path.join(shared.tiny, "model.safetensors")
    with open(weights, "rb") as f:
        data = f.read()
    header_end = 8 + int.from_bytes(data[:8], "little")
    for name, content, expected in (("cut.safetensors", data[:header_end + 100], "truncated: its header describes"),
                                    ("long.safetensors", data + b"\0", "1 bytes beyond the tensors"),
                                    ("empty.safetensors", b"", "not a safetensors file (0 bytes"),
                                    ("text.safetensors", b"\x05\0\0\0\0\0\0\0hello", "header is not JSON")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"^{tmp_path / name}: .*") as excinfo:
            model_files.safetensors_header(str(tmp_path / name))
        assert expected in str(excinfo.value)
    # an adapter for a base with other layers, and one whose pair disagrees on the rank
    with pytest.raises(ValueError, match="adapts transformer.h.0.attn.c_attn, a layer the base model does not have"):
        model_files.check_adapter_files(shared.adapter, {k: v for k, v in shapes.items()
                                                         if ".h.0.attn.c_attn" not in k})
    wrong = wrong_shape_adapter(tmp_path, shared)
    with pytest.raises(ValueError, match=r"adapts transformer\.h\.\d\.\S+ as a \d+ x 128 layer, but the base model's "
                                         r"is \d+ x \d+: an adapter trained on a base of another shape"):
        model_files.check_adapter_files(wrong, shapes)
    config_path = tmp_path / "ckpt" / "adapter_config.json"
    config_path.unlink()
    config_path.write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(ValueError, match="has no rank-8 pair"):
        model_files.check_adapter_files(str(tmp_path / "ckpt"))
