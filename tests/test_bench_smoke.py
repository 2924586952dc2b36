"""The benchmarks start and end with one valid JSON line, on a very tiny model and tiny counts."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2", "--intermediate_size", "64",
        "--device", "cpu"]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def last_json_line(text):
    return json.loads(text.strip().splitlines()[-1])


def test_bench_predict_smoke(tmp_path, capsys):
    data = tmp_path / "test.json"
    dialogues = ["医生: 你好\n患者: 咳嗽两天。\n", "医生: 哪里不舒服？\n患者: 头痛，有点发烧。\n医生: 量过体温吗？\n",
                 "医生: 您好\n"]
    with open(data, "w", encoding="utf-8") as f:
        for d in dialogues:
            f.write(json.dumps({"input": d}, ensure_ascii=False) + "\n")
    bench = load_script("bench_predict")
    bench.main(TINY + ["--cache_dir", str(tmp_path), "--input_file", str(data), "--num_samples", "3",
                       "--new_tokens", "2", "--batch_sizes", "2"])
    result = last_json_line(capsys.readouterr().out)
    assert [v["name"] for v in result["variants"]] == ["chapter (batch 1)", "ours (batch 2)"]
    assert result["settings"]["num_samples"] == 3 and result["speedup"] > 0
    assert all(v["same_output_as_chapter"] == "3/3" for v in result["variants"])
    assert result["machine"]["device"] == "cpu" and result["machine"]["cpu_count"] >= 1


def test_bench_predict_measures_the_grammar_against_free_generation(tmp_path, capsys):
    data = tmp_path / "test.json"
    with open(data, "w", encoding="utf-8") as f:
        for d in ["医生: 你好\n患者: 咳嗽两天。\n", "医生: 哪里不舒服？\n患者: 头痛，有点发烧。\n"]:
            f.write(json.dumps({"input": d}, ensure_ascii=False) + "\n")
    bench = load_script("bench_predict")
    bench.main(TINY + ["--cache_dir", str(tmp_path), "--input_file", str(data), "--num_samples", "2",
                       "--new_tokens", "30", "--batch_sizes", "2", "--constraint", "grounded"])
    result = last_json_line(capsys.readouterr().out)
    assert [v["name"] for v in result["variants"]] == ["free (batch 2)", "grounded (batch 2)"]
    assert [v["new_tokens"] for v in result["variants"]] == [60, 60]  # the same work, masks or not
    assert set(result["constraint_cost"]) == {"free (batch 2)"}


def test_bench_predict_needs_the_test_split(tmp_path):
    bench = load_script("bench_predict")
    with pytest.raises(SystemExit, match="data_helper.py"):
        bench.parse_args(["--input_file", str(tmp_path / "missing.json")])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bench_train_smoke(precision, tmp_path, capsys):
    bench = load_script("bench_train")
    argv = TINY + ["--cache_dir", str(tmp_path), "--seq_len", "24", "--label_len", "8", "--precision", precision,
                   "--gradient_accumulation_steps", "2", "--warmup_steps", "0", "--steps", "1"]
    bench.main(argv)
    result = last_json_line(capsys.readouterr().out)
    assert result["settings"]["quantization"] == "nf4" and result["settings"]["gradient_checkpointing"]
    assert result["settings"]["precision"] == precision and result["model"]["trainable_params"] > 0
    assert result["seconds_per_optimizer_step"] > 0 and result["tokens_per_s"] > 0 and result["peak_memory_gb"] > 0
    bench.main(argv)  # the model is now cached: the same seeds give the same losses
    assert last_json_line(capsys.readouterr().out)["loss_first_last"] == result["loss_first_last"]


def test_bench_train_bf16_casts_like_deepspeed(tiny_ckpt):
    import torch

    import train
    from medextract.qlora import build_model

    bench = load_script("bench_train")
    args = train.parse_args(["--model_name_or_path", tiny_ckpt, "--lora_dim", "4"])
    model = build_model(train.qlora_settings_of(args), "bf16", torch.device("cpu"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # peft upcasts; DeepSpeed casts back
    masters = bench.cast_like_deepspeed(model, "bf16")
    assert [m.shape for m in masters] == [p.shape for p in trainable]
    assert all(m.dtype == torch.float32 and torch.equal(m.bfloat16(), p) for m, p in zip(masters, trainable))
    floating = [p for p in model.parameters() if p.is_floating_point()]
    assert floating and all(p.dtype == torch.bfloat16 for p in floating)  # 4-bit weights stay packed uint8
    assert bench.cast_like_deepspeed(model, "fp32") == []

    # one step: the masters take the gradients and the update, and the bf16 parameters are overwritten with them
    optimizer = torch.optim.AdamW(masters, lr=1e-2)
    before = [m.clone() for m in masters]
    ids = torch.randint(0, 151643, (2, 12))
    model.train()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    bench.optimizer_step(optimizer, trainable, masters)
    assert all(p.grad is None for p in trainable)
    assert all(not torch.equal(m, b) for m, b in zip(masters, before))  # every LoRA matrix moved
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, m.bfloat16()) for p, m in zip(trainable, masters))


def test_bench_kernels_smoke(capsys):
    bench = load_script("bench_kernels")
    result = bench.main(["--num_attention_heads", "2", "--head_dim", "8", "--vocab_size", "300", "--prompt_len", "6",
                         "--batch_size", "3", "--cache_len", "8", "--seen_tokens", "5", "--rounds", "2",
                         "--repeats", "1"])
    assert last_json_line(capsys.readouterr().out) == json.loads(json.dumps(result, ensure_ascii=False))
    assert set(result["kernels"]) == {"attention, prefill", "attention, decoding step", "logits cast to fp32",
                                      "repetition penalty", "greedy choice", "top-p sampling"}
    for row in result["kernels"].values():
        assert len(row["rounds_ms"]["fp32"]) == len(row["rounds_ms"]["bf16"]) == 2 and row["bf16_over_fp32"] > 0

