"""train.py on CPU with the tiny random Qwen: a one-process run and a two-rank ZeRO-2 run over gloo (both 4-bit NF4),
exact resume after an interruption, the step and learning-rate plan, the DeepSpeed config, the LoRA targets and
parameter count at the real 1.8B shape, and the bad-input errors.

The runs are subprocesses, exactly as a user starts them (`python train.py ...`, `deepspeed --num_gpus 2 train.py ...`).
The samples use a short instruction so sequences are ~110 tokens and each run takes seconds.
"""
import base64
import glob
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from medextract import checkpoints, distributed, qlora, training
from medextract.errors import ConfigError, OutputError
from utils import cpu_computes_bf16, format_output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_LINE = re.compile(r"^epoch (\d+)/(\d+) \| step (\d+)/(\d+) \| loss (\d+\.\d{4}) \| lr (\d\.\d\de[-+]\d\d) \| "
                       r"(\d+\.\d\d) s/step$", re.M)
DRUGS = ["阿莫西林", "布洛芬", "奥司他韦", "蒙脱石散", "氨溴索"]


def write_samples(path: str, n: int) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            drug, days = DRUGS[i % len(DRUGS)], i % 5 + 1
            extract = {"药品名称": [drug], "药物类别": [], "医疗检查": [], "医疗操作": [],
                       "现病史": f"咳嗽{days}天，发热", "辅助检查": "", "诊断结果": "", "医疗建议": "多喝水"}
            dialogue = f"患者：孩子咳嗽{days}天了，有点发烧。\n医生：可以吃点{drug}，多喝水。"
            sample = {"instruction": "抽取医疗要素：\n", "input": dialogue, "output": format_output(extract)}
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_data")
    write_samples(str(d / "train.json"), 12)
    write_samples(str(d / "test.json"), 2)
    return str(d)


def flags(ckpt: str, data: str, out: str, *switches: str, **overrides) -> list[str]:
    values = {"train_path": f"{data}/train.json", "test_path": f"{data}/test.json", "model_name_or_path": ckpt,
              "per_device_train_batch_size": 2, "max_len": 160, "max_src_len": 64, "learning_rate": 2e-2,
              "num_train_epochs": 2, "gradient_accumulation_steps": 4, "warmup_ratio": 0.2, "show_loss_step": 1,
              "lora_dim": 8, "lora_alpha": 16, "save_model_step": 1, "output_dir": out,
              "ds_file": os.path.join(ROOT, "ds_zero2_no_offload.json"), "select_by": "ppl"}
    values.update(overrides)
    return [f"--{k}={v}" for k, v in values.items()] + [f"--{s}" for s in switches]


def run(cmd: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adapter(checkpoint: str) -> dict:
    return load_file(os.path.join(checkpoint, "adapter_model.safetensors"))


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# 12 samples, batch 2, one rank: 6 micro-batches per epoch in windows of 4 and 2 -> 2 optimizer steps per epoch.
# Saving every step, the epoch-end saves coincide with step saves and must not be repeated.
SINGLE_CHECKPOINTS = ["epoch-1-step-1", "epoch-1-step-2", "epoch-2-step-3", "epoch-2-step-4"]


# bf16 named, not left to auto, so the bf16 path (DeepSpeed's bf16 mode, checkpoints, a bit-exact resume) is tested on
# any CPU, emulated where the CPU has no native bf16; test_train_f1.py trains and resumes in fp32, and the two-rank runs
# below take what auto gives.
SINGLE_PRECISION = "bf16"


@pytest.fixture(scope="module")
def single_run(tiny_ckpt, data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("single") / "out")
    log = run([sys.executable, "train.py", *flags(tiny_ckpt, data_dir, out, precision=SINGLE_PRECISION)])
    return out, log


def test_single_process_run_writes_checkpoints_logs_and_plots(single_run):
    out, log = single_run
    # every step, with no second save at the epoch ends (steps 2 and 4)
    assert sorted(d for d in os.listdir(out) if d.startswith("epoch-")) == SINGLE_CHECKPOINTS
    for name in SINGLE_CHECKPOINTS:
        ckpt = os.path.join(out, name)
        for f in ("adapter_model.safetensors", "adapter_config.json", "qwen.tiktoken", "tokenizer_config.json",
                  "train_args.json", "trainer_state.json", "rng_state_rank0.json"):
            assert os.path.isfile(os.path.join(ckpt, f)), f"{name}/{f}"
        assert os.listdir(os.path.join(ckpt, "deepspeed", "state"))
    assert not [d for d in os.listdir(out) if d.startswith(".tmp")]
    assert [f for f in os.listdir(os.path.join(out, "tensorboard")) if f.startswith("events.out.tfevents")]
    for png in ("train_loss.png", "test_ppl.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    info = read_json(os.path.join(out, "train_args.json"))
    assert info["world_size"] == 1 and info["precision"] == "bf16" and info["quantization"] == "nf4"
    assert info["total_optimizer_steps"] == 4 and info["micro_batches_per_epoch"] == 6
    assert "auto" not in json.dumps(info["ds_config"])
    assert info["ds_config"]["optimizer"]["params"]["weight_decay"] == 0.1
    assert info["ds_config"]["bf16"]["enabled"] is True
    assert "precision auto:" not in log  # named on the command line: nothing to explain
    assert re.search(r"^trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: [\d.]+$", log, re.M)

    state = read_json(os.path.join(out, "epoch-2-step-4", "trainer_state.json"))
    best = read_json(os.path.join(out, "best_checkpoint.json"))
    best_ppl = min(ppl for _, ppl in state["history"]["eval"])
    assert best["ppl"] == best_ppl and os.path.isdir(best["path"])
    assert f"best checkpoint: {best['path']}" in log


def test_log_lines_schedule_and_falling_loss(single_run):
    out, log = single_run
    lines = STEP_LINE.findall(log)
    assert [int(m[2]) for m in lines] == [1, 2, 3, 4]  # one line per step (show_loss_step 1)
    assert {m[3] for m in lines} == {"4"}
    # Linear warmup from 0 over max(2, int(0.2 * 4)) = 2 steps, then linear decay to 0: step k uses t = k - 1.
    peak, total, warmup = 2e-2, 4, 2
    expected = [peak * t / warmup if t < warmup else peak * (total - t) / (total - warmup) for t in range(total)]
    assert [float(m[5]) for m in lines] == pytest.approx(expected, rel=1e-2, abs=1e-12)
    losses = [float(m[4]) for m in lines]
    assert losses[-1] < losses[0] - 0.05
    state = read_json(os.path.join(out, "epoch-2-step-4", "trainer_state.json"))
    ppls = [ppl for _, ppl in state["history"]["eval"]]
    assert [s for s, _ in state["history"]["eval"]] == [1, 2, 3, 4]
    assert ppls[-1] < ppls[0]


def test_interrupted_run_resumes_to_the_same_weights(single_run, tiny_ckpt, data_dir, tmp_path):
    """4-bit NF4, one process: resumed mid-epoch, "killed" after an unsaved step, resumed again at an epoch end;
    the final adapter is bit-identical to the uninterrupted run's, and so are the logged losses, each the mean over
    its --show_loss_step steps across the epoch end and the resume."""
    out, _ = single_run
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    # From step 1 (micro-batch 4 of 6), saving every 2 steps, logging every 3, stopping after step 3: step 3 is lost.
    log = run([sys.executable, "train.py", *flags(tiny_ckpt, data_dir, first, save_model_step=2, stop_after_steps=3,
                                                  show_loss_step=3, precision=SINGLE_PRECISION,
                                                  resume_from_checkpoint=os.path.join(out, "epoch-1-step-1"))])
    assert "(weights_only load)" in log and "stopped after step 3" in log  # no pickle code runs on resume
    assert sorted(d for d in os.listdir(first) if d.startswith("epoch-")) == ["epoch-1-step-2"]
    first_lines = STEP_LINE.findall(log)
    # the step-2 checkpoint holds step 2's unlogged losses, which the step-3 line of the second run takes in
    log = run([sys.executable, "train.py", *flags(tiny_ckpt, data_dir, second, save_model_step=2, show_loss_step=3,
                                                  precision=SINGLE_PRECISION,
                                                  resume_from_checkpoint=os.path.join(first, "epoch-1-step-2"))])
    assert [int(m[2]) for m in STEP_LINE.findall(log)] == [3, 4] == [int(m[2]) for m in first_lines] + [4]

    final_a, final_b = os.path.join(out, "epoch-2-step-4"), os.path.join(second, "epoch-2-step-4")
    a, b = adapter(final_a), adapter(final_b)
    assert a.keys() == b.keys() and len(a) == 2 * 5 * 2  # lora_A/B x 5 linears x 2 layers
    for key in a:
        assert torch.equal(a[key], b[key]), key
    state_a = read_json(os.path.join(final_a, "trainer_state.json"))
    state_b = read_json(os.path.join(final_b, "trainer_state.json"))
    for key in ("epoch", "micro_in_epoch", "global_step"):
        assert state_a[key] == state_b[key], key
    # single_run logged every step: per-step means over windows of 4, 2, 4, 2 micro-batches (the epoch's last is short)
    per_step = state_a["history"]["train"]
    step_1, step_3, step_4 = state_b["history"]["train"]
    assert step_1 == per_step[0] and step_4 == per_step[3]  # step 1 restored; 4 is the last step, logged alone
    assert step_3[0] == 3 and step_3[2] == per_step[2][2]
    assert step_3[1] == pytest.approx((2 * per_step[1][1] + 4 * per_step[2][1]) / 6, rel=1e-12)  # steps 2 and 3
    assert float(first_lines[0][4]) == pytest.approx(step_3[1], abs=1e-4)  # the same mean, unbroken by the stop
    # the sample order depends on --group_by_length: a resume that changes it is refused before anything loads
    saved_plan = training.StepPlan(**read_json(os.path.join(final_a, "trainer_state.json"))["plan"])
    with pytest.raises(ConfigError, match="was taken without --group_by_length; resume it the same way"):
        checkpoints.resume(None, final_a, saved_plan, world_size=1, rank=0, group_by_length=True)
    # so is one with another learning rate (DeepSpeed would take it mid-schedule), or one that would stop in the past
    args = train.parse_args(flags(tiny_ckpt, data_dir, second))
    train.check_resume_flags(final_a, args)  # the same flags: fine
    with pytest.raises(SystemExit, match=r"other settings \(--learning_rate 0.02 -> 0.001; --truncation tokens -> "
                                         r"turns; --lora_alpha 16 -> 32\)"):
        train.check_resume_flags(final_a, train.parse_args(flags(tiny_ckpt, data_dir, second, learning_rate=1e-3,
                                                                 truncation="turns", lora_alpha=32)))
    args.stop_after_steps = 4
    with pytest.raises(SystemExit, match="--stop_after_steps 4 counts steps in total, and .* is already at step 4"):
        train.check_resume_flags(final_a, args)
    ppl_a = dict(state_a["history"]["eval"])
    assert all(ppl_a[step] == ppl for step, ppl in state_b["history"]["eval"])  # evaluated every 2 steps here


def linked_copy(source: str, target, **replace: bytes) -> str:
    """A copy of a model directory made of links to its files, except the files given ({name: bytes})."""
    os.makedirs(target)
    for name in os.listdir(source):
        if name not in replace:
            os.symlink(os.path.join(source, name), os.path.join(target, name))
    for name, data in replace.items():
        with open(os.path.join(target, name), "wb") as f:
            f.write(data)
    return str(target)


def test_a_resume_on_other_data_another_base_or_tokenizer_is_refused(single_run, tiny_ckpt, data_dir, tmp_path,
                                                                     capsys):
    """The checkpoint records fingerprints of its data, base and vocabulary; a resume on the same records in another
    order, another test file, another base of the same shape or another vocabulary stops before anything is made,
    naming what changed. The base found elsewhere (moved, copied) is the same base; a checkpoint from before the
    fingerprints resumes with a note."""
    from qwen1_8.make_tiny import make_tiny

    checkpoint = os.path.join(single_run[0], "epoch-1-step-1")
    out = tmp_path / "out"
    recorded = read_json(os.path.join(checkpoint, "train_args.json"))["fingerprints"]
    args = train.parse_args(flags(tiny_ckpt, data_dir, str(out)))
    assert recorded == checkpoints.run_fingerprints(args.train_path, args.test_path, args.model_name_or_path)
    assert recorded["train_path"].startswith("sha256:") and recorded["model_name_or_path"].startswith("sampled-")
    moved = linked_copy(tiny_ckpt, tmp_path / "moved")
    assert checkpoints.base_model_fingerprint(moved) == recorded["model_name_or_path"]

    with open(os.path.join(data_dir, "train.json"), encoding="utf-8") as f:
        lines = f.readlines()
    (tmp_path / "reordered.json").write_text("".join(lines[6:] + lines[:6]), encoding="utf-8")  # same 12 records
    (tmp_path / "test.json").write_text("".join(lines[2:4]), encoding="utf-8")  # data_dir's is lines[:2]
    other_base = make_tiny(str(tmp_path / "other_base"), seed=1)  # the same shape, other weights
    with open(os.path.join(tiny_ckpt, "qwen.tiktoken"), "rb") as f:
        vocab = f.read().split(b"\n")
    other_vocab = linked_copy(tiny_ckpt, tmp_path / "other_vocab",
                              **{"qwen.tiktoken": b"\n".join([vocab[1], vocab[0], *vocab[2:]])})
    for overrides, named in (({"train_path": tmp_path / "reordered.json"}, "the training file --train_path"),
                             ({"test_path": tmp_path / "test.json"}, "the test file --test_path"),
                             ({"model_name_or_path": other_base}, "the base model's weights or config.json"),
                             ({"model_name_or_path": other_vocab}, "the tokenizer's vocabulary")):
        with pytest.raises(SystemExit, match=f"was trained on other inputs: {re.escape(named)}.* has changed since"):
            train.main(flags(tiny_ckpt, data_dir, str(out), resume_from_checkpoint=checkpoint, **overrides))
    assert not out.exists()

    old = tmp_path / "old" / "epoch-1-step-1"
    shutil.copytree(checkpoint, old)
    info = read_json(old / "train_args.json")
    del info["fingerprints"]
    (old / "train_args.json").write_text(json.dumps(info), encoding="utf-8")
    checkpoints.check_resume_fingerprints(str(old), {**recorded, "train_path": "sha256:other"})
    assert "records no fingerprints of its data and base model" in capsys.readouterr().out


def test_checkpoints_carry_our_model_card(single_run, tiny_ckpt):
    """README.md is ours, not PEFT's empty template: the base, the training settings, this step's metrics, how to
    merge and predict; and the log says once that the base has random weights."""
    out, log = single_run
    with open(os.path.join(out, "epoch-2-step-4", "README.md"), encoding="utf-8") as f:
        card = f.read()
    assert "Model Card for Model ID" not in card and card.startswith("# LoRA adapter epoch-2-step-4\n")
    assert f"the base model `{tiny_ckpt}`" in card
    ppl = dict(read_json(os.path.join(out, "epoch-2-step-4", "trainer_state.json"))["history"]["eval"])[4]
    assert f"- test perplexity (token-weighted): {ppl:.4f}" in card
    for row in ("| epochs | 2 (this is epoch 2, optimizer step 4 of 4) |", "| quantization | 4-bit NF4",
                "| precision | bf16 on cpu |", "| world size | 1 |", "| LoRA | r 8, alpha 16, dropout 0.1, on c_attn",
                "| learning rate | 0.02 peak", "| batch | 2 per rank × 4 accumulation × 1 rank(s) |"):
        assert row in card, row
    assert "the base has random weights (qwen1_8.make_tiny)" in card
    assert f"python merge_params.py --ori_model_dir {tiny_ckpt} --model_dir {out}/epoch-2-step-4 " in card
    assert "F1" not in card.split("## At this checkpoint")[1].split("## Use")[0]  # --select_by ppl: no F1 measured
    assert log.count("note: the base model has random weights (make_tiny): perplexity near the vocabulary size "
                     "(~150,000) and F1 near 0 are expected") == 1


def test_the_first_cpu_compile_is_announced_only_until_it_is_cached(tmp_path, monkeypatch):
    """DeepSpeed compiles its CPU communication module silently for about a minute on first use; train.py says so
    beforehand unless the module is in torch's extension cache."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert not distributed.cpu_comm_module_cached()
    built = tmp_path / "py311_cpu" / distributed.SHM_COMM_OP
    built.mkdir(parents=True)
    (built / f"{distributed.SHM_COMM_OP}.so").write_bytes(b"")
    assert distributed.cpu_comm_module_cached()


def test_checkpoints_get_the_users_usual_permissions(single_run):
    """Not the 0600 adapter safetensors writes: every file and folder of a checkpoint as the umask gives them."""
    from utils import current_umask

    umask = current_umask()
    checkpoint = os.path.join(single_run[0], "epoch-1-step-1")
    for directory, folders, files in os.walk(checkpoint):
        assert os.stat(directory).st_mode & 0o777 == 0o777 & ~umask, directory
        for name in files:
            assert os.stat(os.path.join(directory, name)).st_mode & 0o777 == 0o666 & ~umask, name


def optimizer_partitions(state_dir: str) -> int:
    """The ZeRO optimizer-state files of a DeepSpeed checkpoint, one per rank (bf16_zero_pp_rank_N_... in bf16 mode)."""
    return sum(bool(re.match(r"(bf16_)?zero_pp_rank_\d+_", f)) for f in os.listdir(state_dir))


def test_two_ranks_zero2_over_gloo(tiny_ckpt, data_dir, tmp_path):
    out = str(tmp_path / "out")
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [launcher] if os.path.exists(launcher) else [sys.executable, "-m", "deepspeed.launcher.runner"]
    # 6 samples per rank, batch 2 -> 3 micro-batches per epoch in windows of 2 and 1 -> 2 steps per epoch
    port = free_port()
    log = run([*cmd, "--num_gpus", "2", "--master_port", str(port), "train.py",
               *flags(tiny_ckpt, data_dir, out, "gradient_checkpointing", "group_by_length", save_model_step=0,
                      gradient_accumulation_steps=2, save_total_limit=1, truncation="turns")])
    lines = STEP_LINE.findall(log)
    assert [int(m[2]) for m in lines] == [1, 2, 3, 4]  # printed by rank 0 only
    assert float(lines[-1][4]) < float(lines[0][4]) - 0.05
    # --precision auto: bf16 in DeepSpeed's bf16 mode where this CPU computes it natively, else fp32; said once
    auto = "bf16" if cpu_computes_bf16() else "fp32"
    assert log.count("precision auto: bf16 (this CPU computes bf16 natively; --precision fp32 to override)") == (
        auto == "bf16")
    # saved at both epoch ends; --save_total_limit 1 keeps the newest and the best
    assert f"saved {out}/epoch-1-step-2" in log and f"saved {out}/epoch-2-step-4" in log
    best = os.path.basename(read_json(os.path.join(out, "best_checkpoint.json"))["path"])
    assert sorted(d for d in os.listdir(out) if d.startswith("epoch-")) == sorted({best, "epoch-2-step-4"})
    info = read_json(os.path.join(out, "train_args.json"))
    assert info["world_size"] == 2 and info["ds_config"]["train_batch_size"] == 2 * 2 * 2
    assert info["precision"] == auto and info["ds_config"]["bf16"]["enabled"] is (auto == "bf16")
    assert info["args"]["truncation"] == "turns"  # predict.py cuts prompts the same way
    assert info["ds_config"]["zero_optimization"]["stage"] == 2
    state_dir = os.path.join(out, "epoch-2-step-4", "deepspeed", "state")
    assert optimizer_partitions(state_dir) == 2  # optimizer state partitioned
    assert os.path.isfile(os.path.join(out, "epoch-2-step-4", "adapter_model.safetensors"))
    assert os.path.isfile(os.path.join(out, "train_loss.png")) and os.path.isfile(os.path.join(out, "test_ppl.png"))
    # DeepSpeed's CPU allreduce buffers (69 MB of RAM per rank) were created and are not left behind in /dev/shm
    assert "ShareMemCommBuilder" in log or "shm_comm" in log
    assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*") == []


def test_two_nodes_as_the_multi_node_runner_starts_them(tiny_ckpt, data_dir, tmp_path):
    """`deepspeed --hostfile ...` starts, over pdsh on each machine, `python -m deepspeed.launcher.launch
    --world_info=... --node_rank=N`. Here that is done by hand for two 'machines' of one rank each: both ranks have
    LOCAL_RANK 0, they meet over TCP (no shared-memory allreduce across machines), and the run trains and saves
    into the shared output_dir as on one machine."""
    out = str(tmp_path / "out")
    world_info = base64.urlsafe_b64encode(json.dumps({"worker-1": [0], "worker-2": [0]}).encode()).decode()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
                               f"--node_rank={n}", "--master_addr=127.0.0.1", f"--master_port={port}", "train.py",
                               *flags(tiny_ckpt, data_dir, out, save_model_step=0, gradient_accumulation_steps=2,
                                      num_train_epochs=1)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in (0, 1)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-4000:] for log in logs)
    assert "nnodes=2, num_local_procs=1, node_rank=1" in logs[1]
    assert [int(m[2]) for m in STEP_LINE.findall(logs[0])] == [1, 2] and STEP_LINE.findall(logs[1]) == []
    info = read_json(os.path.join(out, "train_args.json"))
    assert info["world_size"] == 2
    state_dir = os.path.join(out, "epoch-1-step-2", "deepspeed", "state")
    assert optimizer_partitions(state_dir) == 2  # a partition from each machine
    assert os.path.isfile(os.path.join(out, "epoch-1-step-2", "rng_state_rank1.json"))


# ---------------------------------------------------------------------------------------------------------------
# In-process: no training
# ---------------------------------------------------------------------------------------------------------------


def test_lora_on_every_linear_but_lm_head_at_the_1_8b_shape():
    from qwen1_8.configuration_qwen import QWenConfig
    from qwen1_8.modeling_qwen import QWenLMHeadModel

    config = QWenConfig(vocab_size=151936, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                        kv_channels=128, intermediate_size=11008)
    with torch.device("meta"):  # shapes only: nothing of the 1.8B is allocated
        model = QWenLMHeadModel(config)
    assert qlora.lora_target_names(model) == ["c_attn", "c_proj", "w1", "w2"]
    peft_model = qlora.add_lora(model, lora_dim=16, lora_alpha=64, lora_dropout=0.1)
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert trainable == 13_418_496
    assert total == 1_836_828_672 + 13_418_496


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_is_bf16_where_the_hardware_computes_it(native, monkeypatch):
    """--precision auto on either kind of CPU (and GPU), whichever this one is: torch's capability checks decide."""
    monkeypatch.setattr(qlora, "cpu_computes_bf16", lambda: native)
    monkeypatch.setattr(qlora, "native_bf16", lambda device: native)
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    expected = "bf16" if native else "fp32"
    assert qlora.resolve_precision("auto", cpu) == expected == qlora.resolve_precision("auto", gpu)
    for named in ("fp32", "bf16"):  # a named precision is taken as it is on the CPU (bf16 emulated where not native)
        assert qlora.resolve_precision(named, cpu) == named
        assert qlora.precision_note(named, named, cpu) is None
    note = qlora.precision_note("auto", expected, cpu)
    assert note == ("precision auto: bf16 (this CPU computes bf16 natively; --precision fp32 to override)"
                    if native else None)
    assert qlora.precision_note("auto", expected, gpu) is None  # bf16 on an Ampere GPU is what everyone expects
    if not native:
        with pytest.raises(ConfigError, match="this GPU does not support bf16"):
            qlora.resolve_precision("bf16", gpu)


def test_a_resume_continues_in_the_precision_it_was_trained_in(tmp_path):
    """auto resolves on the machine at hand: a run begun in fp32 (a CPU without native bf16, or train.py before auto
    took bf16 on CPUs) and resumed here in bf16, or the other way round, is refused, naming the flag that resumes it;
    the flag itself may change (auto -> the precision it gave)."""
    checkpoint = tmp_path / "epoch-1-step-2"
    checkpoint.mkdir()
    (checkpoint / "train_args.json").write_text(json.dumps({"args": {"precision": "auto"}, "precision": "fp32"}))
    train.check_resume_precision(str(checkpoint), "auto", "fp32")
    train.check_resume_precision(str(checkpoint), "fp32", "fp32")
    with pytest.raises(SystemExit, match=r"epoch-1-step-2 was trained in fp32, and --precision auto is bf16 here; "
                                         r"pass --precision fp32 to resume it"):
        train.check_resume_precision(str(checkpoint), "auto", "bf16")
    assert "precision" not in train.RESUME_SAME_FLAGS  # so that --precision fp32 is accepted for a run begun on auto


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_build_model_adapts_the_same_layers_quantized_or_not(quantization, tiny_ckpt):
    import bitsandbytes as bnb

    args = train.parse_args(["--model_name_or_path", tiny_ckpt, "--quantization", quantization, "--lora_dim", "8"])
    model = qlora.build_model(train.qlora_settings_of(args), "fp32", torch.device("cpu"))
    c_attn = model.base_model.model.transformer.h[0].attn.c_attn.base_layer
    assert isinstance(c_attn, bnb.nn.Linear4bit) == (quantization == "nf4")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    # per layer: c_attn 8*(64+192) + attn.c_proj 8*(64+64) + w1, w2 2*8*(64+128) + mlp.c_proj 8*(128+64); 2 layers
    assert model.get_nb_trainable_parameters()[0] == 2 * 8 * (256 + 128 + 2 * 192 + 192)


def test_an_evaluation_leaves_4bit_training_unchanged(tiny_ckpt):
    """On a CPU with AVX512-BF16 (this one, if `lscpu` lists avx512_bf16), bitsandbytes would repack every Linear4bit
    for its bf16 inference kernel at the first no-grad eval forward and keep it so until a state_dict (a checkpoint
    save) unpacks it, lossily. After qlora.build_model, the loss, every LoRA gradient and the saved 4-bit base are
    bit-identical before and after an evaluation, on any CPU."""
    args = train.parse_args(["--model_name_or_path", tiny_ckpt, "--lora_dim", "8", "--lora_dropout", "0"])
    model = qlora.build_model(train.qlora_settings_of(args), "fp32", torch.device("cpu"))
    ids = torch.randint(0, 151_000, (2, 24), generator=torch.Generator().manual_seed(0))

    def loss_and_grads():
        model.train()
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    def evaluation():
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_before, grads_before = loss_and_grads()
    evaluation()
    loss_after, grads_after = loss_and_grads()
    assert torch.equal(loss_before, loss_after)
    # lora_B of the first layer gets its gradient back through the second layer's base linears
    assert grads_before.keys() == grads_after.keys() and any(g.abs().sum() > 0 for g in grads_before.values())
    for name, grad in grads_before.items():
        assert torch.equal(grad, grads_after[name]), name
    evaluation()
    base_after = model.state_dict()  # as a checkpoint save takes it right after an evaluation
    assert base_before.keys() == base_after.keys() and any(".absmax" in k for k in base_after)
    for name, tensor in base_before.items():
        assert torch.equal(tensor, base_after[name]), name


def test_a_new_run_leaves_nothing_that_speaks_of_the_last_one(tmp_path):
    """Started over (--overwrite_output_dir), a run that evaluates late or never must not leave the last run's
    best_checkpoint.json for merge_params.py to merge, nor its plots and TensorBoard events; a resume rewrites
    best_checkpoint.json from the checkpoint it resumes (an abandoned later run may have recorded another)."""
    def fill():
        (tmp_path / "tensorboard").mkdir(exist_ok=True)
        (tmp_path / "tensorboard" / "events.out.tfevents.1.host.1.0").write_bytes(b"old")
        (tmp_path / "tensorboard" / "notes.txt").write_text("the user's")
        for name in ("best_checkpoint.json", "train_loss.png", "test_ppl.png"):
            (tmp_path / name).write_text("old run")
        (tmp_path / "epoch-2-step-9").mkdir(exist_ok=True)

    fill()
    checkpoints.clear_run_outputs(str(tmp_path), best=None, resumed=False)
    assert sorted(os.listdir(tmp_path)) == ["epoch-2-step-9", "tensorboard"]
    assert os.listdir(tmp_path / "tensorboard") == ["notes.txt"]
    fill()
    best = {"path": str(tmp_path / "epoch-1-step-4"), "step": 4, "ppl": 1.7}
    checkpoints.clear_run_outputs(str(tmp_path), best=best, resumed=True)
    assert read_json(tmp_path / "best_checkpoint.json") == best and (tmp_path / "train_loss.png").exists()
    checkpoints.clear_run_outputs(str(tmp_path), best=None, resumed=True)  # resumed before any evaluation
    assert not (tmp_path / "best_checkpoint.json").exists()
    assert len(os.listdir(tmp_path / "tensorboard")) == 2  # a resume purges the events past its step itself
    # a run killed while it wrote a checkpoint or a plot leaves them under temporary names: the next run clears them
    for resumed in (False, True):
        (tmp_path / ".tmp-epoch-1-step-6" / "deepspeed").mkdir(parents=True)
        (tmp_path / ".tmp-test_f1.png").write_bytes(b"half")
        (tmp_path / ".tmp-notes").write_text("not ours")
        checkpoints.clear_run_outputs(str(tmp_path), best=None, resumed=resumed)
        assert not (tmp_path / ".tmp-epoch-1-step-6").exists() and not (tmp_path / ".tmp-test_f1.png").exists()
        assert (tmp_path / ".tmp-notes").exists()


def test_prune_checkpoints_keeps_the_newest_and_the_best(tmp_path):
    names = ["epoch-1-step-1", "epoch-1-step-9", "epoch-2-step-10", "epoch-2-step-11", "epoch-3-step-20"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_model.safetensors").write_bytes(b"x")
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "epoch-9-step-99").write_text("a file, not a checkpoint")
    best = {"path": str(tmp_path / "epoch-1-step-9"), "step": 9, "ppl": 1.5}
    deleted = checkpoints.prune_checkpoints(str(tmp_path), keep=2, best=best, saved="epoch-3-step-20")
    assert deleted == ["epoch-1-step-1", "epoch-2-step-10"]  # ordered by step, not by name
    assert sorted(os.listdir(tmp_path)) == ["epoch-1-step-9", "epoch-2-step-11", "epoch-3-step-20", "epoch-9-step-99",
                                            "tensorboard"]
    assert checkpoints.prune_checkpoints(str(tmp_path), keep=2, best=best, saved="epoch-3-step-20") == []
    assert checkpoints.prune_checkpoints(str(tmp_path), keep=1, best=None, saved="epoch-3-step-20") == [
        "epoch-1-step-9", "epoch-2-step-11"]
    # resumed from an earlier step than an abandoned run reached: the abandoned run's later checkpoint stays, and the
    # checkpoint just saved is kept whatever the step numbers around it
    (tmp_path / "epoch-1-step-5").mkdir()
    assert checkpoints.prune_checkpoints(str(tmp_path), keep=1, best=None, saved="epoch-1-step-5") == []
    assert sorted(os.listdir(tmp_path)) == ["epoch-1-step-5", "epoch-3-step-20", "epoch-9-step-99", "tensorboard"]


def test_output_dir_not_shared_by_all_ranks_is_refused(tmp_path, monkeypatch):
    """Rank 0's marker file is seen by this rank only: the all-reduced count (here: no other rank adds its 1)
    falls short of the world size, and the run stops with a message instead of writing split checkpoints."""
    monkeypatch.setattr(distributed.dist, "broadcast_object_list", lambda objects, src: None)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: None)
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda tensor: None)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=r"--output_dir .*out: 1 of 2 ranks cannot see files that rank 0 writes"):
        distributed.check_output_dir_shared(str(out), rank=0, world_size=2, device=torch.device("cpu"), wait_s=0.0)
    assert os.listdir(out) == []  # the marker is removed
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OutputError, match=r"--output_dir .*a_file/out: cannot write there"):
        distributed.check_output_dir_shared(str(blocker / "out"), rank=0, world_size=2, device=torch.device("cpu"))
    distributed.check_output_dir_shared(str(tmp_path / "single"), rank=0, world_size=1, device=torch.device("cpu"))
    assert not os.path.exists(tmp_path / "single")  # one process: nothing to check


def test_each_epoch_has_a_new_order_that_the_ranks_split(tokenizer, data_dir):
    args = train.parse_args([f"--train_path={data_dir}/train.json", "--test_path=", "--per_device_train_batch_size=2"])
    train_set, _ = train.build_datasets(args, tokenizer, rank=0)
    orders = {}
    for epoch in (1, 2):
        shares = []
        for rank in (0, 1):
            _, sampler, _ = train.build_dataloaders(args, train_set, None, tokenizer, rank=rank, world_size=2)
            sampler.set_epoch(epoch)
            shares.append(list(sampler))
        assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == list(range(12))
        orders[epoch] = shares
    assert orders[1] != orders[2]  # the chapter never called set_epoch: every epoch had the first one's order
    _, sampler, _ = train.build_dataloaders(args, train_set, None, tokenizer, rank=0, world_size=2)
    sampler.set_epoch(2)
    sampler.skip = 4  # a resume 2 micro-batches into epoch 2 continues with the rest of the same order
    assert list(sampler) == orders[2][0][4:] and len(sampler) == 2


def test_group_by_length_fills_micro_batches_with_similar_lengths():
    lengths = [int(x) for x in torch.randint(500, 1300, (37,), generator=torch.Generator().manual_seed(0))]
    dataset = list(range(37))

    def shares(epoch, grouped, world_size=2, batch_size=2):
        out = []
        for rank in range(world_size):
            sampler = training.ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                                        seed=1234)
            if grouped:
                sampler.lengths, sampler.batch_size = lengths, batch_size
            sampler.set_epoch(epoch)
            out.append(list(sampler))
        return out

    def padded_share(share_lists, batch_size=2):
        batches = [s[k:k + batch_size] for s in share_lists for k in range(0, len(s), batch_size)]
        computed = sum(max(lengths[i] for i in b) * len(b) for b in batches)
        return 1 - sum(lengths[i] for b in batches for i in b) / computed

    for epoch in (1, 2):
        grouped = shares(epoch, True)
        assert [len(s) for s in grouped] == [19, 19]  # equal shares, padded with repeats as the plain sampler does
        assert set(grouped[0]) | set(grouped[1]) == set(dataset)
        assert sorted(grouped[0] + grouped[1]) == sorted(shares(epoch, False)[0] + shares(epoch, False)[1])
        assert padded_share(grouped) < padded_share(shares(epoch, False)) / 3
        assert shares(epoch, True) == grouped  # seeded: every rank and every resume computes the same
    assert shares(1, True) != shares(2, True)
    sampler = training.ResumableDistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=1234)
    sampler.lengths, sampler.batch_size = lengths, 2
    sampler.set_epoch(2)
    sampler.skip = 6
    assert list(sampler) == shares(2, True)[1][6:] and len(sampler) == 13


def test_test_perplexity_is_token_weighted_whatever_the_batch_size(tiny_ckpt, tokenizer, tmp_path, monkeypatch):
    """exp(total NLL / label tokens) over the test set, the same at batch sizes 1, 2 and 4; the chapter's exp(mean of
    per-batch mean losses) changes with the batch size when the answers differ in length."""
    from qwen1_8.modeling_qwen import QWenLMHeadModel
    from utils import DataCollator, QwenPromptDataSet

    path = tmp_path / "test.json"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(6):
            extract = {"药品名称": DRUGS[:i % 3 + 1], "药物类别": [], "医疗检查": [], "医疗操作": [],
                       "现病史": "咳嗽发热" * (1 + 6 * (i % 2)), "辅助检查": "", "诊断结果": "", "医疗建议": "多喝水"}
            f.write(json.dumps({"instruction": "抽取：\n", "input": f"患者：咳嗽{i}天。", "output": format_output(extract)},
                               ensure_ascii=False) + "\n")
    dataset = QwenPromptDataSet(str(path), tokenizer, 256, 64, False)
    model = QWenLMHeadModel.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    monkeypatch.setattr(train.dist, "all_reduce", lambda tensor: None)  # one process: the sum over ranks is itself
    ppl, chapter = {}, {}
    for batch_size in (1, 2, 4):
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=DataCollator(tokenizer))
        ppl[batch_size] = train.evaluate(model, loader, torch.device("cpu"))
        with torch.no_grad():
            means = [model(**batch, use_cache=False).loss.item() for batch in loader]
        chapter[batch_size] = math.exp(sum(means) / len(means))
    assert ppl[2] == pytest.approx(ppl[1], rel=1e-5) and ppl[4] == pytest.approx(ppl[1], rel=1e-5)
    assert chapter[1] != pytest.approx(chapter[4], rel=1e-4)  # ~8e-4 apart here


def test_step_plan_counts_partial_windows():
    plan = training.StepPlan(micro_batches_per_epoch=1209, gas=4, epochs=3, warmup_ratio=0.03)
    assert (plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (303, 909, 27)  # the chapter's log
    assert plan.window_len(0) == 4 and plan.window_len(1207) == 4 and plan.window_len(1208) == 1
    assert sum(1 / plan.window_len(i) for i in range(1209)) == pytest.approx(plan.steps_per_epoch)


def ds_args(**overrides):
    args = train.parse_args([])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def test_ds_config_is_filled_from_the_flags():
    template = training.load_ds_json(os.path.join(ROOT, "ds_zero2_no_offload.json"))
    assert "offload_param" not in template["zero_optimization"]
    assert "offload_optimizer" not in template["zero_optimization"]
    # one gradient bucket holds all 13,418,496 LoRA parameters of the 1.8B run, without DeepSpeed's 5e8 default
    assert 13_418_496 <= template["zero_optimization"]["reduce_bucket_size"] <= 5 * 10**7
    args = ds_args(weight_decay=0.05, adam_beta2=0.999, learning_rate=3e-4)
    plan = training.StepPlan(micro_batches_per_epoch=1209, gas=4, epochs=3, warmup_ratio=0.03)
    cfg = training.build_ds_config(template, train.optimizer_settings_of(args), world_size=2, precision="bf16",
                                   plan=plan)
    assert "auto" not in json.dumps(cfg)
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["train_batch_size"] == 2 * 4 * 2
    assert cfg["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.05,
                                          "torch_adam": True}
    assert cfg["scheduler"]["params"]["total_num_steps"] == 909
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 27
    assert cfg["scheduler"]["params"]["warmup_type"] == "linear"
    assert cfg["bf16"]["enabled"] is True and cfg["gradient_clipping"] == 1.0


def test_ds_config_never_overrides_a_flag_silently():
    template = training.load_ds_json(os.path.join(ROOT, "ds_zero2_no_offload.json"))
    plan = training.StepPlan(micro_batches_per_epoch=10, gas=4, epochs=1, warmup_ratio=0.1)
    template["optimizer"]["params"]["weight_decay"] = 0.1
    with pytest.raises(ConfigError, match="weight_decay is 0.1 but the command line gives 0.0"):
        training.build_ds_config(template, train.optimizer_settings_of(ds_args(weight_decay=0.0)), 1, "fp32", plan)
    template["optimizer"]["params"]["weight_decay"] = "auto"
    template["scheduler"]["params"]["warmup_type"] = "cosine"  # the chapter's invalid value
    with pytest.raises(ConfigError, match="warmup_type"):
        training.build_ds_config(template, train.optimizer_settings_of(ds_args()), 1, "fp32", plan)


@pytest.mark.parametrize("case", ["missing_model_dir", "bad_data_line", "max_src_len", "bad_ds_json", "old_run",
                                  "mistyped_resume"])
def test_bad_input_fails_before_training(case, tiny_ckpt, data_dir, tmp_path):
    argv = flags(tiny_ckpt, data_dir, str(tmp_path / "out"))
    if case == "missing_model_dir":
        argv += [f"--model_name_or_path={tmp_path / 'no_such_model'}"]
        expected = "no_such_model: no such directory"
    elif case == "bad_data_line":
        bad = tmp_path / "train.json"
        shutil.copyfile(os.path.join(data_dir, "train.json"), bad)
        with open(bad, "a", encoding="utf-8") as f:
            f.write('{"instruction": "x", "input": \n')
        argv += [f"--train_path={bad}"]
        expected = f"{bad}:13"  # the appended 13th line
    elif case == "max_src_len":
        argv += ["--max_len=128", "--max_src_len=128"]
        expected = "--max_src_len (128) must be smaller than --max_len (128)"
    elif case == "bad_ds_json":
        bad = tmp_path / "ds.json"
        bad.write_text('{"train_batch_size": "auto",\n "zero_optimization": {"stage": 2,}}\n')
        argv += [f"--ds_file={bad}"]
        expected = f"{bad}:2:"
    elif case == "mistyped_resume":  # the checkpoints that do exist are named
        os.makedirs(tmp_path / "out" / "epoch-1-step-4")
        argv += [f"--resume_from_checkpoint={tmp_path / 'out' / 'epoch-1-step-5'}"]
        expected = f"epoch-1-step-5: no such directory; {tmp_path / 'out'} holds epoch-1-step-4"
    else:  # a finished or interrupted run is never overwritten by accident
        for name in ("epoch-1-step-9", "epoch-2-step-10", "epoch-1-step-2"):
            os.makedirs(tmp_path / "out" / name)
        expected = (f"holds 3 checkpoint(s), the latest epoch-2-step-10; pass --resume_from_checkpoint "
                    f"{tmp_path / 'out' / 'epoch-2-step-10'} to continue")
    with pytest.raises(SystemExit) as excinfo:
        train.main(argv)
    message = str(excinfo.value.code)
    assert message.startswith("train.py: error:") and expected in message
    if case == "old_run":
        assert sorted(os.listdir(tmp_path / "out")) == ["epoch-1-step-2", "epoch-1-step-9", "epoch-2-step-10"]
    elif case == "mistyped_resume":
        assert os.listdir(tmp_path / "out") == ["epoch-1-step-4"]
    else:
        assert not os.path.exists(tmp_path / "out")


def test_a_curve_with_no_points_is_named_not_drawn(tmp_path, capsys):
    training.write_plots({"train": [], "eval": [[2, 9.5], [4, 8.0]]}, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["test_ppl.png"]
    assert "no train_loss.png: nothing to draw (fewer optimizer steps than --show_loss_step)" in capsys.readouterr().out


def test_help_shows_defaults_zero_included(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert "0 = run to the end (default: 0)" in flat  # --stop_after_steps: a 0 default is shown too
    assert "(default: ds_zero2_no_offload.json)" in flat


def test_only_the_known_library_deprecations_are_silenced():
    import warnings

    from utils import silence_library_deprecations

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        silence_library_deprecations()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("`something_else` is deprecated", FutureWarning)
        warnings.warn("`is_gradient_checkpointing` is deprecated", UserWarning)
    assert [(str(w.message), w.category) for w in seen] == [("`something_else` is deprecated", FutureWarning),
                                                            ("`is_gradient_checkpointing` is deprecated", UserWarning)]


def test_only_the_known_library_log_notices_are_silenced(caplog):
    """bitsandbytes' request to `pip install kernels` (a Hub download) goes; its other log lines stay, even if the
    scripts' set-up runs twice."""
    import logging

    from utils import silence_library_deprecations

    silence_library_deprecations()
    silence_library_deprecations()
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels`", "No module named 'kernels'")
        logger.warning("something else went wrong")
        logging.getLogger("bitsandbytes.other").warning("Failed to load CPU gemm_4bit_forward from kernels-community")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("bitsandbytes.backends.cpu.ops", "something else went wrong"),
        ("bitsandbytes.other", "Failed to load CPU gemm_4bit_forward from kernels-community")]
