"""The service's grammar work on its own (no server): which grammars admit no answer, what a worker answers for a
grammar, the LRU of compiled grammars. tests/test_serve.py runs the workers themselves behind a real server."""
import pytest

from medextract.grammar import build_ebnf, build_vocabulary
from medextract.grammar_pool import (BoundedVocabulary, GrammarCache, GrammarRefused, may_be_grounded_grammar,
                                     unproductive_rule, vet)

SCHEMA_EBNF = build_ebnf("", "schema")  # the chapter's fields' format grammar, the same for every dialogue

DIALOGUE = "患者：孩子发烧两天了，咳嗽。\n医生：可以吃点布洛芬，多喝水。"


def parsed(ebnf: str):
    import xgrammar as xgr

    return xgr.Grammar.from_ebnf(ebnf)


@pytest.mark.parametrize("ebnf, rule, everywhere", [
    ("root ::= root", "root", True),
    ('root ::= "a" b\nb ::= "c" b', "b", True),  # b never ends, so neither does root
    ('root ::= "a" | "b" dead\ndead ::= dead "x"', "dead", False),  # a dead alternative: entered, it never ends
    ('root ::= "a" [^\\x00-\\U0010ffff]', "root", True),  # an empty character class
    ('root ::= "a" | x{2,3}\nx ::= x "y"', "x", False),
])
def test_a_grammar_with_a_dead_part_is_found(ebnf, rule, everywhere):
    assert unproductive_rule(parsed(ebnf)) == (rule, everywhere)


@pytest.mark.parametrize("ebnf", [
    'root ::= "a" root | "b"', 'root ::= ([a-z]* "x"){2,5} ("y" | "") [^a]*', 'root ::= ""', "root ::= [^a]",
    'root ::= "a" x*\nx ::= "y"', 'root ::= "a" x{0,3}\nx ::= "y" x | "z"', SCHEMA_EBNF,
    build_ebnf(DIALOGUE, "grounded"), build_ebnf("", "grounded"),
])
def test_a_grammar_whose_every_part_ends_passes(ebnf):
    assert unproductive_rule(parsed(ebnf)) is None


def test_the_builtin_json_grammar_passes():
    import xgrammar as xgr

    assert unproductive_rule(xgr.Grammar.builtin_json_grammar()) is None


@pytest.fixture(scope="module")
def vocabulary(tokenizer):
    return build_vocabulary(tokenizer)


def test_what_a_worker_answers(vocabulary):
    assert vet(vocabulary, build_ebnf(DIALOGUE, "grounded"), DIALOGUE) == {"constraint": "grounded"}
    assert vet(vocabulary, build_ebnf(DIALOGUE, "grounded"), DIALOGUE[:-1])["ok"] is True  # another dialogue's
    assert vet(vocabulary, 'root ::= "a" [a-z]*')["ok"] is True
    assert vet(vocabulary, "root ::= root")["refused"] == "empty_grammar"
    refused = vet(vocabulary, 'root ::= "a" undefined')
    assert refused["refused"] == "invalid_grammar" and "undefined" in refused["message"]
    assert "[" not in refused["message"].split(":")[0]  # xgrammar's time stamp left out


def test_an_answer_grammar_is_recognised_only_with_the_served_schemas_fields(vocabulary):
    fields = (("症状", "spans"), ("诊断结果", "text"))
    grammar = build_ebnf(DIALOGUE, "grounded", fields)
    assert vet(vocabulary, grammar, DIALOGUE, fields=fields) == {"constraint": "grounded"}
    assert vet(vocabulary, build_ebnf(DIALOGUE, "schema", fields), DIALOGUE, fields=fields) == {"constraint": "schema"}
    assert vet(vocabulary, grammar, DIALOGUE)["ok"] is True  # to a server of the chapter's fields: a client's grammar
    assert vet(vocabulary, build_ebnf(DIALOGUE, "grounded"), DIALOGUE, fields=fields)["ok"] is True
    assert may_be_grounded_grammar(grammar, DIALOGUE, fields) and not may_be_grounded_grammar(grammar, DIALOGUE)


def test_only_a_grammar_as_long_as_its_dialogue_is_taken_for_its_answer_grammar():
    grammar = build_ebnf(DIALOGUE, "grounded")
    assert may_be_grounded_grammar(grammar, DIALOGUE)
    assert not may_be_grounded_grammar(grammar, DIALOGUE * 1000)  # never built for a dialogue this long
    assert not may_be_grounded_grammar('root ::= "a"', DIALOGUE)


def test_the_cache_keeps_the_last_used_within_its_bounds():
    cache = GrammarCache(entries=2, max_bytes=100)
    cache.put("a", "A")
    cache.put("b", "B")
    assert cache.get("a") == "A"  # now the last used
    cache.put("c", "C")
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == ("A", None, "C")
    cache.put("x" * 100, "X")  # the 100 bytes: the others go
    assert len(cache) == 1 and cache.get("x" * 100) == "X"
    cache.put("y" * 101, "Y")  # larger than the whole cache: never kept
    assert cache.get("y" * 101) is None and len(cache) == 1


def test_the_bounded_vocabulary_compiles_once_and_refuses_past_its_bound(vocabulary):
    bounded = BoundedVocabulary.of(vocabulary, GrammarCache(), 4096)
    first = bounded.compile(SCHEMA_EBNF)
    assert bounded.compile(SCHEMA_EBNF) is first
    with pytest.raises(GrammarRefused, match="--max_grammar_bytes") as refused:
        bounded.compile("root ::= " + " | ".join(f'"{i}"' for i in range(2000)))
    assert refused.value.code == "grammar_too_large"
