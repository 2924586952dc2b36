"""predict.py on a tiny random checkpoint: the prompt is the training prefix, a left-padded batch generates what
each prompt generates alone, resume skips finished ids, bare {"input"} lines work, and the terminal session runs."""
import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch

import predict
from medextract import inference, terminal
from medextract.errors import AnswersFailed
from medextract.inference import Truncation
from medextract.model_files import RANDOM_WEIGHTS_NOTE
from utils import (EXTRACT_KEYS, INSTRUCTION, LIST_KEYS, build_chatml_ids, cpu_computes_bf16, fail, input_digest,
                   parse_output)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DIALOGUES = [
    "医生: 你好，孩子哪里不舒服？\n患者: 咳嗽三天了，晚上咳得厉害，有痰。\n医生: 发烧吗？\n患者: 不发烧。\n",
    "医生: 您好\n",
    "医生: 宝宝拉肚子几天了？\n患者: 两天，一天五六次，稀水样。\n医生: 吃过什么药？\n患者: 吃了蒙脱石散和益生菌。\n"
    "医生: 建议查个大便常规，注意补液，防止脱水。\n",
]


@pytest.fixture(scope="module")
def model(tiny_ckpt, tokenizer):
    loaded, _ = inference.load_model(tiny_ckpt, torch.device("cpu"), torch.float32)
    return loaded


def test_prompt_is_the_training_prefix(tokenizer):
    from medextract.answer import extraction_request
    from medextract.engine import Decoding

    for dialogue in DIALOGUES:
        text = INSTRUCTION + dialogue
        request, cut = extraction_request(tokenizer, text, dialogue, Decoding(), "none")
        expected = build_chatml_ids(tokenizer, text, None, 2048, 1560).input_ids
        assert request.prompt == expected and not cut
        assert expected[-3:] == [tokenizer.im_start_id, 77091, 198]  # <|im_start|>assistant\n


def run_settings_of(args) -> dict:
    """The settings predict.py records for these flags on the CPU."""
    from medextract.cli import decoding_of, truncation_of

    return inference.run_settings(args.model_path, inference.resolve_dtype(args.dtype, torch.device("cpu")),
                                  decoding_of(args), args.constraint, truncation_of(args))


def test_prompt_is_truncated_like_training(tokenizer):
    long_text = INSTRUCTION + "患者: 咳嗽。\n" * 400
    ids = inference.prompt_ids(tokenizer, long_text, Truncation(2048, 300))
    assert ids == build_chatml_ids(tokenizer, long_text, None, 2048, 300).input_ids
    assert len(ids) == 11 + 300 + 1 + 3  # system block + "\n" + cut user block + "\n" + <|im_start|>assistant\n


def test_prompt_truncation_follows_the_training_run(tiny_ckpt, tokenizer, tmp_path):
    """--max_len / --max_src_len / --truncation default to the run's train_args.json (runs older than --truncation
    cut by tokens); a flag given wins, and the choice is part of a results file's settings."""
    model_dir = tmp_path / "merged"
    model_dir.mkdir()
    for name in os.listdir(tiny_ckpt):
        os.symlink(os.path.join(tiny_ckpt, name), model_dir / name)
    train_args = model_dir / "train_args.json"
    train_args.write_text(json.dumps({"args": {"max_len": 1024, "max_src_len": 300, "truncation": "turns"}}))
    args = predict.parse_args(["--model_path", str(model_dir)])
    assert (args.max_len, args.max_src_len, args.truncation) == (1024, 300, "turns")
    assert run_settings_of(args)["truncation"] == "turns"
    long_text = INSTRUCTION + "患者: 咳嗽。\n" * 400
    ids = inference.prompt_ids(tokenizer, long_text, Truncation(args.max_len, args.max_src_len, args.truncation))
    assert ids == build_chatml_ids(tokenizer, long_text, None, 1024, 300, truncation="turns").input_ids
    assert ids != inference.prompt_ids(tokenizer, long_text, Truncation(1024, 300))  # the token cut ends mid-turn
    assert predict.parse_args(["--model_path", str(model_dir), "--truncation", "tokens"]).truncation == "tokens"
    train_args.write_text(json.dumps({"args": {"max_len": 1024, "max_src_len": 300}}))
    assert predict.parse_args(["--model_path", str(model_dir)]).truncation == "tokens"
    train_args.write_text(json.dumps({"args": {"max_len": 1024, "max_src_len": 300, "truncation": "middle"}}))
    with pytest.raises(SystemExit, match="train_args.json: cannot read how training cut prompts .unknown "
                                         "truncation 'middle'."):
        predict.parse_args(["--model_path", str(model_dir)])


def test_decoding_is_greedy_by_default_and_the_model_config_untouched(model, tokenizer):
    from medextract.answer import extraction_request
    from medextract.engine import Decoding, Engine

    before = model.generation_config.to_dict()
    engine = Engine(model, tokenizer, 2)
    request = extraction_request(tokenizer, INSTRUCTION + DIALOGUES[1], DIALOGUES[1], Decoding(max_new_tokens=3),
                                 "none")[0]
    engine.generate([request])
    assert model.generation_config.to_dict() == before  # the checkpoint's sampling settings never decide
    assert Decoding().do_sample is False


def write_lines(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_read_examples_accepts_bare_input_lines(tmp_path):
    path = tmp_path / "in.json"
    write_lines(path, [{"input": DIALOGUES[0]},
                       {"instruction": "抽取：\n", "input": DIALOGUES[1], "output": "```json\n{}\n```"}])
    examples = inference.read_examples(str(path))
    assert [(e.id, e.user_text, e.instruction_chars) for e in examples] == \
        [(0, INSTRUCTION + DIALOGUES[0], len(INSTRUCTION)), (1, "抽取：\n" + DIALOGUES[1], 4)]
    write_lines(path, [{"input": DIALOGUES[0]}, {"dialogue": "x"}])
    with pytest.raises(ValueError, match=r"in\.json:2: field 'input'"):
        inference.read_examples(str(path))


def test_batch_mode_resumes_and_writes_every_id_once(tiny_ckpt, tmp_path, monkeypatch):
    inputs = tmp_path / "test.json"
    records = [{"instruction": INSTRUCTION, "input": d, "output": "```json\n{}\n```"} for d in DIALOGUES]
    records += [{"input": DIALOGUES[0] + "患者: 谢谢医生。\n"}, {"input": DIALOGUES[2]}]
    write_lines(inputs, records)
    out = tmp_path / "pred.jsonl"
    # a killed run's file: id 1 from before records carried their input's digest, id 3 with it, a torn last line
    previous = [{"id": 1, "output": "old one", "num_new_tokens": 3},
                {"id": 3, "output": "old three", "num_new_tokens": 2,
                 "input_digest": input_digest(INSTRUCTION + DIALOGUES[0] + "患者: 谢谢医生。\n")}]
    write_lines(out, previous)
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"id": 4, "outp')  # a torn line from a killed run: id 4 is not done

    generated = []
    real = inference.Engine.stream

    def counting(engine, requests):
        generated.extend(requests)
        return real(engine, requests)

    monkeypatch.setattr(inference.Engine, "stream", counting)
    argv = ["--model_path", tiny_ckpt, "--device", "cpu", "--input_file", str(inputs), "--output_file", str(out),
            "--batch_size", "2", "--max_tgt_len", "4", "--constraint", "none"]
    settings = run_settings_of(predict.parse_args(argv))
    with pytest.raises(SystemExit, match=r"pred.jsonl holds results but no pred.jsonl.settings.json saying how they "
                                         r"were made"):
        predict.main(argv)  # whose answers are these? Not to be mixed with ours
    (tmp_path / "pred.jsonl.settings.json").write_text(json.dumps(settings), encoding="utf-8")
    assert predict.main(argv) == 0
    assert len(generated) == 3
    lines = read_lines(out)
    assert sorted(r["id"] for r in lines) == [0, 1, 2, 3, 4]
    assert lines[:2] == previous
    for r in lines[2:]:
        assert set(r) == {"id", "output", "num_new_tokens", "truncated", "input_digest"}
        assert 1 <= r["num_new_tokens"] <= 4 and r["truncated"] == (r["num_new_tokens"] == 4)
        assert r["input_digest"] == input_digest(inference.read_examples(str(inputs))[r["id"]].user_text)
    generated.clear()
    assert predict.main(argv) == 0  # everything done: nothing is generated, nothing appended
    assert generated == [] and len(read_lines(out)) == 5
    # the same file names against another input file (its line 3 differs): refused before the model loads
    write_lines(inputs, records[:2] + [{"input": DIALOGUES[0]}] + records[3:])
    with pytest.raises(SystemExit, match=r"pred.jsonl: the answer with id 2 was made for another dialogue than line 3 "
                                         r"of .*test.json"):
        predict.main(argv)
    assert generated == [] and len(read_lines(out)) == 5


def test_resuming_with_other_settings_is_refused(tiny_ckpt, tmp_path):
    """A results file holds one run's answers: resuming it with another model, decoding or truncation stops before
    anything is generated; the same settings (any batch size) resume."""
    import shutil

    inputs, out, model = tmp_path / "test.json", tmp_path / "pred.jsonl", tmp_path / "model"
    shutil.copytree(tiny_ckpt, model)
    write_lines(inputs, [{"input": d} for d in DIALOGUES[:2]])
    argv = ["--model_path", str(model), "--device", "cpu", "--input_file", str(inputs), "--output_file", str(out),
            "--max_tgt_len", "2", "--constraint", "none"]
    assert predict.main(argv) == 0
    with open(str(out) + ".settings.json", encoding="utf-8") as f:
        saved = json.load(f)
    auto = "bfloat16" if cpu_computes_bf16() else "float32"  # --dtype auto on the CPU (issue: bf16 where native)
    assert saved["max_new_tokens"] == 2 and saved["do_sample"] is False and saved["dtype"] == auto
    assert saved["constraint"] == "none"
    before = out.read_text(encoding="utf-8")
    for extra, expected in ((["--max_tgt_len", "3"], "max_new_tokens 2 -> 3"),
                            (["--repetition_penalty", "1.0"], "repetition_penalty 1.1 -> 1.0"),
                            (["--max_src_len", "100"], "max_src_len 1560 -> 100"),
                            (["--max_tgt_len", "64", "--constraint", "grounded"],
                             "max_new_tokens 2 -> 64; constraint 'none' -> 'grounded'")):
        with pytest.raises(SystemExit, match=f"pred.jsonl was begun with other settings \\({expected}\\)"):
            predict.main(argv + extra)  # the later flag wins
    assert predict.main(argv + ["--batch_size", "1"]) == 0  # same settings: resumes (nothing left to do)
    weights = next(model.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # merged again there
    with pytest.raises(SystemExit, match=r"pred.jsonl was begun with other settings \(model_files '"):
        predict.main(argv)
    assert out.read_text(encoding="utf-8") == before
    # a file begun before --constraint was recorded was generated freely: it resumes under none only
    del saved["constraint"]
    (tmp_path / "pred.jsonl.settings.json").write_text(json.dumps(saved), encoding="utf-8")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns - 10**9))
    assert predict.main(argv) == 0
    with pytest.raises(SystemExit, match=r"constraint 'none' -> 'grounded'"):
        predict.main(argv + ["--constraint", "grounded", "--max_tgt_len", "64"])


def test_load_done_drops_only_a_torn_last_line(tmp_path):
    from utils import load_done

    def load_done_ids(path):
        return set(load_done(path))

    path = tmp_path / "pred.jsonl"
    path.write_text('{"id": 0, "output": "a"}\n\n{"id": 2, "output": "c"}\n{"id": 5, "out', encoding="utf-8")
    assert load_done_ids(str(path)) == {0, 2}
    assert path.read_text(encoding="utf-8") == '{"id": 0, "output": "a"}\n\n{"id": 2, "output": "c"}\n'
    cut = '{"id": 0, "output": "布洛芬"}\n{"id": 1, "output": "布洛芬"}'.encode("utf-8")[:-4]  # mid-character
    path.write_bytes(cut)
    assert load_done_ids(str(path)) == {0}
    assert path.read_text(encoding="utf-8") == '{"id": 0, "output": "布洛芬"}\n'
    path.write_text('{"id": 0, "output": "a"}\n{"id": 1, "output": "b", "input_digest": "3f"}', encoding="utf-8")
    assert load_done(str(path)) == {0: None, 1: "3f"}  # whole but unterminated; the first from before digests
    assert path.read_text(encoding="utf-8").endswith('"3f"}\n')  # the next append starts a line of its own
    kept = '{"id": 0, "output": "a"}\n{"note": "by hand"}\n{"id": 1, "output": "b"}\n'
    for bad, lineno in ((kept, 2), ('{"id": 0}\nnot json\n{"id": 1}\n', 2), ('{"id": "x"}\n', 1)):
        path.write_text(bad, encoding="utf-8")
        with pytest.raises(ValueError, match=rf"pred\.jsonl:{lineno}: not a result record"):
            load_done_ids(str(path))
        assert path.read_text(encoding="utf-8") == bad  # nothing is thrown away


@pytest.mark.parametrize("case", ["device", "device_name", "input_line", "output_line"])
def test_bad_inputs_stop_before_the_model_loads(case, tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(inference, "load_model", no_load)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "qwen.tiktoken").write_text("")
    (model_dir / "model.safetensors").write_bytes(b"")
    inputs, out = tmp_path / "test.json", tmp_path / "pred.jsonl"
    write_lines(inputs, [{"input": DIALOGUES[0]}, {"input": DIALOGUES[1]}])
    argv = ["--model_path", str(model_dir), "--input_file", str(inputs), "--output_file", str(out), "--device", "cpu"]
    if case == "device":
        argv[-1], expected = "cuda:7" if torch.cuda.device_count() < 8 else "cuda:99", "--device cuda:"
        if not torch.cuda.is_available():
            expected = "no CUDA GPU is visible"
    elif case == "device_name":
        argv[-1], expected = "gpu", "--device gpu: expected auto, cpu, cuda, cuda:N or a GPU index"
    elif case == "input_line":
        with open(inputs, "a", encoding="utf-8") as f:
            f.write('{"dialogue": "x"}\n')
        expected = "test.json:3: field 'input'"
    else:
        out.write_text('{"id": 0, "output": "a"}\n<<<<<<< HEAD\n', encoding="utf-8")
        expected = "pred.jsonl:2: not a result record"
    with pytest.raises(SystemExit) as excinfo:
        predict.main(argv)
    message = str(excinfo.value.code)
    assert message.startswith("predict.py: error: ") and expected in message


def test_the_chapters_sampling_flags_without_do_sample_get_one_note(tiny_ckpt, capsys):
    """Given explicitly, even at their default values, and only without --do_sample; test_qwen.py alike."""
    import test_qwen

    for script, argv, note in ((predict, ["--top_p", "0.8"], "--top_p takes effect only with --do_sample"),
                               (test_qwen, ["--temperature", "0.5", "--top_p", "0.9"],
                                "--temperature and --top_p take effect only with --do_sample"),  # as given
                               (predict, ["--top_p", "0.8", "--do_sample"], None), (test_qwen, [], None)):
        args = script.parse_args(["--model_path", tiny_ckpt, *argv])
        out = capsys.readouterr().out
        notes = [line for line in out.splitlines() if "decoding is greedy" in line]
        assert notes == ([f"note: decoding is greedy; {note}, which samples as the book did"] if note else []), out
        assert (args.top_p, args.temperature) == ((0.9, 0.5) if script is test_qwen and argv else (0.8, 0.8))


def test_do_sample_is_a_switch(tiny_ckpt):
    """The chapter's `--do_sample False` (type=bool) meant True; here the flag takes no value, so that spelling is an
    error instead of silent sampling."""
    assert predict.parse_args(["--model_path", tiny_ckpt]).do_sample is False
    assert predict.parse_args(["--model_path", tiny_ckpt, "--do_sample"]).do_sample is True
    with pytest.raises(SystemExit):
        predict.parse_args(["--model_path", tiny_ckpt, "--do_sample", "False"])


def test_ctrl_c_in_batch_mode_keeps_what_was_written(tokenizer, tmp_path, monkeypatch, capsys):
    from medextract.engine import Decoding, Engine, Result

    def one_answer_then_ctrl_c(engine, requests):
        yield 0, Result([1], "{}", "stop", False, 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "stream", one_answer_then_ctrl_c)
    engine = Engine.__new__(Engine)
    engine.tokenizer, engine.vocabulary = tokenizer, None
    inputs, out = tmp_path / "test.json", tmp_path / "pred.jsonl"
    write_lines(inputs, [{"input": DIALOGUES[0]}, {"input": DIALOGUES[1]}])
    with pytest.raises(inference.Interrupted) as excinfo:
        inference.predict_file(engine, str(inputs), str(out), Decoding(), constraint="none")
    with pytest.raises(SystemExit) as exited:  # what the scripts make of it
        fail("predict.py", excinfo.value)
    assert exited.value.code == 130
    assert "interrupted: the 1 predictions in" in capsys.readouterr().err
    assert [r["id"] for r in read_lines(out)] == [0]


def test_model_path_and_sampling_flags_are_checked_before_loading(tiny_ckpt, tmp_path):
    """A run's output_dir, a directory without a model or without the tokenizer's vocabulary, and sampling settings
    generate() would reject are named before anything loads; merge_params.py's dtype spellings are accepted."""
    run_dir = tmp_path / "output_dir_qlora"
    run_dir.mkdir()
    (run_dir / "best_checkpoint.json").write_text('{"path": "x"}')
    with pytest.raises(SystemExit, match="is a train.py run directory, not a model: merge its best checkpoint first"):
        predict.parse_args(["--model_path", str(run_dir)])
    with pytest.raises(SystemExit, match="no config.json"):
        predict.parse_args(["--model_path", str(tmp_path)])
    with pytest.raises(SystemExit, match="a file, not a model directory"):
        predict.parse_args(["--model_path", str(run_dir / "best_checkpoint.json")])
    checkpoint = tmp_path / "epoch-1-step-4"  # an unmerged checkpoint whose base does not resolve from here
    checkpoint.mkdir()
    (checkpoint / "adapter_config.json").write_text('{"base_model_name_or_path": "moved/tiny_qwen/"}')
    (checkpoint / "qwen.tiktoken").write_text("")
    with pytest.raises(SystemExit, match="names the base model 'moved/tiny_qwen/', which is no model directory from"):
        predict.parse_args(["--model_path", str(checkpoint)])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="no qwen.tiktoken"):
        predict.parse_args(["--model_path", str(tmp_path)])
    (tmp_path / "qwen.tiktoken").write_text("")
    with pytest.raises(SystemExit, match="no weights .model.safetensors / model.safetensors.index.json"):
        predict.parse_args(["--model_path", str(tmp_path)])
    for flags in (["--temperature", "0"], ["--top_p", "0"], ["--top_p", "1.5"]):
        with pytest.raises(SystemExit, match="--do_sample needs --temperature > 0 and 0 < --top_p <= 1"):
            predict.parse_args(["--model_path", tiny_ckpt, "--do_sample", *flags])
    assert predict.parse_args(["--model_path", tiny_ckpt, "--temperature", "0"]).do_sample is False  # unused: fine
    with pytest.raises(SystemExit, match="--repetition_penalty must be a positive number"):
        predict.parse_args(["--model_path", tiny_ckpt, "--repetition_penalty", "0"])
    args = predict.parse_args(["--model_path", tiny_ckpt, "--dtype", "float32"])
    assert inference.resolve_dtype(args.dtype, torch.device("cpu")) == torch.float32


def test_untuned_baseline_batch_mode(tiny_ckpt, tmp_path, capsys):
    """test_qwen.py writes the same records as predict.py, from the same prompts (greedy, so the same answers); each
    says once, at the start, that the make_tiny model has random weights."""
    import test_qwen

    inputs = tmp_path / "test.json"
    write_lines(inputs, [{"input": d} for d in DIALOGUES[:2]])
    common = ["--model_path", tiny_ckpt, "--device", "cpu", "--input_file", str(inputs), "--max_tgt_len", "64"]
    for script, output in ((test_qwen, "base.jsonl"), (predict, "tuned.jsonl")):
        assert script.main(common + ["--output_file", str(tmp_path / output)]) == 0
        out = capsys.readouterr().out
        assert out.count(RANDOM_WEIGHTS_NOTE) == 1 and out.index(RANDOM_WEIGHTS_NOTE) < out.index("records"), out
    base, tuned = read_lines(tmp_path / "base.jsonl"), read_lines(tmp_path / "tuned.jsonl")
    assert sorted(r["id"] for r in base) == [0, 1]
    assert sorted(base, key=lambda r: r["id"]) == sorted(tuned, key=lambda r: r["id"])
    for r in base:  # under the default constraint, random weights too: valid, grounded, closed and flagged
        fields, valid = parse_output(r["output"])
        assert valid and r["truncated"] and r["output"].startswith("```json\n{") and r["output"].endswith("}\n```")
        assert all(item in DIALOGUES[r["id"]] for key in LIST_KEYS for item in fields[key])


def test_untuned_baseline_answers_the_fields_of_a_schema(tiny_ckpt, tmp_path):
    """test_qwen.py --schema: the model, which has no schema.json, answers the file's fields, in its order, and the
    settings file records the schema (evaluate.py scores those fields from there)."""
    import test_qwen
    from medextract.schema import load_schema

    (tmp_path / "three.json").write_text(json.dumps({"fields": [
        {"name": "症状", "kind": "spans"}, {"name": "药品名称", "kind": "spans"}, {"name": "诊断结果", "kind": "text"}]},
        ensure_ascii=False), encoding="utf-8")
    schema = load_schema(str(tmp_path / "three.json"))
    write_lines(tmp_path / "test.json", [{"input": DIALOGUES[0]}])
    assert test_qwen.main(["--model_path", tiny_ckpt, "--device", "cpu", "--schema", str(tmp_path / "three.json"),
                           "--input_file", str(tmp_path / "test.json"), "--output_file", str(tmp_path / "base.jsonl"),
                           "--max_tgt_len", "64"]) == 0
    [record] = read_lines(tmp_path / "base.jsonl")
    assert record["input_digest"] == input_digest(schema.instruction + DIALOGUES[0])
    assert list(json.loads(record["output"].removeprefix("```json\n").removesuffix("\n```"))) == \
        ["症状", "药品名称", "诊断结果"]  # as the grammar wrote them
    fields, valid = parse_output(record["output"], schema.fields)
    assert valid and list(fields) == list(schema.keys)
    with open(tmp_path / "base.jsonl.settings.json", encoding="utf-8") as f:
        assert json.load(f)["schema"] == schema.to_json()


def test_read_dialogue_joins_lines_and_recognises_exits():
    def reader(lines):
        it = iter(lines)

        def read(prompt):
            try:
                return next(it)
            except StopIteration:
                raise EOFError from None
        return read

    assert terminal.read_dialogue(reader(["", "医生: 你好", "患者: 咳嗽", ""])) == "医生: 你好\n患者: 咳嗽\n"
    assert terminal.read_dialogue(reader(["医生: 你好"])) == "医生: 你好\n"  # Ctrl-D ends the last dialogue
    assert terminal.read_dialogue(reader([])) is None
    assert terminal.read_dialogue(reader(["quit"])) is None
    assert terminal.read_dialogue(reader([" EXIT "])) is None


def test_interactive_leaves_cleanly_on_ctrl_c(capsys):
    def interrupt(prompt=""):
        raise KeyboardInterrupt

    assert terminal.interactive(lambda dialogue: "never called", read_line=interrupt) == 0
    assert "Bye." in capsys.readouterr().out


def read_until(fd, marker, timeout=120.0):
    seen = b""
    deadline = time.monotonic() + timeout
    while marker.encode() not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{marker!r} not seen; output so far:\n{seen.decode(errors='replace')}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"{marker!r} not seen before EOF:\n{seen.decode(errors='replace')}")
            seen += chunk
    return seen.decode(errors="replace")


def test_interactive_session_in_a_terminal(tiny_ckpt):
    """Before the first answer the session says, once each, that the chapter's sampling flags without --do_sample
    leave decoding greedy and that the make_tiny model has random weights."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "predict.py"), "--model_path", tiny_ckpt,
                             "--device", "cpu", "--max_tgt_len", "64", "--top_p", "0.8", "--temperature", "0.8"],
                            stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, close_fds=True)
    os.close(slave)
    try:
        before = read_until(master, "> ")
        notes = [line.strip() for line in before.splitlines() if line.startswith("note: ")]
        assert notes == ["note: decoding is greedy; --top_p and --temperature take effect only with --do_sample, "
                         "which samples as the book did", RANDOM_WEIGHTS_NOTE], before
        os.write(master, "\n".join(["医生: 你好，哪里不舒服？", "患者: 头痛两天了。", "医生: 量过血压吗？", "", ""]).encode())
        read_until(master, "Extracting")
        answer = read_until(master, "> ")  # the next prompt comes after the answer
        # random weights, but under the default constraint: the answer is the format, pretty-printed, and closed
        assert "not valid JSON" not in answer and "reached --max_tgt_len and was closed" in answer
        shown = json.loads(answer[answer.index("{"):answer.rindex("}") + 1])
        assert list(shown) == list(EXTRACT_KEYS)
        assert all(item in "医生: 你好，哪里不舒服？\n患者: 头痛两天了。\n医生: 量过血压吗？\n"
                   for key in LIST_KEYS for item in shown[key])
        os.write(master, b"quit\n")
        read_until(master, "Bye.")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_a_failed_answer_is_named_left_out_and_retried(tokenizer, tmp_path, monkeypatch):
    from medextract.engine import Decoding, Engine, Result

    def one_ok_one_failed(engine, requests):
        yield 1, Result([1], "{}", "stop", False, 10)
        yield 0, Result([], "the grammar rejected token 5", "error", False, 10)

    monkeypatch.setattr(Engine, "stream", one_ok_one_failed)
    engine = Engine.__new__(Engine)
    engine.tokenizer, engine.vocabulary = tokenizer, None
    inputs, out = tmp_path / "test.json", tmp_path / "pred.jsonl"
    write_lines(inputs, [{"input": DIALOGUES[0]}, {"input": DIALOGUES[1]}])
    with pytest.raises(AnswersFailed, match=r"1 answers failed \(ids 0\); the 1 others are in .*a rerun tries"):
        inference.predict_file(engine, str(inputs), str(out), Decoding(), constraint="none")
    assert [r["id"] for r in read_lines(out)] == [1]
