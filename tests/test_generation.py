"""The generation engine (medextract/engine.py) on a tiny random checkpoint: it gives transformers' own greedy tokens
(fp32, repetition penalty on), batched, refilled or alone; its cache holds what a plain forward computes; under the
answer grammar every answer is valid, grounded and ended (by itself, or closed at the budget and flagged), the same
batched as alone; sampling is seeded per answer; streamed text joins into the answer; a cancelled answer stops."""
import json

import pytest
import torch

from medextract import grammar
from medextract import inference
from medextract.answer import extraction_request
from medextract.decoding import reference_config
from medextract.engine import Decoding, Engine, Request
from medextract.runner import common_prefix_len
from qwen1_8.modeling_qwen import RowPrefillView
from utils import EXTRACT_KEYS, INSTRUCTION, LIST_KEYS, TEXT_KEYS, format_output

DIALOGUES = [
    "医生: 你好，孩子哪里不舒服？\n患者: 咳嗽三天了，晚上咳得厉害，有痰。\n医生: 发烧吗？\n患者: 不发烧。\n",
    "医生: 您好\n",
    "医生: 宝宝拉肚子几天了？\n患者: 两天，一天五六次，稀水样。\n医生: 吃过什么药？\n患者: 吃了蒙脱石散和益生菌。\n"
    "医生: 建议查个大便常规，注意补液，防止脱水。\n",
    "医生: 头痛多久了？\n患者: 一周，吃了布洛芬缓释胶囊。\n医生: 做过头颅CT吗？\n患者: 没有。\n",
    "医生: 哪里不舒服\n患者: 发烧39度，咽痛\n医生: 查个血常规，先吃点对乙酰氨基酚\n",
]


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    loaded, _ = inference.load_model(tiny_ckpt, torch.device("cpu"), torch.float32)
    return loaded


@pytest.fixture(scope="module")
def vocabulary(tokenizer, model):
    return grammar.build_vocabulary(tokenizer, model.config.vocab_size)


def prompts_of(tokenizer):
    return [inference.prompt_ids(tokenizer, INSTRUCTION + d) for d in DIALOGUES]


def test_greedy_tokens_equal_transformers_generate_batched_refilled_and_alone(model, tokenizer):
    """min = max so random weights cannot stop early and every position is compared; the repetition penalty stays
    on. Batch 2 over 5 prompts refills rows as answers end; batch 1 is one at a time."""
    decoding = Decoding(max_new_tokens=12, min_new_tokens=12)
    prompts = prompts_of(tokenizer)
    config = reference_config(tokenizer, decoding)
    reference = [model.generate(input_ids=torch.tensor([p]), generation_config=config)[0, len(p):].tolist()
                 for p in prompts]
    for batch_size in (1, 2, 5):
        results = Engine(model, tokenizer, batch_size).generate([Request(p, decoding) for p in prompts])
        assert [r.tokens for r in results] == reference, batch_size
        assert all(r.finish_reason == "length" and r.truncated for r in results)
        assert [r.text for r in results] == [tokenizer.decode(t, skip_special_tokens=True) for t in reference]


def test_answers_of_different_lengths_refill_their_rows(model, tokenizer):
    """Answers with other budgets end at other steps; each equals its answer alone, whatever ran beside it."""
    prompts = prompts_of(tokenizer)
    budgets = [3, 9, 1, 6, 12]
    requests = [Request(p, Decoding(max_new_tokens=b, min_new_tokens=b)) for p, b in zip(prompts, budgets)]
    engine = Engine(model, tokenizer, 2)
    together = engine.generate(requests)
    for request, result, budget in zip(requests, together, budgets):
        alone = Engine(model, tokenizer, 1).generate([request])[0]
        assert result.tokens == alone.tokens and len(result.tokens) == budget


def test_the_row_cache_holds_what_a_plain_forward_computes(model, tokenizer):
    prompts = prompts_of(tokenizer)
    engine = Engine(model, tokenizer, len(prompts))
    engine.runner.ensure_cache(max(map(len, prompts)) + 4)
    for row, ids in enumerate(prompts):
        engine._admit(row, Request(ids), row)
    assert common_prefix_len(engine.runner.prefix, prompts[1]) > 180  # system block + instruction, computed once
    with torch.inference_mode():
        for row, ids in enumerate(prompts):
            out = model(input_ids=torch.tensor([ids[:-1]]), use_cache=True)
            for layer, reference in enumerate(out.past_key_values.layers):
                keys = engine.runner.cache.keys[layer][row, :, :len(ids) - 1]
                values = engine.runner.cache.values[layer][row, :, :len(ids) - 1]
                torch.testing.assert_close(keys, reference.keys[0], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(values, reference.values[0], rtol=1e-4, atol=1e-5)
    view = RowPrefillView(engine.runner.cache, 0, 5)
    assert view.get_seq_length() == 5


def test_an_answer_ends_at_the_first_stop_token_which_is_counted(model, tokenizer, monkeypatch):
    """A stop token ends a row at once (counted, left out of the text); the others go on to their budget."""
    t = tokenizer.encode("好", allowed_special=set())[0]
    script = {0: [t, t, tokenizer.im_end_id], 1: [t] * 5}
    engine = Engine(model, tokenizer, 2)
    steps = {"n": 0}

    def scripted(tokens, positions, width):
        logits = torch.zeros(len(tokens), model.config.vocab_size)
        for row in range(len(tokens)):
            wanted = script[row if len(tokens) == 2 else 1]
            logits[row, wanted[min(steps["n"], len(wanted) - 1)]] = 1.0
        steps["n"] += 1
        return logits

    monkeypatch.setattr(engine.runner, "forward", scripted)
    prompts = [[1] * 30, [2] * 20]  # the longer first: row 0
    results = engine.generate([Request(p, Decoding(max_new_tokens=5, repetition_penalty=1.0)) for p in prompts])
    assert (results[0].tokens, results[0].text, results[0].finish_reason) == ([t, t, tokenizer.im_end_id], "好好",
                                                                              "stop")
    assert (results[1].text, results[1].finish_reason, results[1].truncated) == ("好" * 5, "length", True)


def check_answer(result, dialogue, budget):
    """Valid (the fence, the 8 keys in order, typed), grounded (each list item a span of one dialogue line), ended
    (by itself, or closed at the budget and flagged) and within the budget."""
    text = result.text
    assert text.startswith(grammar.OPEN_FENCE) and text.endswith(grammar.CLOSE_FENCE), text
    fields = json.loads(text[len(grammar.OPEN_FENCE):-len(grammar.CLOSE_FENCE)])
    assert list(fields) == list(EXTRACT_KEYS)
    for key in LIST_KEYS:
        for item in fields[key]:
            assert isinstance(item, str) and item and item in dialogue and "\n" not in item
    assert all(isinstance(fields[key], str) for key in TEXT_KEYS)
    assert result.tokens[-1] == 151645 and result.finish_reason == "stop"
    assert len(result.tokens) <= budget
    return fields


@pytest.mark.parametrize("budget", [64, 100, 160])
def test_random_weights_under_the_grammar_give_valid_grounded_closed_answers(model, tokenizer, vocabulary, budget):
    requests = [extraction_request(tokenizer, INSTRUCTION + d, d, Decoding(max_new_tokens=budget), "grounded",
                                   vocabulary)[0] for d in DIALOGUES]
    results = Engine(model, tokenizer, 3, vocabulary).generate(requests)
    items = 0
    for dialogue, result in zip(DIALOGUES, results):
        fields = check_answer(result, dialogue, budget)
        items += sum(len(fields[k]) for k in LIST_KEYS)
        assert result.truncated  # random weights never finish by themselves: closed at the budget
        assert len(result.tokens) >= budget - 20  # and not long before it
    assert items > 0


def test_schema_keeps_the_format_but_not_the_spans(model, tokenizer, vocabulary):
    requests = [extraction_request(tokenizer, INSTRUCTION + d, d, Decoding(max_new_tokens=120), "schema",
                                   vocabulary)[0] for d in DIALOGUES[:3]]
    results = Engine(model, tokenizer, 3, vocabulary).generate(requests)
    for result in results:
        text = result.text
        fields = json.loads(text[len(grammar.OPEN_FENCE):-len(grammar.CLOSE_FENCE)])
        assert list(fields) == list(EXTRACT_KEYS) and result.tokens[-1] == tokenizer.im_end_id
        assert all(item for key in LIST_KEYS for item in fields[key])


def test_batched_equals_one_at_a_time_under_the_grammar(model, tokenizer, vocabulary):
    requests = [extraction_request(tokenizer, INSTRUCTION + d, d, Decoding(max_new_tokens=80), "grounded",
                                   vocabulary)[0] for d in DIALOGUES]
    together = Engine(model, tokenizer, 4, vocabulary).generate(requests)
    alone = [Engine(model, tokenizer, 1, vocabulary).generate([r])[0] for r in requests]
    assert [r.tokens for r in together] == [r.tokens for r in alone]


def test_sampling_is_seeded_per_answer(model, tokenizer):
    prompts = prompts_of(tokenizer)
    decoding = Decoding(max_new_tokens=8, do_sample=True, temperature=0.9, top_p=0.8, seed=7, min_new_tokens=8)
    first = Engine(model, tokenizer, 3).generate([Request(p, decoding) for p in prompts])
    again = Engine(model, tokenizer, 1).generate([Request(p, decoding) for p in prompts])
    assert [r.tokens for r in first] == [r.tokens for r in again]  # other batch, same answers
    other = Engine(model, tokenizer, 3).generate([Request(p, Decoding(**{**decoding.__dict__, "seed": 8}))
                                                  for p in prompts])
    assert [r.tokens for r in other] != [r.tokens for r in first]


def test_streamed_text_joins_into_the_answer_and_cancel_stops(model, tokenizer, vocabulary):
    chunks = []
    request, _ = extraction_request(tokenizer, INSTRUCTION + DIALOGUES[0], DIALOGUES[0], Decoding(max_new_tokens=90),
                                    "grounded", vocabulary, on_text=chunks.append)
    result = Engine(model, tokenizer, 2, vocabulary).generate([request])[0]
    assert "".join(chunks) == result.text and len(chunks) > 5
    calls = {"n": 0}

    def cancelled():
        calls["n"] += 1
        return calls["n"] >= 4

    stopped = Engine(model, tokenizer, 2).generate([Request(prompts_of(tokenizer)[0], Decoding(max_new_tokens=50),
                                                            cancelled=cancelled)])[0]
    assert stopped.finish_reason == "cancelled" and len(stopped.tokens) == 4


def test_a_request_too_long_for_the_context_is_refused(model, tokenizer):
    with pytest.raises(ValueError, match="exceed the model's 8192-token context"):
        list(Engine(model, tokenizer, 1).stream([Request([1] * 8190, Decoding(max_new_tokens=10))]))


def test_a_request_that_cannot_be_admitted_fails_alone(model, tokenizer, vocabulary):
    """Over the cache's capacity, or a grammar that does not compile: that request gets an "error" result, and the
    others are answered as usual (a server's loop must not die of one bad request)."""
    engine = Engine(model, tokenizer, 2, vocabulary)
    queue = [(0, Request([1] * 40, Decoding(max_new_tokens=3))), (1, Request([1] * 100, Decoding(max_new_tokens=3))),
             (2, Request([1] * 30, Decoding(max_new_tokens=3), grammar=lambda: grammar.check_ebnf(vocabulary, "x"))),
             (3, Request([2] * 30, Decoding(max_new_tokens=3)))]
    results = dict(engine.run(lambda block: queue.pop(0) if queue else None, capacity=64))
    assert results[1].finish_reason == "error" and "exceed the cache capacity 64" in results[1].text
    assert results[2].finish_reason == "error" and "not a valid EBNF grammar" in results[2].text
    assert len(results[0].tokens) == len(results[3].tokens) == 3


@pytest.mark.parametrize("constraint", ["none", "grounded"])
def test_the_static_shape_path_gives_the_same_tokens(model, tokenizer, vocabulary, constraint):
    """What a CUDA graph replays: every step over a bucketed width of the cache (not the slots in use) and the
    repetition penalty as one (rows, vocab) mask. Same tokens as the exact-width path, batched and alone."""
    requests = [extraction_request(tokenizer, INSTRUCTION + d, d, Decoding(max_new_tokens=70, min_new_tokens=70),
                                   constraint, vocabulary)[0] for d in DIALOGUES]
    reference = [r.tokens for r in Engine(model, tokenizer, 3, vocabulary).generate(requests)]
    for batch_size in (3, 1):
        engine = Engine(model, tokenizer, batch_size, vocabulary, static_width=True, dense_penalty=True)
        assert engine.static_width and engine.dense_penalty and not engine.cuda_graphs
        assert [r.tokens for r in engine.generate(requests)] == reference


def test_cuda_graphs_need_a_cuda_device(model, tokenizer):
    with pytest.raises(ValueError, match="cuda_graphs needs the model on a CUDA device"):
        Engine(model, tokenizer, 2, cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA GPU (the graphs are checked on the GPU machine)")
def test_cuda_graph_steps_equal_eager_steps_on_a_gpu(tiny_ckpt, tokenizer):
    gpu_model, _ = inference.load_model(tiny_ckpt, torch.device("cuda"), torch.float32)
    requests = [Request(p, Decoding(max_new_tokens=20, min_new_tokens=20)) for p in prompts_of(tokenizer)]
    eager = Engine(gpu_model, tokenizer, 3, cuda_graphs=False).generate(requests)
    graphed = Engine(gpu_model, tokenizer, 3, cuda_graphs=True).generate(requests)
    assert [r.tokens for r in graphed] == [r.tokens for r in eager]


def test_a_run_of_tokens_that_never_ends_a_character_is_rolled_back_and_closed(model, tokenizer, vocabulary,
                                                                              monkeypatch):
    """Qwen has tokens that start with the tail of one UTF-8 character and end inside the next (b"\\x92\\xe1\\x9e"):
    repeated, they leave no point where the answer could be closed. A model that prefers them gets its answer
    rolled back to the last point that could be closed within the budget, and closed there: valid, within budget."""
    rank = tokenizer.mergeable_ranks
    opener, chain = rank[b"\xe1\x9e"], rank[b"\x92\xe1\x9e"]
    engine = Engine(model, tokenizer, 2, vocabulary)
    real = engine.runner.forward

    def prefers_broken_characters(tokens, positions, width):
        logits = real(tokens, positions, width)
        logits[:, opener] += 1000.0
        logits[:, chain] += 2000.0
        return logits

    monkeypatch.setattr(engine.runner, "forward", prefers_broken_characters)
    chunks = []
    requests = [extraction_request(tokenizer, INSTRUCTION + d, d, Decoding(max_new_tokens=budget), "grounded",
                                   vocabulary, on_text=chunks.append if budget == 120 else None)[0]
                for d, budget in zip(DIALOGUES[:2], (120, 200))]
    results = engine.generate(requests)
    for dialogue, request, result in zip(DIALOGUES, requests, results):
        check_answer(result, dialogue, request.decoding.max_new_tokens)
        assert result.truncated and "\u1792" not in result.text  # the run (ធធធ…) was dropped whole
    assert "".join(chunks) == results[0].text  # what was streamed was never taken back


def test_under_a_cut_prompt_spans_come_from_what_the_model_reads(tokenizer, vocabulary):
    from medextract.answer import visible_dialogue
    from utils import format_output

    dialogue = "医生: 你好，哪里不舒服？\n患者: 咳嗽三天。\n" * 20 + "患者: 吃了阿莫西林。\n"
    request, cut = extraction_request(tokenizer, INSTRUCTION + dialogue, dialogue, Decoding(max_new_tokens=100),
                                      "grounded", vocabulary, max_src_len=400, instruction_chars=len(INSTRUCTION))
    seen = visible_dialogue(tokenizer, request.prompt, len(INSTRUCTION))
    assert cut and dialogue.startswith(seen) and "阿莫西林" not in seen

    def accepted(item):
        g = request.grammar()
        answer = format_output({"药品名称": [item], "药物类别": [], "医疗检查": [], "医疗操作": [], "现病史": "",
                                "辅助检查": "", "诊断结果": "", "医疗建议": ""})
        return all(g.accept(t) for t in tokenizer.encode(answer, allowed_special=set()))

    assert accepted("咳嗽三天") and not accepted("阿莫西林")  # in the dialogue, but after the cut


def test_the_best_allowed_token_is_the_masked_argmax(model, tokenizer, vocabulary):
    """The CPU's greedy shortcut (the best of the ids the bitmask allows) picks what masking the row and taking its
    argmax picks, ties included, at every point of an answer: inside spans, text fields and the fixed text."""
    import xgrammar as xgr

    engine = Engine(model, tokenizer, 2, vocabulary)
    answer = {"药品名称": ["蒙脱石散", "益生菌"], "药物类别": [], "医疗检查": ["大便常规"], "医疗操作": [],
              "现病史": "腹泻两天", "辅助检查": "", "诊断结果": "腹泻", "医疗建议": "补液"}
    g = grammar.AnswerGrammar.for_dialogue(vocabulary, DIALOGUES[2])
    generator = torch.Generator().manual_seed(0)
    for token in tokenizer.encode(format_output(answer), allowed_special=set()):
        g.fill(engine.sampler.bitmask(), 0)
        logits = torch.randint(0, 4, (1, model.config.vocab_size), generator=generator).float()  # many ties
        masked = logits.clone()
        xgr.apply_token_bitmask_inplace(masked, engine.sampler.bitmask()[:1])
        assert engine.sampler.best_allowed(logits[0], 0) == int(masked[0].argmax())
        assert g.accept(token)
