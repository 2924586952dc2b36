"""Every script's --help, as a reader meets it: the example commands of its docstring keep their line breaks and
continuation backslashes (a ` \\` at a line's end in a non-raw docstring joins the lines), nothing points outside the
repository, and every flag shows its default, or says in words what leaving it out means.

The scripts' parse_args(["--help"]) runs in this process (one import of each, not 13 interpreters); the parser each
builds is caught on its way to argparse, so the flags can be checked one by one."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import subprocess
from pathlib import Path

import pytest

from utils import HelpFormatter

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("data_helper", "train", "merge_params", "predict", "test_qwen", "test_openai", "evaluate", "export_qwen2",
           "serve", "bench.bench_predict", "bench.bench_train", "bench.bench_kernels", "qwen1_8.make_tiny",
           "data.make_dialogues")
EXAMPLE_STARTS = ("python ", "deepspeed ", "DS_ACCELERATOR")
OUTSIDE = ("../", "shared/")


def script_help(module_name: str, monkeypatch) -> tuple[str, argparse.ArgumentParser]:
    """(the --help text, the parser) of a script, at a fixed width of 120 columns."""
    monkeypatch.setenv("COLUMNS", "120")
    module = importlib.import_module(module_name)
    parsers = []
    parse_args = argparse.ArgumentParser.parse_args

    def catch(self, *args, **kwargs):
        parsers.append(self)
        return parse_args(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        module.parse_args(["--help"])
    assert exited.value.code == 0
    return out.getvalue(), parsers[0]


def example_problems(text: str) -> list[str]:
    """What is wrong with the example commands of a help text: lines that start a command (after indentation) must
    hold one command, not several joined by a lost line break, and one ending in a backslash goes on, indented, on
    the next line."""
    problems = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.lstrip().startswith(EXAMPLE_STARTS):
            continue
        command = re.split(r"\s#\s", line.strip(), maxsplit=1)[0].rstrip()  # a trailing `# comment` is prose
        if re.search(r"\S {2,}\S", command):
            problems.append(f"two lines joined into one (a ' \\' that lost its line break?): {line.strip()!r}")
        indent, j = len(line) - len(line.lstrip()), i
        while lines[j].rstrip().endswith("\\"):
            following = lines[j + 1] if j + 1 < len(lines) else ""
            if not following.strip() or len(following) - len(following.lstrip()) <= indent:
                problems.append(f"a continuation backslash with no indented line after it: {lines[j].strip()!r}")
                break
            j += 1
    return problems


def test_example_rules():
    good = "Run it:\n\n    python a.py --x 1 \\\n        --y 2\n    python -m b           # a comment\n"
    assert example_problems(good) == []
    joined = "    deepspeed train.py --train_path data/train.json         --model_name_or_path Qwen\n"
    assert "joined" in example_problems(joined)[0]
    dangling = "    python a.py --x 1 \\\nprose\n"
    assert "no indented line" in example_problems(dangling)[0]


@pytest.mark.parametrize("module_name", SCRIPTS)
def test_help_keeps_examples_and_stays_inside_the_repository(module_name, monkeypatch):
    text, _ = script_help(module_name, monkeypatch)
    examples = [line for line in text.splitlines() if line.lstrip().startswith(EXAMPLE_STARTS)]
    assert examples, f"{module_name} --help shows no example command:\n{text}"
    assert example_problems(text) == [], text
    outside = [line.strip() for line in text.splitlines() if any(s in line for s in OUTSIDE)]
    assert outside == [], f"{module_name} --help names paths outside the repository"


def shows_default(parser: argparse.ArgumentParser, action: argparse.Action) -> bool:
    """Whether the flag's help, as --help prints it, gives its default value, or for a flag with no value by default
    (None, a switch) what leaving it out means."""
    text = parser.formatter_class(prog=parser.prog)._expand_help(action)
    if action.default in (None, False, "") or isinstance(action, argparse._StoreConstAction):
        return action.default is False or any(word in text.lower() for word in ("default", "without", "unless"))
    return str(action.default) in text


# serve.py is being reworked on another branch; what its flags need is reported to the lead (README of the branch)
@pytest.mark.parametrize("module_name", SCRIPTS)
def test_every_flag_shows_its_default(module_name, monkeypatch):
    _, parser = script_help(module_name, monkeypatch)
    assert parser.formatter_class is HelpFormatter, f"{module_name}: use utils.HelpFormatter"
    silent = [action.option_strings[-1] for action in parser._actions
              if action.option_strings and action.help not in (None, argparse.SUPPRESS)
              and not isinstance(action, argparse._HelpAction) and not shows_default(parser, action)]
    assert silent == [], f"{module_name}: these flags' help gives no default, or not what None means"


def test_no_source_file_points_outside_the_repository():
    """What a reader opens: no tracked Python file names the team's notes beside the checkout."""
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    assert files
    found = [f"{name}:{n}" for name in files if name != "tests/test_help.py"
             for n, line in enumerate((ROOT / name).read_text(encoding="utf-8").splitlines(), 1)
             if "../shared" in line or "SPEC.md" in line or re.search(r"\bSPEC\b", line)]
    assert found == []
