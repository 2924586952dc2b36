"""merge_params.py on the tiny random Qwen: the merged checkpoint (sharded safetensors) loads with our classes and
gives the same logits as base + adapter, and a non-empty output directory is never overwritten by accident."""
import json
import os

import pytest
import torch

import merge_params
from medextract.model_files import has_random_weights
from medextract.qlora import lora_target_names


@pytest.fixture(scope="module")
def adapter_dir(tiny_ckpt, tmp_path_factory):
    """A train.py-style checkpoint with a random, non-zero adapter (B = 0 at init would make merging trivial)."""
    from peft import LoraConfig, get_peft_model

    from qwen1_8.modeling_qwen import QWenLMHeadModel
    from qwen1_8.tokenization_qwen import QWenTokenizer

    out = str(tmp_path_factory.mktemp("adapter"))
    base = QWenLMHeadModel.from_pretrained(tiny_ckpt, dtype=torch.float32)
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=32, target_modules=lora_target_names(base), lora_dropout=0.0,
                        init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(out, safe_serialization=True)
    QWenTokenizer.from_pretrained(tiny_ckpt).save_pretrained(out)
    return out


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_merged_model_matches_base_plus_adapter(tiny_ckpt, adapter_dir, tmp_path):
    from peft import PeftModel

    from qwen1_8.modeling_qwen import QWenLMHeadModel
    from qwen1_8.tokenization_qwen import QWenTokenizer

    merged_dir = str(tmp_path / "merged")
    merge_params.main(["--ori_model_dir", tiny_ckpt, "--model_dir", adapter_dir, "--save_model_dir", merged_dir,
                       "--device", "cpu", "--max_shard_size", "30MB"])
    files = set(os.listdir(merged_dir))
    assert {"config.json", "generation_config.json", "qwen.tiktoken", "tokenizer_config.json",
            "model.safetensors.index.json"} <= files
    assert sum(f.endswith(".safetensors") for f in files) >= 2  # sharded at 30MB
    assert not any(f.startswith("adapter_") for f in files)
    assert "README.md" not in files  # not PEFT's empty model card: the merge is no adapter
    with open(os.path.join(merged_dir, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["random_weights"] is True  # make_tiny's mark, kept through the merge
    assert has_random_weights(merged_dir)
    assert has_random_weights(adapter_dir)  # a checkpoint: the base its adapter_config.json names
    assert not has_random_weights(str(tmp_path))  # no model there: not said to be random
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    with open(os.path.join(merged_dir, "merge_info.json"), encoding="utf-8") as f:
        assert json.load(f)["dtype"] == "float32"  # the base's config dtype

    tokenizer = QWenTokenizer.from_pretrained(merged_dir)
    text = "患者：头痛两天。医生：建议查血常规。"
    ids = torch.tensor([tokenizer.encode(text, allowed_special=set())])
    merged = QWenLMHeadModel.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = QWenLMHeadModel.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    base_logits = logits(base, ids)
    with_adapter = PeftModel.from_pretrained(base, adapter_dir).eval()
    expected = logits(with_adapter, ids)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter really changes the model
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-5, rtol=0)
    # predict.py also takes the unmerged checkpoint: transformers puts the adapter on the base it names
    from medextract import inference

    inference.check_model_path(adapter_dir)
    unmerged, _ = inference.load_model(adapter_dir, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(logits(unmerged, ids), expected, atol=1e-5, rtol=0)


def test_merge_refuses_to_overwrite(tiny_ckpt, adapter_dir, tmp_path, monkeypatch):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    argv = ["--ori_model_dir", tiny_ckpt, "--model_dir", adapter_dir, "--save_model_dir", str(target),
            "--device", "cpu"]
    with pytest.raises(SystemExit, match="is not empty; pass --overwrite"):
        merge_params.main(argv)
    with pytest.raises(SystemExit, match="holds no model .no config.json.: --overwrite replaces an earlier merge"):
        merge_params.main(argv + ["--overwrite"])  # not a model: the user's files are never deleted
    assert os.listdir(target) == ["keep.txt"]
    (target / "keep.txt").unlink()
    merge_params.main(argv)
    first = (target / "merge_info.json").stat().st_mtime_ns
    merge_params.main(argv + ["--overwrite"])  # an earlier merge is replaced as a whole
    second = (target / "merge_info.json").stat().st_mtime_ns
    assert second > first
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]  # nothing left aside
    # interrupted between moving the old merge aside and moving the new one in: the old one is put back
    real_replace = os.replace

    def interrupted(src, dst):
        if os.path.basename(src).startswith(".tmp-merged-") and not src.endswith("-old"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(merge_params.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge_params.main(argv + ["--overwrite"])
    assert (target / "merge_info.json").stat().st_mtime_ns == second and "config.json" in os.listdir(target)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]


def test_merge_never_replaces_a_directory_that_holds_its_inputs(tiny_ckpt, adapter_dir, tmp_path):
    """A run directory given as --model_dir stands for its best checkpoint; saving into the run directory itself (or
    any directory above an input) with --overwrite would delete the checkpoints, the one merged included."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(adapter_dir, run / "epoch-1-step-10")
    (run / "best_checkpoint.json").write_text(json.dumps({"path": str(run / "epoch-1-step-10"), "step": 10,
                                                          "ppl": 2.0}))
    (run / "config.json").write_text("{}")  # as if a model had been saved there once: --overwrite alone would pass
    before = sorted(os.listdir(run))
    for save in (run, tmp_path):
        with pytest.raises(SystemExit, match="is or holds --model_dir('s checkpoint)? .* which replacing it would "
                                             "delete"):
            merge_params.main(["--ori_model_dir", tiny_ckpt, "--model_dir", str(run), "--save_model_dir", str(save),
                               "--overwrite", "--device", "cpu"])
    assert sorted(os.listdir(run)) == before


def test_merge_rejects_a_directory_without_an_adapter(tiny_ckpt, adapter_dir, tmp_path):
    with pytest.raises(SystemExit, match="no adapter_config.json"):
        merge_params.main(["--ori_model_dir", tiny_ckpt, "--model_dir", tiny_ckpt,
                           "--save_model_dir", str(tmp_path / "m")])
    with pytest.raises(SystemExit, match="--model_dir .*output_dir_nope: no such directory"):
        merge_params.main(["--ori_model_dir", tiny_ckpt, "--model_dir", str(tmp_path / "output_dir_nope")])
    with pytest.raises(SystemExit, match="Qwen-1_8-chat: no such directory .*README §1"):
        merge_params.main(["--ori_model_dir", str(tmp_path / "Qwen-1_8-chat"), "--model_dir", adapter_dir,
                           "--save_model_dir", str(tmp_path / "m")])
    assert not os.path.exists(tmp_path / "m")


def test_run_dir_means_its_best_checkpoint_and_lengths_travel_to_predict(tiny_ckpt, adapter_dir, tmp_path,
                                                                          monkeypatch):
    """--model_dir <output_dir> merges the checkpoint best_checkpoint.json names (also after the run was moved); the
    run's train_args.json goes into the merged model, and predict.py truncates prompts with its lengths."""
    import shutil

    import predict

    run = tmp_path / "run"
    shutil.copytree(adapter_dir, run / "epoch-1-step-2")
    (run / "epoch-1-step-2" / "train_args.json").write_text(
        json.dumps({"args": {"max_len": 512, "max_src_len": 300}, "world_size": 1}), encoding="utf-8")
    # the path as train.py wrote it, relative to where it ran; here, from the current directory, it names another
    # run's checkpoint (a decoy), which must not be taken
    decoy = tmp_path / "cwd" / "output_dir_qlora" / "epoch-1-step-2"
    decoy.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    (run / "best_checkpoint.json").write_text(
        json.dumps({"path": "./output_dir_qlora/epoch-1-step-2", "step": 2, "ppl": 9.0}))
    merged_dir = tmp_path / "merged"
    merge_params.main(["--ori_model_dir", tiny_ckpt, "--model_dir", str(run), "--save_model_dir", str(merged_dir),
                       "--device", "cpu", "--dtype", "bf16"])
    with open(merged_dir / "merge_info.json", encoding="utf-8") as f:
        info = json.load(f)
    assert info["model_dir"] == str(run / "epoch-1-step-2") and info["dtype"] == "bfloat16"
    with open(merged_dir / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert (config["bf16"], config["fp16"], config["fp32"]) == (True, False, False)  # they describe the weights

    args = predict.parse_args(["--model_path", str(merged_dir)])
    assert (args.max_len, args.max_src_len) == (512, 300)
    args = predict.parse_args(["--model_path", str(merged_dir), "--max_len", "1024"])
    assert (args.max_len, args.max_src_len) == (1024, 300)  # a flag given wins
    args = predict.parse_args(["--model_path", tiny_ckpt])  # no train_args.json: the chapter's lengths
    assert (args.max_len, args.max_src_len) == (2048, 1560)
    (merged_dir / "train_args.json").write_text('{"args": {"max_len": 2048}}')  # unreadable lengths: both flags do
    with pytest.raises(SystemExit, match=r"cannot read how training cut prompts \(.max_src_len.\); pass --max_len, "
                                         r"--max_src_len, --truncation"):
        predict.parse_args(["--model_path", str(merged_dir)])
    args = predict.parse_args(["--model_path", str(merged_dir), "--max_len", "1024", "--max_src_len", "500"])
    assert (args.max_len, args.max_src_len, args.truncation) == (1024, 500, "tokens")  # the older runs' cut


def test_merge_loads_safetensors_adapters_only(tiny_ckpt, adapter_dir, tmp_path):
    import shutil

    pickled = tmp_path / "pickled"
    shutil.copytree(adapter_dir, pickled)
    os.rename(pickled / "adapter_model.safetensors", pickled / "adapter_model.bin")
    with pytest.raises(SystemExit, match="no adapter_model.safetensors .*never from pickled .bin files"):
        merge_params.main(["--ori_model_dir", tiny_ckpt, "--model_dir", str(pickled),
                           "--save_model_dir", str(tmp_path / "m")])


def test_base_and_output_default_to_the_run(tiny_ckpt, adapter_dir, tmp_path, monkeypatch):
    """Without --ori_model_dir the base is adapter_config.json's base_model_name_or_path (train.py's
    --model_name_or_path), and without --save_model_dir the output is merged/ in the run directory; a recorded base
    that is gone is an error that says to pass --ori_model_dir, and a bad shard size fails before any loading."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(adapter_dir, run / "epoch-1-step-2")
    # no --save_model_dir either: merged/ in the run directory, where predict.py looks by default
    merge_params.main(["--model_dir", str(run / "epoch-1-step-2"), "--device", "cpu"])
    with open(run / "merged" / "merge_info.json", encoding="utf-8") as f:
        assert json.load(f)["ori_model_dir"] == tiny_ckpt
    (run / "best_checkpoint.json").write_text(json.dumps({"path": "epoch-1-step-2"}))
    with pytest.raises(SystemExit, match=f"--save_model_dir {run}/merged is not empty"):
        merge_params.main(["--model_dir", str(run), "--device", "cpu"])
    monkeypatch.chdir(run / "epoch-1-step-2")  # `--model_dir .` from inside the checkpoint: still the run's merged/
    merge_params.validate(merge_params.parse_args(["--model_dir", ".", "--save_model_dir", str(tmp_path / "x")]))
    args = merge_params.parse_args(["--model_dir", "."])
    with pytest.raises(SystemExit, match=f"--save_model_dir {run}/merged is not empty"):
        merge_params.validate(args)
    with pytest.raises(SystemExit, match="--max_shard_size 'lots': expected a number and a unit"):
        merge_params.main(["--model_dir", str(run), "--device", "cpu", "--max_shard_size", "lots"])

    moved = tmp_path / "adapter"
    shutil.copytree(adapter_dir, moved)
    config = json.loads((moved / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(SystemExit, match=r"gone \(named by its adapter_config.json\): no such directory .*; pass "
                                         r"--ori_model_dir"):
        merge_params.main(["--model_dir", str(moved), "--save_model_dir", str(tmp_path / "m2"), "--device", "cpu"])


@pytest.mark.parametrize("wrong", ["none", "one layer missed", "one layer twice"])
def test_a_wrong_merge_fails_even_where_the_bf16_logit_probe_would_pass(tiny_ckpt, adapter_dir, tmp_path,
                                                                        monkeypatch, wrong):
    """A small update (as a short fine-tune gives) moves the logits by less than bf16's logit tolerance, so only the
    element-wise weight check can tell a merge that did nothing, skipped a layer or applied its update twice from a
    right one."""
    import shutil

    from peft import PeftModel
    from peft.tuners.lora.layer import Linear
    from safetensors.torch import load_file, save_file

    from qwen1_8.modeling_qwen import QWenLMHeadModel
    from qwen1_8.tokenization_qwen import QWenTokenizer

    small = tmp_path / "small"
    shutil.copytree(adapter_dir, small)
    weights = load_file(small / "adapter_model.safetensors")
    save_file({k: v * 0.003 if "lora_B" in k else v for k, v in weights.items()}, small / "adapter_model.safetensors")
    # the probe alone would let even a merge that did nothing through: the adapter moves the logits by less than
    # bf16 allows
    base = QWenLMHeadModel.from_pretrained(tiny_ckpt, dtype=torch.bfloat16).eval()
    probe = merge_params.probe_input(QWenTokenizer.from_pretrained(tiny_ckpt), torch.device("cpu"))
    without = logits(base, probe).float()
    with_adapter = logits(PeftModel.from_pretrained(base, str(small)).eval(), probe).float()
    allowed = merge_params.RELATIVE_TOLERANCE[torch.bfloat16] * max(1.0, with_adapter.abs().max().item())
    assert 0 < (with_adapter - without).abs().max().item() < allowed

    argv = ["--ori_model_dir", tiny_ckpt, "--model_dir", str(small), "--device", "cpu", "--dtype", "bf16"]
    merge_params.main(argv + ["--save_model_dir", str(tmp_path / "right")])
    with open(tmp_path / "right" / "merge_info.json", encoding="utf-8") as f:
        assert 0 < json.load(f)["update_rounded_away"] < 1  # bf16 rounds part of a small update away: reported

    original = Linear.merge
    calls = []

    def wrong_merge(self, *args, **kwargs):
        calls.append(self)
        if wrong == "none" or (wrong == "one layer missed" and len(calls) == 3):
            return
        original(self, *args, **kwargs)
        if wrong == "one layer twice" and len(calls) == 3:
            self.merged_adapters.clear()
            original(self, *args, **kwargs)

    monkeypatch.setattr(Linear, "merge", wrong_merge)
    with pytest.raises(SystemExit, match=r"h\.\d\.\w+\.\w+: the merged weight differs from W \+ \(alpha / r\) \* B @ A "
                                         r"by up to [\d.]+x what rounding to bfloat16 allows; nothing written"):
        merge_params.main(argv + ["--save_model_dir", str(tmp_path / "wrong")])
    assert not os.path.exists(tmp_path / "wrong")


def modes(root: str) -> dict:
    """{path under root: permission bits} of root and everything in it."""
    found = {".": os.stat(root).st_mode & 0o777}
    for directory, folders, files in os.walk(root):
        for name in folders + files:
            path = os.path.join(directory, name)
            found[os.path.relpath(path, root)] = os.stat(path).st_mode & 0o777
    return found


def test_a_merged_model_gets_the_permissions_of_the_users_other_files(tiny_ckpt, adapter_dir, tmp_path):
    """Not the 0700 folder of mkdtemp nor the 0600 files safetensors writes: what the umask gives (here 027)."""
    old = os.umask(0o027)
    try:
        merge_params.main(["--ori_model_dir", tiny_ckpt, "--model_dir", adapter_dir, "--save_model_dir",
                           str(tmp_path / "merged"), "--device", "cpu"])
    finally:
        os.umask(old)
    found = modes(str(tmp_path / "merged"))
    assert "model.safetensors" in found and found["."] == 0o750
    assert {mode for name, mode in found.items() if name != "."} == {0o640}


def test_a_run_whose_best_checkpoint_was_deleted_is_named(tiny_ckpt, adapter_dir, tmp_path):
    run = tmp_path / "output_dir_qlora"
    (run / "epoch-1-step-2").mkdir(parents=True)
    (run / "best_checkpoint.json").write_text(json.dumps({"path": "output_dir_qlora/epoch-2-step-8", "step": 8}))
    with pytest.raises(SystemExit, match=r"--model_dir .*output_dir_qlora: its best checkpoint epoch-2-step-8 "
                                         r"\(named by best_checkpoint.json\) no longer exists.*pass one of its "
                                         r"checkpoints as --model_dir \(epoch-1-step-2\)"):
        merge_params.main(["--ori_model_dir", tiny_ckpt, "--model_dir", str(run)])
    assert sorted(os.listdir(run)) == ["best_checkpoint.json", "epoch-1-step-2"]
