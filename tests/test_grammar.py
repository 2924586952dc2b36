"""The answer grammar (grammar.py): every gold answer is accepted token by token as the tokenizer encodes it, what
breaks the format or grounding is rejected, no special token can appear inside an answer, and a cut answer is closed
into a valid, grounded one."""
import json
import os
import random
from concurrent.futures import ProcessPoolExecutor

import pytest

from medextract import grammar
from utils import EXTRACT_KEYS, LIST_KEYS, TEXT_KEYS, format_output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DIALOGUE = ("医生: 你好，孩子哪里不舒服？\n患者: 咳嗽三天了，吃了\"小儿咳喘灵\"和布洛芬混悬液\\滴剂。\n"
            "医生: 查过血常规吗？\n患者: 查了，还做了雾化\t两次。\n")
ANSWER = {"药品名称": ["小儿咳喘灵", "布洛芬混悬液\\滴剂"], "药物类别": [], "医疗检查": ["血常规"],
          "医疗操作": ["雾化\t两次"], "现病史": "患儿咳嗽三天，\n服用\"小儿咳喘灵\"。", "辅助检查": "",
          "诊断结果": "上呼吸道感染", "医疗建议": "多喝水\u0001"}


@pytest.fixture(scope="module")
def vocabulary(tokenizer):
    return grammar.build_vocabulary(tokenizer)


def accepts(vocabulary, tokenizer, dialogue, text, constraint="grounded", end=True, masks=True) -> bool:
    """Whether the dialogue's grammar takes `text`, tokenized as the tokenizer encodes it, token by token (each
    token also inside the mask filled before it, unless `masks` is False), and then ends at <|im_end|>."""
    import xgrammar as xgr

    g = grammar.AnswerGrammar.for_dialogue(vocabulary, dialogue, constraint)
    bitmask = xgr.allocate_token_bitmask(1, vocabulary.vocab_size)
    ids = tokenizer.encode(text, allowed_special=set()) + ([tokenizer.im_end_id] if end else [])
    for token in ids:
        if masks:
            g.fill(bitmask, 0)
            if not (int(bitmask[0, token >> 5]) >> (token & 31)) & 1:
                return False
        if not g.accept(token):
            return False
    return g.is_terminated() if end else True


def test_the_trained_serialisation_is_accepted_with_its_escapes(vocabulary, tokenizer):
    for item in ANSWER["药品名称"] + ANSWER["医疗检查"] + ANSWER["医疗操作"]:
        assert item in DIALOGUE
    text = format_output(ANSWER)
    assert '\\"' in text and "\\\\" in text and "\\t" in text and "\\u0001" in text and "\\n" in text
    assert accepts(vocabulary, tokenizer, DIALOGUE, text)
    assert accepts(vocabulary, tokenizer, DIALOGUE, text, "schema")
    assert accepts(vocabulary, tokenizer, DIALOGUE, grammar.empty_answer())
    assert not accepts(vocabulary, tokenizer, DIALOGUE, text[:-3])  # no closing fence: <|im_end|> is not allowed


@pytest.mark.parametrize("case", ["made_up_span", "empty_item", "space_item", "space_around", "space_before",
                                  "across_lines",
                                  "other_spacing", "key_order",
                                  "raw_quote", "ascii_escape", "unicode_escape_of_text", "no_fence", "trailing_text"])
def test_what_breaks_the_format_or_grounding_is_rejected(case, vocabulary, tokenizer):
    answer = json.loads(json.dumps(ANSWER))
    text = None
    if case == "made_up_span":
        answer["药品名称"] = ["阿莫西林"]
    elif case == "empty_item":
        answer["药物类别"] = [""]
    elif case == "space_item":  # a span of the dialogue, but empty once stripped, as evaluation strips items
        answer["药物类别"] = [" "]
    elif case == "space_around":
        answer["医疗检查"] = ["查了，还做了雾化\t"] if "\t" in DIALOGUE else []  # ends in white space
    elif case == "space_before":
        answer["医疗操作"] = [" 你好"]  # a span of the dialogue ("医生: 你好"), starting with white space
    elif case == "across_lines":
        answer["医疗检查"] = ["布洛芬混悬液\\滴剂。\n医生: 查过血常规"]
    elif case == "other_spacing":
        text = format_output(answer).replace('", "', '","', 1)
    elif case == "key_order":
        text = "```json\n" + json.dumps({k: answer[k] for k in reversed(EXTRACT_KEYS)}, ensure_ascii=False) + "\n```"
    elif case == "raw_quote":
        text = format_output(answer).replace('\\"小儿', '"小儿', 1)
    elif case == "ascii_escape":
        text = "```json\n" + json.dumps(answer, ensure_ascii=True) + "\n```"
    elif case == "unicode_escape_of_text":
        text = format_output(answer).replace("\\n", "\\u000a", 1)
    elif case == "no_fence":
        text = json.dumps(answer, ensure_ascii=False)
    else:
        text = format_output(answer) + "\n"
    text = text if text is not None else format_output(answer)
    assert not accepts(vocabulary, tokenizer, DIALOGUE, text)
    if case in ("made_up_span", "across_lines"):  # well-formed: schema takes it, only grounding fails
        assert accepts(vocabulary, tokenizer, DIALOGUE, text, "schema")
    if case in ("empty_item", "space_item", "space_around", "space_before"):  # no item is empty once stripped, under schema either
        assert not accepts(vocabulary, tokenizer, DIALOGUE, text, "schema")


def test_no_special_token_or_unused_row_inside_an_answer(vocabulary, tokenizer):
    """The 208 special tokens and the rows up to 151,935 are never allowed; <|im_end|> only at the very end."""
    import xgrammar as xgr

    g = grammar.AnswerGrammar.for_dialogue(vocabulary, DIALOGUE)
    bitmask = xgr.allocate_token_bitmask(1, vocabulary.vocab_size)
    text = format_output(ANSWER)
    ids = tokenizer.encode(text, allowed_special=set())
    checked = 0
    for k, token in enumerate(ids):
        g.fill(bitmask, 0)
        allowed = [t for t in range(tokenizer.eod_id, vocabulary.vocab_size)
                   if (int(bitmask[0, t >> 5]) >> (t & 31)) & 1]
        assert allowed == [], f"special ids {allowed[:5]} allowed after {k} tokens"
        checked += 1
        assert g.accept(token)
    g.fill(bitmask, 0)
    allowed = [t for t in range(vocabulary.vocab_size) if (int(bitmask[0, t >> 5]) >> (t & 31)) & 1]
    assert allowed == [tokenizer.im_end_id] and checked == len(ids)


def _restricted_vocabulary(tokenizer, keep: set[int]):
    """The vocabulary with the same ids and bytes, but only the tokens in `keep` (the others empty, so never
    allowed). Whether a token is accepted depends on its own bytes alone, so the answers' tokens are accepted exactly
    as with the full vocabulary; compiling skips the other 150,000 tokens' masks."""
    import xgrammar as xgr

    encoded = [b""] * 151936
    for token, rank in tokenizer.mergeable_ranks.items():
        if rank in keep:
            encoded[rank] = token
    info = xgr.TokenizerInfo(encoded, xgr.VocabType.RAW, vocab_size=151936, stop_token_ids=[tokenizer.im_end_id])
    return grammar.Vocabulary(info, xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False), 151936)


def _gold_rejections(job):
    """Worker: the indices of (index, dialogue, answer) records whose grammar rejects the answer's tokens, with the
    full vocabulary or one restricted to the answers' tokens."""
    records, restricted = job
    from qwen1_8.tokenization_qwen import QWenTokenizer, packaged_vocab_file

    tokenizer = QWenTokenizer(vocab_file=packaged_vocab_file())
    if restricted:
        used = {t for _, _, answer in records for t in tokenizer.encode(answer, allowed_special=set())}
        vocabulary = _restricted_vocabulary(tokenizer, used)
    else:
        vocabulary = grammar.build_vocabulary(tokenizer)
    # with the restricted vocabulary, acceptance alone: the masks are checked on the full vocabulary's sample
    return [index for index, dialogue, answer in records
            if not accepts(vocabulary, tokenizer, dialogue, answer, masks=not restricted)]


def _check_gold(records, restricted=False):
    """All records through two worker processes (compiling a grammar takes ~60 ms)."""
    jobs = [(records[i::2], restricted) for i in range(2)]
    with ProcessPoolExecutor(2) as pool:
        rejected = sorted(i for part in pool.map(_gold_rejections, jobs) for i in part)
    assert rejected == [], f"{len(rejected)} gold answers rejected, e.g. record {rejected[0]}"


def _all_json_records():
    with open(os.path.join(ROOT, "data", "all.json"), encoding="utf-8") as f:
        raw = json.load(f)
    records = []
    for index, r in enumerate(raw):
        extract = r["extract_text"] if isinstance(r["extract_text"], dict) else json.loads(r["extract_text"])
        records.append((index, r["dialogue_text"], format_output(extract)))
    return records


def test_every_gold_answer_of_all_json_is_accepted():
    """All 2,500, token by token as the tokenizer encodes them (the answers' own tokens: the full vocabulary's other
    masks cost compile time and cannot change whether these tokens are accepted; each token's acceptance, without
    filling masks), and a seeded sample of 200 with the full vocabulary, each token also inside its mask."""
    records = _all_json_records()
    assert len(records) == 2500
    _check_gold(records, restricted=True)
    _check_gold(random.Random(0).sample(records, 200))


def test_every_answer_of_the_chapters_test_file_is_accepted(reference_dir):
    with open(os.path.join(reference_dir, "book_test.json"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert len(rows) == 50
    _check_gold([(i, r["input"], r["output"]) for i, r in enumerate(rows)])


def _check_closed(prefix: str, dialogue: str, vocabulary, tokenizer) -> bool:
    """`prefix` closed by closing_text: parses to the 8 keys in order, typed, items non-empty spans of the dialogue,
    the kept part of each value a prefix of its value, and the grammar takes it. False if it cannot be closed."""
    closing = grammar.closing_text(prefix)
    if closing is None:
        return False
    text = prefix + closing
    assert text.startswith(grammar.OPEN_FENCE) and text.endswith(grammar.CLOSE_FENCE)
    fields = json.loads(text[len(grammar.OPEN_FENCE):-len(grammar.CLOSE_FENCE)])
    assert list(fields) == list(EXTRACT_KEYS)
    for key in LIST_KEYS:
        assert all(isinstance(item, str) and item and item in dialogue for item in fields[key]), (key, text)
    assert all(isinstance(fields[key], str) for key in TEXT_KEYS)
    assert accepts(vocabulary, tokenizer, dialogue, text), text
    return True


def test_a_cut_answer_is_closed_valid_and_grounded(vocabulary, tokenizer):
    """Every prefix of a gold answer: closed into a valid, grounded answer the grammar takes, or None only inside an
    escape, an item with no character yet, or a separator that still needs its item; a few characters on, the
    answer can always be closed again."""
    text = format_output(ANSWER)
    closable = [_check_closed(text[:k], DIALOGUE, vocabulary, tokenizer) for k in range(len(text) + 1)]
    for k, ok in enumerate(closable):
        if not ok:
            before = text[:k]
            in_item = before.rfind('"') > before.rfind("[") and before.count('"', before.rfind("[")) % 2 == 1
            assert (before.endswith(("\\", '["', ', "', ", ", '",')) or "\\u" in before[-5:]
                    or (in_item and (before.endswith(" ") or before.endswith("\\t")))), repr(before[-12:])
        assert any(closable[k:k + 6]) or k > len(text) - 6
    assert grammar.closing_text(text) == ""
    assert grammar.closing_text(text[:-3] + "xx") is None  # not the format: nothing closes it
    assert grammar.closing_text("") == grammar.empty_answer()
    assert len(tokenizer.encode(grammar.empty_answer())) + 1 == 46  # predict.py's floor for --max_tgt_len


def test_closing_random_cuts_of_gold_answers(vocabulary, tokenizer):
    with open(os.path.join(ROOT, "data", "all.json"), encoding="utf-8") as f:
        raw = json.load(f)
    rng = random.Random(0)
    closed = 0
    for r in rng.sample(raw, 20):
        extract = r["extract_text"] if isinstance(r["extract_text"], dict) else json.loads(r["extract_text"])
        text = format_output(extract)
        for k in rng.sample(range(len(text)), 5):
            closed += _check_closed(text[:k], r["dialogue_text"], vocabulary, tokenizer)
    assert closed >= 80


def test_suffix_automaton_spells_exactly_the_substrings():
    text = "abcbcab\nbca"
    nxt = grammar.suffix_automaton(text)

    def spelled(s):
        state = 0
        for ch in s:
            if ch not in nxt[state]:
                return False
            state = nxt[state][ch]
        return True

    alphabet = "abc\n"
    strings = [""] + [a + b + c for a in alphabet for b in alphabet for c in alphabet] + ["bcab", "abcbcab\nb"]
    for s in strings:
        assert spelled(s) == (s in text), s
    assert len(nxt) <= 2 * len(text)


def test_an_invalid_client_grammar_is_a_value_error(vocabulary):
    with pytest.raises(ValueError, match="not a valid EBNF grammar"):
        grammar.check_ebnf(vocabulary, 'root ::= "a" | ')
    assert grammar.check_ebnf(vocabulary, 'root ::= "a"').matcher is not None
