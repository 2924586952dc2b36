"""README.md (English) and README_zh.md (Chinese) give the same shell commands.

The two guides are written apart, so this test keeps their commands from drifting: every command of one README's
```bash / ```sh blocks must appear in the other's. A command is one logical line of such a block:

- a line ending in a backslash is joined with the next one (bash's line continuation);
- comments are dropped: a `#` that starts a word outside quotes, up to the end of its line (so comment-only lines
  vanish, and a URL's `#fragment` or a quoted `#` stays);
- runs of white space become one space, and blank lines are dropped.

The rule is symmetric on purpose: a command that one README shows and the other does not fails the test, whichever
README it is in.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
READMES = ("README.md", "README_zh.md")
SHELL_LANGUAGES = {"bash", "sh"}
# an opening or closing code fence: up to 3 spaces, then 3 or more backticks or tildes, then the info string
FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def shell_blocks(markdown: str) -> list[list[str]]:
    """The lines of each fenced code block whose language is bash or sh, in order."""
    blocks, current, opening = [], None, None
    for line in markdown.splitlines():
        match = FENCE.match(line)
        if opening is None:
            if match:
                opening = match["fence"]
                language = match["info"].strip().split(" ")[0].lower()
                current = [] if language in SHELL_LANGUAGES else None
            continue
        # a closing fence: the same character, at least as long, nothing after it
        if match and match["fence"][0] == opening[0] and len(match["fence"]) >= len(opening) \
                and not match["info"].strip():
            if current is not None:
                blocks.append(current)
            current, opening = None, None
        elif current is not None:
            current.append(line)
    return blocks


def strip_comment(line: str) -> str:
    """`line` without its shell comment: from a `#` that starts a word, outside quotes, to the end."""
    quote = None  # the quote we are inside, if any
    escaped = False  # the previous character was a backslash outside single quotes
    for i, char in enumerate(line):
        if escaped:
            escaped = False
        elif quote == "'":
            if char == "'":
                quote = None
        elif char == "\\":
            escaped = True
        elif quote == '"':
            if char == '"':
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def commands(markdown: str) -> list[str]:
    """The shell commands of a README's bash/sh blocks, continuation lines joined, comments dropped, spaces
    normalised."""
    found = []
    for block in shell_blocks(markdown):
        pending = ""
        for line in block:
            line = strip_comment(line).rstrip()
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            command = " ".join((pending + line).split())
            pending = ""
            if command:
                found.append(command)
        if pending.strip():  # a block that ends on a continuation line still holds that command
            found.append(" ".join(pending.split()))
    return found


def readme_commands(name: str) -> list[str]:
    return commands((ROOT / name).read_text(encoding="utf-8"))


def test_extraction_rules():
    markdown = "\n".join([
        "Prose with `python inline.py`, which is not a block.",
        "```bash",
        "make venv && source .venv/bin/activate",
        "# a comment line",
        "",
        "python predict.py --model_path m \\",
        "    --input_file data/test.json     --batch_size 8     # batch (resumes)",
        "curl -d '{\"a\": \"#not a comment\"}' http://host/#frag",
        "export KEY=...            # read from the environment",
        "```",
        "```python",
        "print('not a shell command')",
        "```",
        "````markdown",
        "```bash",
        "echo inside a markdown example",
        "```",
        "````",
        "```sh",
        "deepspeed train.py \\",
        "    --is_skip",
        "```",
    ])
    assert commands(markdown) == [
        "make venv && source .venv/bin/activate",
        "python predict.py --model_path m --input_file data/test.json --batch_size 8",
        "curl -d '{\"a\": \"#not a comment\"}' http://host/#frag",
        "export KEY=...",
        "deepspeed train.py --is_skip",
    ]


def test_readmes_hold_commands():
    # guards the comparison below against an extraction that finds nothing in either file
    for name in READMES:
        found = readme_commands(name)
        assert len(found) >= 10, f"{name}: only {len(found)} shell commands found in its bash/sh blocks"
        assert any(c.startswith("deepspeed train.py ") for c in found), f"{name}: no `deepspeed train.py` command"


def test_both_readmes_give_the_same_commands():
    english, chinese = (readme_commands(name) for name in READMES)
    problems = []
    for name, own, other_name, other in ((READMES[0], english, READMES[1], chinese),
                                         (READMES[1], chinese, READMES[0], english)):
        missing = [c for c in dict.fromkeys(own) if c not in set(other)]
        if missing:
            problems.append(f"{other_name} lacks {len(missing)} command(s) of {name}:\n"
                            + "\n".join(f"    {c}" for c in missing))
    if problems:
        pytest.fail("the READMEs' shell commands differ\n" + "\n".join(problems), pytrace=False)


def test_readmes_link_each_other():
    for name, target in ((READMES[0], READMES[1]), (READMES[1], READMES[0])):
        first = next(line for line in (ROOT / name).read_text(encoding="utf-8").splitlines() if line.strip())
        assert f"]({target})" in first, f"{name}: its first line should link to {target}, got {first!r}"
