"""The answer grammar: what an extraction may look like, enforced token by token with xgrammar.

An answer is exactly the text training teaches (`utils.format_output`): the ```json fence, the schema's keys in its
order (the chapter's 8 by default) with `json.dumps`' separators and escapes (ensure_ascii=False), the closing
fence, then `<|im_end|>`. Under `grounded`, every list item is a non-empty span of the dialogue that does not cross a
line, written as json.dumps writes it; the spans come from a suffix automaton of the dialogue, one grammar rule per state. Under `schema`, a list
item is any non-empty JSON string. Text fields are any JSON string in both. `fields` everywhere here are (name,
kind) pairs, a schema's (medextract.schema) or the chapter's (utils.CHAPTER_FIELDS).

The vocabulary goes to xgrammar as raw bytes per id from the tokenizer's ranks; the 208 special tokens and the unused
embedding rows are empty, so none can appear inside an answer, and `<|im_end|>` is its only end.

A token budget is ours to keep (a bounded repetition is very slow in xgrammar): `closing_text` says how a cut answer
is closed (open string, list and object; the remaining fields empty; the fence), so an answer that runs out of tokens
is still valid and grounded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from functools import lru_cache

from utils import CHAPTER_FIELDS, Fields

CONSTRAINTS = ("grounded", "schema", "none")

OPEN_FENCE = "```json\n"
CLOSE_FENCE = "\n```"


def _literal(text: str) -> str:
    """`text` as an EBNF string literal (the GBNF dialect xgrammar reads)."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _json_char(ch: str) -> str:
    """One character as json.dumps(..., ensure_ascii=False) writes it inside a string."""
    return json.dumps(ch, ensure_ascii=False)[1:-1]


def _skeleton_piece(fields: Fields, index: int) -> str:
    """The fixed text before field `index`: the fence and the brace, or the separator, then the key and ': '."""
    key = json.dumps(fields[index][0], ensure_ascii=False)
    return (OPEN_FENCE + "{" if index == 0 else ", ") + key + ": "


# A JSON string's characters exactly as json.dumps writes them: anything but '"', '\' and control characters as
# itself; those as \" \\ \n \r \t \b \f, and the other control characters as \u00XX (lower-case hex). A list
# item under `schema` starts and ends with a character that is not white space (str.isspace), as a
# grounded span does: evaluation strips items, so " " would be an empty item. Written as runs of a character class
# (not a repetition of alternatives), which xgrammar masks in microseconds, not 50 ms. A text field's rule loops by
# calling itself after an escape, so the run of ordinary characters is one place of the grammar, not two: xgrammar
# precomputes a mask over all ~150,000 tokens for each place, so this spares one (11 of 37 ms per grounded compile).
_STRING_RULES = r'''
text ::= "\"" rest
rest ::= [^"\\\x00-\x1f]* ("\"" | "\\" escape rest)
escape ::= ["\\nrtbf] | "u00" ("0" [0-7bef] | "1" [0-9a-f])
'''
_SCHEMA_ITEM_RULES = r'''
item ::= "\"" edge (body edge)? "\""
body ::= [^"\\\x00-\x1f]* ("\\" escape [^"\\\x00-\x1f]*)*
edge ::= [^"\\\x00-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000] | "\\" ["\\b] | "\\u00" ("0" [0-7ef] | "1" [0-9ab])
'''


def build_ebnf(dialogue: str, constraint: str = "grounded", fields: Fields = CHAPTER_FIELDS) -> str:
    """The grammar of an answer to `dialogue` with `fields`, as EBNF text for xgrammar."""
    if constraint not in ("grounded", "schema"):
        raise ValueError(f"constraint must be 'grounded' or 'schema' for a grammar, got {constraint!r}")
    parts = []
    for index, (_, kind) in enumerate(fields):
        parts.append(_literal(_skeleton_piece(fields, index)))
        parts.append("text" if kind == "text" else "list")
    parts.append(_literal("}" + CLOSE_FENCE))
    has_text = any(kind == "text" for _, kind in fields)
    strings = _STRING_RULES if has_text or constraint == "schema" else ""  # (the item rules' escape is in there)
    rules = ["root ::= " + " ".join(parts)]
    if all(kind == "text" for _, kind in fields):  # no span field: no list rules
        return "\n".join(rules) + strings
    rules.append('list ::= "[]" | "[" item (", " item)* "]"')
    if constraint == "schema":  # only the rules the grammar uses: each one costs compile time
        return "\n".join(rules) + _SCHEMA_ITEM_RULES + _STRING_RULES
    spans = _span_rules(dialogue)
    if spans:
        rules.append('item ::= "\\"" span "\\""')
        rules += spans
    else:  # nothing to copy: every list is empty
        rules[1] = 'list ::= "[]"'
    return "\n".join(rules) + strings


# --------------------------------------------------------------------------------------------------------------
# Spans of the dialogue: a suffix automaton, newline transitions dropped
# --------------------------------------------------------------------------------------------------------------


def suffix_automaton(text: str) -> list[dict[str, int]]:
    """Transitions of the suffix automaton of `text` (state 0 is the start): a path from the start spells every
    substring of `text` and nothing else."""
    return _suffix_automaton(text)[0]


def _suffix_automaton(text: str) -> tuple[list[dict[str, int]], list[int]]:
    """(transitions, the length of each state's longest string); a transition always leads to a longer one."""
    nxt: list[dict[str, int]] = [{}]
    link, length = [-1], [0]
    last = 0
    for ch in text:
        cur = len(nxt)
        nxt.append({})
        link.append(-1)
        length.append(length[last] + 1)
        p = last
        while p != -1 and ch not in nxt[p]:
            nxt[p][ch] = cur
            p = link[p]
        if p == -1:
            link[cur] = 0
        else:
            q = nxt[p][ch]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:
                clone = len(nxt)
                nxt.append(dict(nxt[q]))
                link.append(link[q])
                length.append(length[p] + 1)
                while p != -1 and nxt[p].get(ch) == q:
                    nxt[p][ch] = clone
                    p = link[p]
                link[q] = link[cur] = clone
        last = cur
    return nxt, length


def _span_rules(dialogue: str) -> list[str]:
    """`span ::= ...`: a substring of one line of the dialogue that neither starts nor ends with white space (an
    item of spaces alone would be an empty item once stripped, as evaluation strips items), JSON-escaped, one rule per
    automaton state that can still reach the end of such a span.

    Every string a suffix-automaton state stands for ends with the same character, so "may the span end here" is a
    property of the state: it may where that character is not white space."""
    nxt, length = _suffix_automaton(dialogue)

    def moves_of(state: int) -> list[tuple[str, int]]:
        return [(ch, target) for ch, target in sorted(nxt[state].items())
                if ch != "\n" and not (state == 0 and ch.isspace())]

    last = {0: ""}  # each state's last character
    order = [0]
    for state in order:  # breadth first over the states reachable without "\n"; `order` grows as it goes
        for ch, target in moves_of(state):
            if target not in last:
                last[target] = ch
                order.append(target)
    # the states from which a span can still end (a line ending in a space leaves dead ones); transitions only lead
    # to longer strings, so the longest first sees every successor before its predecessors
    alive: set[int] = set()
    for state in sorted(order, key=lambda s: -length[s]):
        ends = state != 0 and not last[state].isspace()
        if ends or any(target in alive for _, target in moves_of(state)):
            alive.add(state)
    names = {0: "span"}
    for state in order:
        if state in alive and state not in names:
            names[state] = f"s{len(names)}"
    rules = []
    for state in order:
        if state not in alive:
            continue
        moves = [f"{_literal(_json_char(ch))} {names[target]}" for ch, target in moves_of(state) if target in alive]
        if state != 0 and not last[state].isspace():
            moves.insert(0, '""')
        rules.append(f"{names[state]} ::= " + " | ".join(moves))
    return rules if 0 in alive else []  # a dialogue without a non-space character has no span


# --------------------------------------------------------------------------------------------------------------
# Closing a cut answer
# --------------------------------------------------------------------------------------------------------------


def empty_answer(fields: Fields = CHAPTER_FIELDS) -> str:
    """The shortest valid answer: every field empty."""
    return closing_text("", fields)


def closing_text(prefix: str, fields: Fields = CHAPTER_FIELDS) -> str | None:
    """The shortest text that closes an answer cut after `prefix` (the open string, list and object, the remaining
    fields left empty, the fence), or None where no text can: inside an escape sequence, in a list item that has no
    character yet or ends in white space, after a separator that still needs its item, or where `prefix` leaves the
    format. The text before `<|im_end|>` only; the grammar accepts `prefix + closing_text(prefix)`."""
    scanner = AnswerScanner(answer_layout(fields))
    scanner.feed(prefix)
    return scanner.closing()


_TAIL = "}" + CLOSE_FENCE
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f"}


@dataclass(frozen=True)
class AnswerLayout:
    """The fixed text of an answer with `fields`: what comes before each field (`pieces`), each field's empty value
    (`empties`) and, from each field on, the rest of the answer with those fields empty (`rests`; the last is the
    closing brace and fence alone)."""
    fields: tuple[tuple[str, str], ...]
    pieces: tuple[str, ...]
    empties: tuple[str, ...]
    rests: tuple[str, ...]


@lru_cache(maxsize=32)
def _layout(fields: tuple[tuple[str, str], ...]) -> AnswerLayout:
    pieces = tuple(_skeleton_piece(fields, i) for i in range(len(fields)))
    empties = tuple('""' if kind == "text" else "[]" for _, kind in fields)
    rests = tuple("".join(pieces[j] + empties[j] for j in range(i, len(fields))) + _TAIL
                  for i in range(len(fields) + 1))
    return AnswerLayout(fields, pieces, empties, rests)


def answer_layout(fields: Fields = CHAPTER_FIELDS) -> AnswerLayout:
    return _layout(tuple((name, kind) for name, kind in fields))


@dataclass
class AnswerScanner:
    """Follows an answer in the trained format as it grows, one character at a time, and says at each point how it
    closes (`closing`): the generation engine feeds it each new token's characters, so knowing where an answer may
    be closed costs a few operations a token, not a parse of the whole answer.

    `mode` is where the answer stands: "piece" (in the fixed text before field `field`, at `pos`), "open" (a list's
    "[" written), "item" (in a list item; `last` its last character), "after" (after an item), "comma" (", " half
    written), "sep" (", " written), "text" (in a text field), "tail" (in the closing brace and fence, at `pos`),
    "done", or "broken" (left the format: never under the grammar). `escape` is an escape sequence not yet
    complete."""
    layout: AnswerLayout = dataclass_field(default_factory=answer_layout)
    mode: str = "piece"
    field: int = 0
    pos: int = 0
    last: str = ""
    escape: str = ""

    def feed(self, text: str) -> None:
        for ch in text:
            self._step(ch)

    def _step(self, ch: str) -> None:
        mode = self.mode
        if mode == "piece":
            piece = self.layout.pieces[self.field]
            if ch != piece[self.pos]:
                self.mode = "broken"
            elif self.pos + 1 < len(piece):
                self.pos += 1
            else:
                self.mode, self.pos = "value", 0
        elif mode == "value":  # the value's first character
            if self.layout.fields[self.field][1] == "text":
                self.mode, self.escape = ("text", "") if ch == '"' else ("broken", "")
            else:
                self.mode = "open" if ch == "[" else "broken"
        elif mode == "open":
            if ch == "]":
                self._next_field()
            else:
                self.mode, self.last, self.escape = ("item", "", "") if ch == '"' else ("broken", "", "")
        elif mode in ("item", "text"):
            if self.escape:
                self.escape += ch
                if self.escape[1] != "u" and len(self.escape) == 2:
                    self.last, self.escape = _ESCAPES.get(ch, ""), ""
                    if not self.last:
                        self.mode = "broken"
                elif len(self.escape) == 6:
                    try:
                        self.last = chr(int(self.escape[2:], 16))
                    except ValueError:
                        self.mode = "broken"
                    self.escape = ""
            elif ch == "\\":
                self.escape = ch
            elif ch == '"':
                if mode == "text":
                    self._next_field()
                else:
                    self.mode = "after"
            else:
                self.last = ch
        elif mode == "after":
            if ch == "]":
                self._next_field()
            else:
                self.mode = "comma" if ch == "," else "broken"
        elif mode == "comma":
            self.mode = "sep" if ch == " " else "broken"
        elif mode == "sep":
            self.mode, self.last, self.escape = ("item", "", "") if ch == '"' else ("broken", "", "")
        elif mode == "tail":
            if ch != _TAIL[self.pos]:
                self.mode = "broken"
            elif self.pos + 1 < len(_TAIL):
                self.pos += 1
            else:
                self.mode = "done"
        else:  # done or broken: nothing may follow
            self.mode = "broken"

    def _next_field(self) -> None:
        self.field += 1
        self.mode, self.pos = ("piece", 0) if self.field < len(self.layout.fields) else ("tail", 0)

    def closing(self) -> str | None:
        """The text that closes the answer here, or None where none can."""
        layout = self.layout
        mode, rest = self.mode, layout.rests[min(self.field + 1, len(layout.fields))]
        if mode == "piece":
            return layout.pieces[self.field][self.pos:] + layout.empties[self.field] + rest
        if mode == "value":
            return layout.empties[self.field] + rest
        if mode in ("open", "after"):
            return "]" + rest
        if mode == "item":  # never empty, never ending in white space (evaluation strips items)
            return None if self.escape or not self.last or self.last.isspace() else '"]' + rest
        if mode == "text":
            return None if self.escape else '"' + rest
        if mode == "tail":
            return _TAIL[self.pos:]
        if mode == "done":
            return ""
        return None  # comma, sep: a separator that still needs its item; broken


# --------------------------------------------------------------------------------------------------------------
# xgrammar: the vocabulary, compiled grammars, one matcher per answer
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Vocabulary:
    """What xgrammar needs of the tokenizer, built once per process (about a second)."""
    info: object  # xgrammar.TokenizerInfo
    compiler: object  # xgrammar.GrammarCompiler
    vocab_size: int

    def compile(self, ebnf: str):
        """`ebnf` compiled (an xgrammar.CompiledGrammar, which any number of matchers share); the service's
        vocabulary bounds and caches this."""
        import xgrammar as xgr

        return self.compiler.compile_grammar(xgr.Grammar.from_ebnf(ebnf))


def build_vocabulary(tokenizer, vocab_size: int = 151936, threads: int = 1):
    """Raw bytes per id: the tokenizer's ranks, and empty bytes for the special tokens and the unused rows up to
    `vocab_size` (the model's logits width), so that none of them can be chosen inside an answer."""
    import xgrammar as xgr

    encoded: list[bytes] = [b""] * vocab_size
    for token, rank in tokenizer.mergeable_ranks.items():
        if rank < vocab_size:
            encoded[rank] = token
    info = xgr.TokenizerInfo(encoded, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=[tokenizer.im_end_id])
    return Vocabulary(info, xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False), vocab_size)


class AnswerGrammar:
    """The grammar of one answer, compiled, with the matcher that follows the tokens generated under it."""

    def __init__(self, vocabulary: Vocabulary, ebnf: str):
        import xgrammar as xgr

        self.ebnf = ebnf
        self.compiled = vocabulary.compile(ebnf)
        self.matcher = xgr.GrammarMatcher(self.compiled)

    @classmethod
    def for_dialogue(cls, vocabulary: Vocabulary, dialogue: str, constraint: str = "grounded",
                     fields: Fields = CHAPTER_FIELDS) -> "AnswerGrammar":
        return cls(vocabulary, build_ebnf(dialogue, constraint, fields))

    def fill(self, bitmask, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        return self.matcher.accept_token(token)

    def rollback(self, count: int) -> None:
        if count:
            self.matcher.rollback(count)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


def check_ebnf(vocabulary: Vocabulary, ebnf: str) -> AnswerGrammar:
    """A grammar sent by a client, compiled; ValueError with xgrammar's reason when it is not a grammar."""
    try:
        return AnswerGrammar(vocabulary, ebnf)
    except RuntimeError as e:
        raise ValueError(f"not a valid EBNF grammar: {str(e).strip().splitlines()[0] if str(e).strip() else e}") \
            from None
