"""The batched generation engine behind predict.py, test_qwen.py and serve.py: the scheduler, over three parts.

Every answer gets a row of a KV cache sized once for the whole run, with its tokens at slots 0, 1, 2, ... (no left
padding), and each decoding step feeds every row its last token at its own position, attending only to its own
slots. A row whose answer ends is refilled at once with the next waiting prompt (continuous batching over a
length-sorted queue), so a batch never waits for its longest answer, and a finished or abandoned row stops costing.

`Engine` (here) schedules: the queue, admission, the steps, what each new token does to its answer, compaction.
The parts it drives:
- runner.ModelRunner runs the model: the cache (the model's RowKVCache), prefill with the shared prompt prefix
  copied, and each step through the model's own cached forward, eager or as a CUDA graph;
- sampling.Sampler turns logits into tokens: repetition penalty, grammar masks, greedy or seeded top-p choice;
- answer.AnswerCloser, per answer under the answer grammar, says when a cut answer must be closed and closes it, so
  it is still valid and grounded; its result says `truncated`.
The request types (Decoding, Request, Result, stop_token_ids) are decoding.py's, imported here with Engine.
"""
from __future__ import annotations

import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import torch

from utils import CHAPTER_FIELDS, Fields, one_line

from .answer import AnswerCloser, empty_answer_tokens
from .decoding import Decoding, Request, Result, stop_token_ids
from .runner import ModelRunner
from .sampling import Sampler

__all__ = ["Decoding", "Engine", "Request", "Result", "stop_token_ids"]


@dataclass
class Row:
    """A request being generated in a cache row."""
    key: Any
    request: Request
    position: int  # slot of the token fed next (the cache holds slots < position)
    next_token: int
    seen: torch.Tensor  # token ids the repetition penalty weighs on (prompt and answer; repeats are harmless)
    matcher: Any = None
    generator: torch.Generator | None = None
    pending: Callable[[], Any] | None = None  # builds the matcher: resolved before the row's first step
    tokens: list[int] = field(default_factory=list)
    sent_chars: int = 0  # how much of the text on_text has received
    closer: AnswerCloser | None = None  # under the answer grammar: when and how a cut answer closes


class Engine:
    """Generates answers for requests, `max_batch_size` at a time, refilling a row as soon as its answer ends."""

    def __init__(self, model, tokenizer, max_batch_size: int = 8, vocabulary=None, cuda_graphs: bool | None = None,
                 static_width: bool | None = None, dense_penalty: bool | None = None):
        """`cuda_graphs` and `static_width`: how steps run (runner.ModelRunner); `dense_penalty` (default: on a CUDA
        device): how the repetition penalty keeps its seen tokens (sampling.Sampler)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.runner = ModelRunner(model, max_batch_size, cuda_graphs, static_width)
        self.model = self.runner.model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.vocabulary = vocabulary  # grammar.Vocabulary: the bitmask width
        self.device = self.runner.device
        vocab_size = self.model.config.vocab_size
        if vocabulary is not None and vocabulary.vocab_size != vocab_size:
            raise ValueError(f"the grammar vocabulary has {vocabulary.vocab_size} ids, the model's logits "
                             f"{vocab_size}: build it with grammar.build_vocabulary(tokenizer, {vocab_size})")
        self.stops = set(stop_token_ids(tokenizer))
        # on a GPU the repetition penalty is one masked operation over a (rows, vocab) mask of the tokens seen, which
        # costs a few kernels a step; on the CPU, gathering each row's seen tokens is cheaper than touching the vocab
        dense = self.device.type == "cuda" if dense_penalty is None else dense_penalty
        self.sampler = Sampler(max_batch_size, vocab_size, sorted(self.stops), tokenizer.im_end_id, self.device,
                               dense)
        self._empty_answer_tokens: dict[tuple, int] = {}

    @property
    def cuda_graphs(self) -> bool:
        return self.runner.cuda_graphs

    @property
    def static_width(self) -> bool:
        return self.runner.static_width

    @property
    def dense_penalty(self) -> bool:
        return self.sampler.seen is not None

    def empty_answer_tokens(self, fields: Fields = CHAPTER_FIELDS) -> int:
        """Tokens of the shortest answer with `fields` under the answer grammar, <|im_end|> included
        (answer.empty_answer_tokens)."""
        key = tuple(fields)
        if key not in self._empty_answer_tokens:
            self._empty_answer_tokens[key] = empty_answer_tokens(self.tokenizer, key)
        return self._empty_answer_tokens[key]

    # ---- public ---------------------------------------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[Result]:
        """Results in the order of `requests` (generated longest prompt first)."""
        results: list[Result | None] = [None] * len(requests)
        for index, result in self.stream(requests):
            results[index] = result
        return results  # type: ignore[return-value]

    def stream(self, requests: Sequence[Request]) -> Iterator[tuple[int, Result]]:
        """(index in `requests`, result) as each answer ends. The queue is sorted longest prompt first, which keeps
        the cache small (it is sized by the first, longest, prompts) and fails at once if memory is short. The
        grammars of the next `max_batch_size` requests are compiled ahead on a second thread (xgrammar releases the
        interpreter meanwhile), so compiling overlaps decoding instead of stalling every row at each admission."""
        order = deque(sorted(range(len(requests)), key=lambda i: (-len(requests[i].prompt), i)))
        capacity = max((r.slots() for r in requests), default=1)
        ahead = deque(i for i in order if requests[i].grammar is not None)
        compiled: dict[int, Future] = {}
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar") as pool:
            def prefetch() -> None:
                while ahead and len(compiled) < self.max_batch_size:
                    index = ahead.popleft()
                    compiled[index] = pool.submit(requests[index].grammar)

            def pull(block: bool):
                if not order:
                    return None
                index = order.popleft()
                request = requests[index]
                if request.grammar is not None:
                    prefetch()
                    request = replace(request, grammar=compiled.pop(index).result)
                    prefetch()
                return index, request

            prefetch()
            yield from self.run(pull, capacity)

    def run(self, pull: Callable[[bool], tuple[Any, Request] | None], capacity: int) -> Iterator[tuple[Any, Result]]:
        """The loop: admit `(key, request)` pairs from `pull` while rows are free (`pull(True)` may wait for one when
        nothing is running; None means nothing more for now, and with no row running, the end), step, yield
        `(key, result)` as answers end. The cache is sized for `capacity` slots (prompt + new tokens) per row; a
        request that needs more, or that fails to admit, gets a result with finish_reason "error" at once."""
        self.runner.ensure_cache(capacity)
        rows: list[Row] = []
        try:
            while True:
                while len(rows) < self.max_batch_size:
                    item = pull(not rows)
                    if item is None:
                        break
                    key, request = item
                    try:
                        if request.slots() > self.runner.cache.capacity:
                            raise ValueError(f"prompt + new tokens ({request.slots()}) exceed the cache capacity "
                                             f"{self.runner.cache.capacity}")
                        rows.append(self._admit(key, request, len(rows)))
                    except (ValueError, RuntimeError, IndexError) as e:  # this request only (a grammar that did
                        # not compile, a token id the model has no row for)
                        yield key, Result([], str(e), "error", False, len(request.prompt))
                if not rows:
                    return
                failed = self._resolve_grammars(rows)
                for index, result in failed:
                    yield rows[index].key, result
                if failed:  # their rows go to the next requests before any step
                    self._compact(rows)
                    continue
                for index, result in self._step(rows):
                    yield rows[index].key, result
                self._compact(rows)
        finally:
            rows.clear()

    # ---- admission ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _admit(self, key, request: Request, row: int) -> Row:
        prompt = list(request.prompt)
        if not prompt:
            raise ValueError(f"request {key!r}: empty prompt")
        decoding = request.decoding
        closer = None
        if request.closable:
            closer = AnswerCloser(self.tokenizer, decoding.max_new_tokens, self.empty_answer_tokens(request.fields),
                                  request.fields)
        body = prompt[:-1]  # the last prompt token is fed by the first decoding step
        self.runner.prefill(row, body)
        seen, generator = self.sampler.start_row(row, prompt, decoding)
        return Row(key, request, len(body), prompt[-1], seen, None, generator, pending=request.grammar, closer=closer)

    def _resolve_grammars(self, rows: list[Row]) -> list[tuple[int, Result]]:
        """Matchers for the rows just admitted, built only now, after every prefill, so that grammars compiled on
        `stream`'s second thread had the prefills' time to finish; (row index, error result) where one fails."""
        failed = []
        for i, r in enumerate(rows):
            if r.pending is not None:
                try:
                    r.matcher = r.pending()
                except (ValueError, RuntimeError) as e:  # this request's grammar alone (a client's, say)
                    failed.append((i, self._failed(r, one_line(e))))
                r.pending = None
        return failed

    # ---- one decoding step ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def _step(self, rows: list[Row]) -> list[tuple[int, Result]]:
        """Advance every row by one token; returns (row index, result) of the rows that ended."""
        logits = self.runner.step([r.next_token for r in rows], [r.position for r in rows])  # (A, V) fp32
        for r in rows:
            r.position += 1
        chosen = self.sampler.choose(logits, rows)
        ended = []
        for i, (r, token) in enumerate(zip(rows, chosen)):
            result = self._advance(r, token)
            if result is not None:
                ended.append((i, result))
        return ended

    def _advance(self, r: Row, token: int) -> Result | None:
        """Record `token` for row `r`; the row's result when its answer has ended."""
        request = r.request
        if r.matcher is not None and not r.matcher.accept(token):  # never seen: a bug, but this answer's alone
            return self._failed(r, f"the grammar rejected token {token}, which its own mask allowed")
        r.tokens.append(token)
        r.next_token = token
        if token in self.stops:
            return self._finish(r, "stop", truncated=False)
        try:
            if request.cancelled is not None and request.cancelled():
                return self._finish(r, "cancelled", truncated=False)
        except Exception as e:  # a caller's callback: its failure ends its own answer, never the others
            return self._failed(r, f"the request's cancelled() raised {type(e).__name__}: {one_line(e)}")
        if r.closer is not None:
            if r.closer.feed(token, len(r.tokens)):
                why = r.closer.close(r.tokens, r.matcher)
                return self._failed(r, why) if why else self._finish(r, "stop", truncated=True)
            self._send(r, r.closer.settled)
            return None
        if len(r.tokens) >= request.decoding.max_new_tokens:
            return self._finish(r, "length", truncated=True)
        self._send(r)
        return None

    # ---- the answer's text and end --------------------------------------------------------------------------

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _send(self, r: Row, upto: int | None = None) -> None:
        """The new part of the answer's text (of its first `upto` tokens) to `on_text`, holding back a character
        still incomplete; under the answer grammar, only up to the point it would be closed at, so that what was
        sent is never taken back."""
        if r.request.on_text is None:
            return
        text = self._text(r.tokens[:upto])
        if text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        if len(text) > r.sent_chars:
            self._deliver(r, text)

    def _deliver(self, r: Row, text: str) -> None:
        """`text` past what on_text has had; a callback that raises stops receiving (its answer still ends)."""
        try:
            r.request.on_text(text[r.sent_chars:])
        except Exception as e:  # a caller's callback: it must not end the other answers
            warnings.warn(f"request {r.key!r}: on_text raised {type(e).__name__}: {one_line(e)}; no more text sent")
            r.request.on_text = None
        r.sent_chars = len(text)

    def _finish(self, r: Row, reason: str, truncated: bool) -> Result:
        text = self._text(r.tokens)
        if r.request.on_text is not None and len(text) > r.sent_chars:
            self._deliver(r, text)
        r.position = -1  # marks the row free
        return Result(list(r.tokens), text, reason, truncated, len(r.request.prompt))

    def _failed(self, r: Row, why: str) -> Result:
        r.position = -1
        return Result(list(r.tokens), why, "error", False, len(r.request.prompt))

    def _compact(self, rows: list[Row]) -> None:
        """Drop ended rows, moving the last running row into each hole, so rows 0..A-1 are the running ones."""
        i = 0
        while i < len(rows):
            if rows[i].position >= 0:
                i += 1
                continue
            last = len(rows) - 1
            if i != last:
                self.runner.move_row(last, i)
                self.sampler.move_row(last, i)
                rows[i] = rows[last]
            rows.pop()
