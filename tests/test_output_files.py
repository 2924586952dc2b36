"""Output files have one writer and whole records: a second run on the same results file is refused with one line
(predict.py, test_openai.py), two predict.py runs started together leave each id once, a record is on disk whole or
not at all, a torn tail from an older crash is set aside with a note, and a full disk is one line naming the file,
with nothing half-written, after which a run with room completes the file."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import utils
from utils import EXTRACT_KEYS, INSTRUCTION, LIST_KEYS, append_jsonl, format_output, load_done

ROOT = Path(__file__).resolve().parent.parent
DIALOGUES = ["患者：我咳嗽三天了。\n医生：吃点止咳药。\n", "医生：哪里不舒服？\n患者：头疼。\n",
             "患者：孩子发烧。\n医生：查个血常规。\n"]


def write_inputs(path: Path) -> None:
    path.write_text("".join(json.dumps({"instruction": INSTRUCTION, "input": d}, ensure_ascii=False) + "\n"
                            for d in DIALOGUES), encoding="utf-8")


def ids_in(path: Path) -> list[int]:
    if not path.exists():  # a run that wrote nothing leaves no file
        return []
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]


def predict_argv(model: str, inputs: Path, out: Path) -> list[str]:
    return ["--model_path", model, "--device", "cpu", "--dtype", "float32", "--input_file", str(inputs),
            "--output_file", str(out), "--max_tgt_len", "8", "--constraint", "none", "--batch_size", "2"]


def run_script(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


class LockHolder:
    """Another process holding a results file as a run does, until stopped."""

    def __init__(self, path: Path):
        code = ("import sys, time, utils\nwith utils.exclusive_output(sys.argv[1]):\n"
                "    print('held', flush=True)\n    time.sleep(120)\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert self.proc.stdout.readline().strip() == "held"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGKILL)  # a killed writer's lock goes with it
        self.proc.wait(timeout=30)


def test_a_second_predict_run_on_the_same_file_is_refused(tiny_ckpt, tmp_path):
    import predict

    inputs, out = tmp_path / "test.json", tmp_path / "pred.jsonl"
    write_inputs(inputs)
    holder = LockHolder(out)
    try:
        with pytest.raises(SystemExit) as refused:
            predict.main(predict_argv(tiny_ckpt, inputs, out))
        assert str(refused.value.code) == (f"predict.py: error: {out}: another run is writing to it now; wait for it "
                                           f"to end, or give another output file")
        assert out.read_text() == ""  # nothing written beside the other run
    finally:
        holder.stop()
    assert predict.main(predict_argv(tiny_ckpt, inputs, out)) == 0  # the lock went with the killed process
    assert sorted(ids_in(out)) == [0, 1, 2]


def test_two_predict_runs_started_together_leave_each_id_once(tiny_ckpt, tmp_path):
    inputs, out = tmp_path / "test.json", tmp_path / "pred.jsonl"
    write_inputs(inputs)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "predict.py", *predict_argv(tiny_ckpt, inputs, out)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert sorted(ids_in(out)) == [0, 1, 2]  # each answer once, whichever way the two runs met
    for code, stdout, stderr in results:
        if code != 0:  # the one refused says so in one line
            assert code == 1 and stderr.strip().splitlines()[-1].endswith(
                "another run is writing to it now; wait for it to end, or give another output file"), stderr
            assert "Traceback" not in stderr


def test_a_second_test_openai_run_on_the_same_file_is_refused(tmp_path, monkeypatch):
    import test_openai

    inputs, out = tmp_path / "test.json", tmp_path / "answers.jsonl"
    write_inputs(inputs)
    monkeypatch.setenv("OPENAI_API_KEY", "none")
    holder = LockHolder(out)
    try:  # refused before any request: nothing listens at that address
        with pytest.raises(SystemExit, match=r"test_openai.py: error: .*answers.jsonl: another run is writing"):
            test_openai.main(["--base_url", "http://127.0.0.1:9/v1", "--input_file", str(inputs), "--output_file",
                              str(out), "--max_retries", "0"])
    finally:
        holder.stop()
    assert out.read_text() == ""


def test_a_failed_append_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "pred.jsonl"
    append_jsonl(str(path), [{"id": 0, "output": "甲"}])
    before = path.read_bytes()
    real_write = os.write

    def half_then_full(fd, data):  # the disk fills in the middle of a record
        real_write(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(utils.os, "write", half_then_full)
    with pytest.raises(OSError) as failed:
        append_jsonl(str(path), [{"id": 1, "output": "乙" * 100}])
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(path)
    assert path.read_bytes() == before


def test_a_torn_tail_is_set_aside_with_a_note(tmp_path, capsys):
    path = tmp_path / "pred.jsonl"
    path.write_bytes('{"id": 0, "output": "a"}\n{"id": 1, "out'.encode())
    assert set(load_done(str(path))) == {0}
    assert path.read_bytes() == b'{"id": 0, "output": "a"}\n'
    assert (tmp_path / "pred.jsonl.torn").read_bytes() == b'{"id": 1, "out\n'
    assert "its last line was cut off by an earlier run" in capsys.readouterr().err


# ---- a full disk: a small tmpfs, where this process may mount one (root, as CI runs) ----------------------------


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root); the injected ENOSPC test covers the rest")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path, leave: int) -> None:
    """Fill the filesystem of `directory` to about `leave` free bytes."""
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    if free > leave:
        with open(directory / "filler", "wb") as f:
            try:
                f.write(b"\0" * (free - leave))
            except OSError:
                pass


def test_a_full_disk_is_one_line_and_a_rerun_with_room_completes(tiny_ckpt, tmp_path, small_disk):
    inputs, out = tmp_path / "test.json", small_disk / "pred.jsonl"
    write_inputs(inputs)
    # full from the start: the settings file cannot be written
    fill(small_disk, 0)
    result = run_script("predict.py", *predict_argv(tiny_ckpt, inputs, out))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("predict.py: error: ")
    assert "No space left on device" in result.stderr and "pred.jsonl" in result.stderr
    assert not [p for p in small_disk.iterdir() if p.name != "filler"]  # nothing half-written left
    # room for the settings file (tmpfs gives whole 4 KiB pages) but not the results: the run stops at its first
    # record, which is not left half-written
    (small_disk / "filler").unlink()
    fill(small_disk, 4096)
    result = run_script("predict.py", *predict_argv(tiny_ckpt, inputs, out))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "cannot append to it (No space left on device)" in result.stderr
    text = out.read_text(encoding="utf-8") if out.exists() else ""
    assert text == "" or text.endswith("\n")
    written = ids_in(out)
    assert len(written) < 3
    # still full: the rerun says so again, in one line
    result = run_script("predict.py", *predict_argv(tiny_ckpt, inputs, out))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    # room again: the rerun completes the file, each id once
    (small_disk / "filler").unlink()
    result = run_script("predict.py", *predict_argv(tiny_ckpt, inputs, out))
    assert result.returncode == 0, result.stderr
    assert sorted(ids_in(out)) == [0, 1, 2] and ids_in(out)[:len(written)] == written


def test_evaluate_on_a_full_disk_is_one_line(tmp_path, small_disk):
    gold, pred = tmp_path / "test.json", tmp_path / "pred.jsonl"
    empty = format_output({key: [] if key in LIST_KEYS else "" for key in EXTRACT_KEYS})
    gold.write_text(json.dumps({"input": DIALOGUES[0], "output": empty}, ensure_ascii=False) + "\n", encoding="utf-8")
    pred.write_text(json.dumps({"id": 0, "output": "{}"}) + "\n", encoding="utf-8")
    fill(small_disk, 0)
    for flag, name in (("--report", "report.json"), ("--html", "report.html")):
        started = time.time()
        result = run_script("evaluate.py", "--gold", str(gold), "--pred", str(pred), flag, str(small_disk / name))
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip() == (f"evaluate.py: error: {flag} {small_disk / name}: cannot write it (No "
                                         f"space left on device)")
        assert time.time() - started < 120
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_train_on_a_full_disk_is_one_line(tiny_ckpt, tmp_path, small_disk):
    """train.py writing its run into a full filesystem: one line naming the file, no traceback, nothing half-made."""
    data = tmp_path / "train.json"
    data.write_text("".join(json.dumps({"instruction": INSTRUCTION, "input": d, "output": format_output(
        {key: [] if key in LIST_KEYS else "" for key in EXTRACT_KEYS})}, ensure_ascii=False) + "\n"
        for d in DIALOGUES), encoding="utf-8")
    fill(small_disk, 0)
    out = small_disk / "run"
    result = run_script("train.py", "--train_path", str(data), "--test_path", "", "--model_name_or_path", tiny_ckpt,
                        "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1",
                        "--num_train_epochs", "1", "--max_len", "512", "--max_src_len", "400",
                        "--output_dir", str(out), "--ds_file", str(ROOT / "ds_zero2_no_offload.json"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: ") and "No space left on device" in last, last
    assert not [p for p in out.rglob(".tmp-*")] if out.exists() else True
