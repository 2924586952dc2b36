"""Offsets always point into the dialogue as sent, in any Unicode normal form, cut or not: the tokenizer NFC-normalises
what the model reads, so a cut dialogue's grammar is built from the part of the dialogue as sent that the prompt
holds, not from the decoded prompt. Checked through the Python API and predict.py on the tiny random Qwen (its
answers are noise, but every list item is a span the grammar allowed)."""
import json
import unicodedata

import pytest

import predict
from medextract import Extractor
from medextract.answer import kept_part
from utils import INSTRUCTION, LIST_KEYS

BASE = ("患者：医生您好，我在café喝了咖啡后头疼，体温三十八度，吃了布洛芬。\n医生：Ångström先生，先查个血常规，"
        "naïve的想法不要有，再做个 Crème 检查。\n患者：好的，谢谢 é è ê ë。\n")
# mostly letters with accents, so that the few dozen tokens a cut leaves are full of them
ACCENTS = "患者：ééé ççç ñññ üüü èèè àà，Ångström，crème brûlée。\n医生：naïve café résumé déjà vu。\n"
FORMS = {
    "nfc": unicodedata.normalize("NFC", BASE * 3),
    "nfd": unicodedata.normalize("NFD", ACCENTS * 4 + BASE * 2),
    "mixed": unicodedata.normalize("NFD", BASE) + unicodedata.normalize("NFC", BASE) + unicodedata.normalize(
        "NFD", BASE),
}


def test_kept_part_is_a_prefix_of_the_dialogue_as_sent():
    nfd = FORMS["nfd"]
    visible = unicodedata.normalize("NFC", nfd)[:57]
    kept = kept_part(nfd, visible)
    assert nfd.startswith(kept) and unicodedata.normalize("NFC", kept) == visible
    assert kept_part(FORMS["nfc"], FORMS["nfc"][:40]) == FORMS["nfc"][:40]
    # a cut inside a character's marks: what is kept is still a prefix of the dialogue as sent, and held by the prompt
    for dialogue, visible in (("ab" + "e\u0301x", "abe"), ("xe\u0301e\u0301y", "xée")):
        kept = kept_part(dialogue, visible)
        assert dialogue.startswith(kept) and visible.startswith(unicodedata.normalize("NFC", kept)) and kept
    # Hangul jamo compose across pieces: the kept part ends early rather than admit what is not there
    jamo = "\u1100\u1161\u11a8한"
    assert unicodedata.normalize("NFC", jamo).startswith(unicodedata.normalize("NFC", kept_part(jamo, "각한")))


def grammar_takes(vocabulary, grammar, ids) -> bool:
    """Whether the grammar takes these token ids, each inside the mask filled before it, and then ends."""
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(1, vocabulary.vocab_size)
    for token in ids:
        grammar.fill(bitmask, 0)
        if not (int(bitmask[0, token >> 5]) >> (token & 31)) & 1 or not grammar.accept(token):
            return False
    return grammar.is_terminated()


@pytest.mark.parametrize("cut", [True, False])
def test_the_grammar_admits_the_spans_of_the_dialogue_as_sent(tokenizer, cut):
    """A decomposed dialogue: its span "ééé" as sent (e + U+0301) is admitted, the precomposed one the decoded
    prompt would hold is not. The answer's ids come from the BPE itself, which does not normalise, as a model's
    tokens would."""
    from medextract.answer import extraction_request
    from medextract.decoding import Decoding
    from medextract.grammar import build_vocabulary
    from utils import EXTRACT_KEYS, format_output

    vocabulary = build_vocabulary(tokenizer)
    dialogue = unicodedata.normalize("NFD", ACCENTS * 4)
    request, was_cut = extraction_request(tokenizer, INSTRUCTION + dialogue, dialogue, Decoding(), "grounded",
                                          vocabulary, 2048, 230 if cut else 1560, "tokens", len(INSTRUCTION))
    assert was_cut == cut
    for form, admitted in (("NFD", True), ("NFC", False)):
        span = unicodedata.normalize(form, "ééé")
        fields = {key: [span] if key == "药品名称" else [] if key in LIST_KEYS else "" for key in EXTRACT_KEYS}
        ids = tokenizer.tokenizer.encode(format_output(fields), allowed_special=set()) + [tokenizer.im_end_id]
        assert grammar_takes(vocabulary, request.grammar(), ids) == admitted, form


@pytest.fixture(scope="module")
def extractor(tiny_ckpt):
    # 230 tokens of user block: the 174-token instruction and the dialogue's first ~55 tokens
    return Extractor.load(tiny_ckpt, device="cpu", dtype="float32", max_src_len=230)


def check_offsets(results) -> int:
    spans = 0
    for r in results:
        for key in LIST_KEYS:
            for span in r.fields[key]:
                assert span.start is not None, (key, span)
                assert r.dialogue[span.start:span.end] == span.text
                spans += 1
    return spans


@pytest.mark.parametrize("form", ["nfd", "mixed"])  # (NFC text is every other test's)
def test_every_offset_points_into_the_dialogue_as_sent(form, extractor):
    dialogues = [FORMS[form][k:] for k in range(0, 24, 8)]
    cut = extractor.extract(dialogues, max_new_tokens=96)
    assert all(r.prompt_cut for r in cut)
    whole = Extractor(extractor.engine, "grounded", extractor.truncation.__class__(2048, 1560, "tokens"))
    uncut = whole.extract(dialogues, max_new_tokens=96)
    assert not any(r.prompt_cut for r in uncut)
    assert check_offsets(cut) + check_offsets(uncut) > 0


def test_predict_py_answers_hold_spans_of_the_dialogue_as_sent(tiny_ckpt, tmp_path):
    inputs, out = tmp_path / "test.json", tmp_path / "pred.jsonl"
    dialogues = [FORMS["nfd"][k:] for k in range(0, 40, 8)]
    inputs.write_text("".join(json.dumps({"input": d}, ensure_ascii=False) + "\n" for d in dialogues),
                      encoding="utf-8")
    assert predict.main(["--model_path", tiny_ckpt, "--device", "cpu", "--dtype", "float32", "--input_file",
                         str(inputs), "--output_file", str(out), "--max_tgt_len", "160", "--max_src_len", "230"]) == 0
    from utils import parse_output

    items = 0
    for line in out.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        fields, valid = parse_output(record["output"])
        assert valid
        for key in LIST_KEYS:
            for item in fields[key]:
                assert item in dialogues[record["id"]], item  # verbatim in the dialogue as given, NFD and all
                items += 1
    assert items > 0
