"""Extraction F1 at every checkpoint (train.py --select_by f1, the default) on the tiny random Qwen, one process and
two DeepSpeed CPU ranks over gloo: each checkpoint carries the test answers predict.py gives on it (fp32, greedy, the
same settings: plain LoRA in fp32, so the checkpoint loaded unmerged is the model that answered) and evaluate.py's
report of them; best_checkpoint.json is the argmax of F1, ties to the earliest, with both metrics of every
evaluation; the F1 scalars and test_f1.png exist; a resumed run keeps the history."""
import json
import os
import sys

import pytest

import evaluate
import predict
from medextract.checkpoints import CHECKPOINT_NAME
from test_train import ROOT, flags, free_port, run, write_samples

EVAL_TOKENS = 64


@pytest.fixture(scope="module")
def f1_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("f1_data")
    write_samples(str(d / "train.json"), 8)
    write_samples(str(d / "test.json"), 3)  # odd: two ranks answer unequal shares
    return str(d)


def f1_flags(tiny_ckpt: str, data: str, out: str, **overrides) -> list[str]:
    values = dict(select_by="f1", quantization="none", precision="fp32", num_train_epochs=1,
                  gradient_accumulation_steps=2, save_model_step=1, eval_max_new_tokens=EVAL_TOKENS,
                  eval_generation_batch_size=2)
    values.update(overrides)
    return flags(tiny_ckpt, data, out, **values)


def checkpoints(out: str) -> list[str]:
    names = [d for d in os.listdir(out) if CHECKPOINT_NAME.match(d)]
    return [os.path.join(out, d) for d in sorted(names, key=lambda d: int(CHECKPOINT_NAME.match(d).group(2)))]


def read(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_run(out: str, data: str, tmp_path) -> list[dict]:
    """Every checkpoint's answers and report against predict.py and evaluate.py on that checkpoint; returns
    best_checkpoint.json's evaluations."""
    test = os.path.join(data, "test.json")
    saved = checkpoints(out)
    assert len(saved) >= 2
    for ckpt in saved:
        carried = os.path.join(ckpt, "eval_predictions.jsonl")
        answers = [json.loads(line) for line in open(carried, encoding="utf-8")]
        assert [a["id"] for a in answers] == [0, 1, 2]
        mine = tmp_path / f"{os.path.basename(ckpt)}.jsonl"
        assert predict.main(["--model_path", ckpt, "--device", "cpu", "--dtype", "float32", "--input_file", test,
                             "--output_file", str(mine), "--max_tgt_len", str(EVAL_TOKENS), "--batch_size", "3"]) == 0
        theirs = sorted((json.loads(line) for line in open(mine, encoding="utf-8")), key=lambda r: r["id"])
        assert answers == theirs, ckpt
        report = tmp_path / f"{os.path.basename(ckpt)}.report.json"
        assert evaluate.main(["--gold", test, "--pred", carried, "--report", str(report), "--json"]) == 0
        assert read(os.path.join(ckpt, "eval_report.json")) == read(str(report))
    best = read(os.path.join(out, "best_checkpoint.json"))
    evaluations = best["evaluations"]
    assert best["select_by"] == "f1" and [e["step"] for e in evaluations] == [
        int(CHECKPOINT_NAME.match(os.path.basename(c)).group(2)) for c in saved]
    f1s = {e["step"]: e["f1"] for e in evaluations}
    for ckpt in saved:  # both metrics of every evaluation: the report's macro F1, and a perplexity
        step = int(CHECKPOINT_NAME.match(os.path.basename(ckpt)).group(2))
        assert f1s[step] == read(os.path.join(ckpt, "eval_report.json"))["overall"]["f1"]
        with open(os.path.join(ckpt, "README.md"), encoding="utf-8") as f:  # its model card says so too
            assert f"- extraction F1 on the test set: macro {f1s[step]:.4f} over the 8 fields" in f.read()
    assert all(e["ppl"] > 1 for e in evaluations)
    top = max(f1s.values())
    first_top = min(step for step, f1 in f1s.items() if f1 == top)  # ties go to the earliest
    assert best["step"] == first_top and best["f1"] == top
    assert os.path.basename(best["path"]).endswith(f"-step-{first_top}")
    assert os.path.isfile(os.path.join(out, "test_f1.png")) and os.path.isfile(os.path.join(out, "test_ppl.png"))
    return evaluations


def scalar_tags(out: str) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(out, "tensorboard"))
    events.Reload()
    return set(events.Tags()["scalars"])


def test_one_process_carries_predict_py_answers_and_picks_the_best_by_f1(tiny_ckpt, f1_data, tmp_path):
    out = str(tmp_path / "out")
    log = run([sys.executable, "train.py", *f1_flags(tiny_ckpt, f1_data, out, num_train_epochs=2,
                                                     stop_after_steps=2)])
    assert "| f1 " in log and "| list_f1 " in log and "药品名称 " in log  # the eval line: macro, list, per field
    check_run(out, f1_data, tmp_path)
    tags = scalar_tags(out)
    assert {"test_f1/macro", "test_f1/list_micro", "test_f1/药品名称", "test_ppl"} <= tags
    # a resumed run keeps the history and goes on
    first = read(os.path.join(out, "best_checkpoint.json"))["evaluations"]
    run([sys.executable, "train.py", *f1_flags(tiny_ckpt, f1_data, out, num_train_epochs=2, stop_after_steps=4,
                                               resume_from_checkpoint=checkpoints(out)[-1])])
    (tmp_path / "resumed").mkdir()
    evaluations = check_run(out, f1_data, tmp_path / "resumed")
    assert evaluations[:len(first)] == first and len(evaluations) > len(first)


def test_two_ranks_answer_their_shares_and_rank_0_gathers(tiny_ckpt, f1_data, tmp_path):
    out = str(tmp_path / "out")
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [launcher] if os.path.exists(launcher) else [sys.executable, "-m", "deepspeed.launcher.runner"]
    run([*cmd, "--num_gpus", "2", "--master_port", str(free_port()), "train.py",
         *f1_flags(tiny_ckpt, f1_data, out, gradient_accumulation_steps=1, stop_after_steps=2)])
    check_run(out, f1_data, tmp_path)


def test_select_by_ppl_generates_nothing(tiny_ckpt, f1_data, tmp_path):
    out = str(tmp_path / "out")
    log = run([sys.executable, "train.py", *f1_flags(tiny_ckpt, f1_data, out, select_by="ppl", stop_after_steps=2)])
    assert "| f1 " not in log
    for ckpt in checkpoints(out):
        assert not os.path.exists(os.path.join(ckpt, "eval_predictions.jsonl"))
    best = read(os.path.join(out, "best_checkpoint.json"))
    assert best["select_by"] == "ppl" and best["ppl"] == min(e["ppl"] for e in best["evaluations"])
    assert all(e["f1"] is None for e in best["evaluations"])
    assert not os.path.exists(os.path.join(out, "test_f1.png"))
    assert ROOT  # the same repository the other training tests run
