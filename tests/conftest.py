"""Shared fixtures: the reference folder and a tiny random Qwen checkpoint (pyproject.toml puts the root on the path)."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(os.path.dirname(ROOT), "shared", "reference")


def pytest_configure(config):
    """Hide the library deprecations the scripts hide too: pytest resets warning filters around each test."""
    from utils import LIBRARY_DEPRECATIONS

    for message in LIBRARY_DEPRECATIONS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:FutureWarning")
    # raised inside torch itself (torch.utils.mkldnn, reached through torch.fx while a model is built): not ours to fix
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(scope="session")
def reference_dir():
    if not os.path.isdir(REFERENCE):
        pytest.skip("the chapter's published files (its training log and test set, in a reference folder beside the "
                    "checkout, not shipped) are absent")
    return REFERENCE


@pytest.fixture(scope="session")
def tokenizer():
    from qwen1_8.tokenization_qwen import QWenTokenizer, packaged_vocab_file

    tok = QWenTokenizer(vocab_file=packaged_vocab_file())
    tok.pad_token_id = tok.eod_id
    return tok


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny random-weight checkpoint in the real directory format (full vocabulary, fp32)."""
    from qwen1_8.make_tiny import make_tiny

    out = tmp_path_factory.mktemp("tiny_qwen")
    make_tiny(str(out), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, seed=0)
    return str(out)
