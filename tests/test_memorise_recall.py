"""Memorise then recall, end to end, through the real scripts: train.py (4-bit NF4 QLoRA) learns three short samples by
heart (its F1, scored at every checkpoint, climbs to 1), merge_params.py folds the adapter into the full-precision
base, predict.py extracts them greedily in one batch under the answer grammar, and evaluate.py must report F1 = 1 and
exact match = 1; the answers equal the unconstrained ones token for token. Any disagreement between the training
labels, the merge, the prompt, stopping at <|im_end|>, the grammar or the parser breaks it. The answers are the same
in fp32 and in bf16."""
import json
import os
import subprocess
import sys

import evaluate
import merge_params
import predict
from qwen1_8.make_tiny import make_tiny
from utils import INSTRUCTION, cpu_computes_bf16, format_output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [
    ("医生: 哪里不舒服？\n患者: 头疼两天，吃了布洛芬\n",
     {"药品名称": ["布洛芬"], "药物类别": [], "医疗检查": [], "医疗操作": [], "现病史": "头疼两天",
      "辅助检查": "", "诊断结果": "头痛", "医疗建议": "休息"}),
    ("医生: 孩子怎么了？\n患者: 发烧，查了血常规\n",
     {"药品名称": [], "药物类别": [], "医疗检查": ["血常规"], "医疗操作": [], "现病史": "发热",
      "辅助检查": "血常规正常", "诊断结果": "上感", "医疗建议": "多喝水"}),
    ("医生: 咳嗽多久了？\n患者: 一周，吃过止咳药，做过雾化\n",
     {"药品名称": [], "药物类别": ["止咳药"], "医疗检查": [], "医疗操作": ["雾化"], "现病史": "咳嗽一周",
      "辅助检查": "", "诊断结果": "支气管炎", "医疗建议": "继续雾化"}),
]


def run(*args):
    """A script as its own process (train.py: its process group and DeepSpeed stay out of the test's)."""
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def script(main, capsys, *args: str) -> str:
    """A script's main() in this process, which has imported what a new process would spend seconds on; its
    standard output."""
    capsys.readouterr()
    assert not main(list(args))
    return capsys.readouterr().out


def test_memorise_then_recall(tmp_path, capsys):
    rows = [{"instruction": INSTRUCTION, "input": d, "output": format_output(e)} for d, e in CASES]
    gold, train = tmp_path / "gold.json", tmp_path / "train.json"
    gold.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    train.write_text(gold.read_text(encoding="utf-8") * 20, encoding="utf-8")  # 20 epochs' worth per pass
    # Qwen's 0.02 init gives a width-64 model logits too flat to memorise anything; 0.2 lets a LoRA steer them.
    base = make_tiny(str(tmp_path / "tiny"), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=256, seed=0, initializer_range=0.2)
    out = tmp_path / "run"
    run("train.py", "--train_path", str(train), "--test_path", str(gold), "--model_name_or_path", base,
        "--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "1", "--num_train_epochs", "6",
        "--learning_rate", "1e-2", "--warmup_ratio", "0.05", "--lora_dim", "32", "--lora_alpha", "64",
        "--lora_dropout", "0.0", "--max_len", "512", "--max_src_len", "400", "--show_loss_step", "40",
        "--save_model_step", "0", "--eval_max_new_tokens", "200", "--output_dir", str(out))
    # F1 at every checkpoint (each epoch end): it climbs to 1, and the best is the first checkpoint that reaches it
    with open(out / "best_checkpoint.json", encoding="utf-8") as f:
        best = json.load(f)
    f1s = [e["f1"] for e in best["evaluations"]]
    assert len(f1s) == 6 and f1s[-1] == 1.0 and f1s[0] < 1.0, f1s
    first = next(e for e in best["evaluations"] if e["f1"] == 1.0)
    assert best["select_by"] == "f1" and best["step"] == first["step"] and best["f1"] == 1.0
    merged = tmp_path / "merged"
    script(merge_params.main, capsys, "--ori_model_dir", base, "--model_dir", str(out / "epoch-6-step-120"),
           "--save_model_dir", str(merged), "--device", "cpu")
    pred, free = tmp_path / "pred.jsonl", tmp_path / "free.jsonl"
    common = ["--model_path", str(merged), "--input_file", str(gold), "--batch_size", "3", "--max_tgt_len", "200",
              "--max_len", "512", "--max_src_len", "400"]
    script(predict.main, capsys, *common, "--output_file", str(pred))  # --constraint grounded, the default
    script(predict.main, capsys, *common, "--output_file", str(free), "--constraint", "none")
    records = [json.loads(line) for line in pred.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["id"] for r in records) == [0, 1, 2]
    assert all(r["num_new_tokens"] < 200 and not r["truncated"] for r in records)  # stopped at <|im_end|>
    # the constraint never changes an answer that already follows the format: the free answers, token for token
    unconstrained = {r["id"]: r for r in map(json.loads, free.read_text(encoding="utf-8").splitlines())}
    for r in records:
        assert (r["output"], r["num_new_tokens"]) == (unconstrained[r["id"]]["output"],
                                                      unconstrained[r["id"]]["num_new_tokens"])
    # bf16 (what --dtype auto takes on a CPU that computes it natively, forced where it does not, so it runs on any
    # CPU) gives the fp32 answers token for token where the model is sure of them, grammar and all: the dtype auto
    # did not take, against auto's answers above
    other = tmp_path / "pred_other_dtype.jsonl"
    script(predict.main, capsys, *common, "--output_file", str(other), "--dtype",
           "float32" if cpu_computes_bf16() else "bfloat16")
    answers = {r["id"]: r for r in map(json.loads, other.read_text(encoding="utf-8").splitlines())}
    for r in records:
        assert (answers[r["id"]]["output"], answers[r["id"]]["num_new_tokens"]) == (r["output"], r["num_new_tokens"])
    report = json.loads(script(evaluate.main, capsys, "--gold", str(gold), "--pred", str(pred), "--json"))
    assert report["overall"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert report["exact_match"] == 1.0 and report["json_valid_rate"] == 1.0 and report["grounded_rate"] == 1.0
