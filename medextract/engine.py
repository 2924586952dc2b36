"""The batched generation engine behind predict.py, test_qwen.py and serve.py.

Every answer gets a row of a KV cache sized once for the whole run, with its tokens at slots 0, 1, 2, ... (no left
padding): the prompt prefix that all prompts share (system block and instruction, about 190 of each 600-900 tokens)
is computed once and copied in, the rest of each prompt runs alone at its own length, and each decoding step feeds
every row its last token at its own position, attending only to its own slots. A row whose answer ends is refilled at
once with the next waiting prompt (continuous batching over a length-sorted queue), so a batch never waits for its
longest answer, and a finished or abandoned row stops costing.

Per row, each step: the repetition penalty over the tokens of its prompt and answer (as transformers applies it, but
never to padding), the answer grammar's token mask (grammar.py; xgrammar), then greedy choice or temperature/top-p
sampling from the row's own seeded generator, so an answer does not depend on which others share its batch. An
answer under the answer grammar that is about to run out of tokens is closed instead (grammar.closing_text), so it
is still valid and grounded; its result says `truncated`.
"""
from __future__ import annotations

import codecs
import math
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .grammar import AnswerGrammar, AnswerScanner, empty_answer
from utils import SYSTEM_PROMPT, build_chatml_ids, one_line


def stop_token_ids(tokenizer) -> list[int]:
    """An answer ends at `<|im_end|>`; `<|im_start|>` (a new turn) and `<|endoftext|>` end it too."""
    return [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]


@dataclass(frozen=True)
class Decoding:
    """How one answer is generated."""
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.1
    seed: int = 0
    min_new_tokens: int = 0  # stop tokens are masked before this many (benchmarks: random weights that never stop)


@dataclass
class Request:
    """One answer to generate. `grammar` builds the answer's grammar (grammar.AnswerGrammar) when the request is
    admitted, so that a long queue holds no compiled grammars; `closable` says it is the answer grammar, whose cut
    answers `grammar.closing_text` can close. `on_text` receives the answer's text as it grows (never a partial
    character); `cancelled` is polled every step (a client that went away)."""
    prompt: list[int]
    decoding: Decoding = Decoding()
    grammar: Callable[[], Any] | None = None
    closable: bool = False
    on_text: Callable[[str], None] | None = None
    cancelled: Callable[[], bool] | None = None

    def slots(self) -> int:
        """Cache slots the request may need: its prompt and answer."""
        return len(self.prompt) + self.decoding.max_new_tokens


@dataclass
class Result:
    tokens: list[int]  # the new tokens, the stop token included
    text: str  # decoded, special tokens left out
    # "stop" (ended by itself, or closed at the budget), "length" (budget reached), "cancelled", or "error" (the request
    # could not be admitted; `text` says why)
    finish_reason: str
    truncated: bool  # the budget ended the answer (under the answer grammar: closed, still valid)
    prompt_tokens: int


@dataclass
class _Row:
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
    # under the answer grammar: where the answer stands, its characters so far (a token may end inside one), and
    # the latest point where it can be closed within its budget: (tokens kept, the scanner there, closing ids)
    scanner: AnswerScanner | None = None
    decoder: Any = None
    fallback: tuple[int, AnswerScanner, list[int] | None] | None = None


class RowCache:
    """Per layer, keys and values of shape (rows, heads, capacity, head_dim), written in place. Row r holds its
    answer's tokens at slots 0, 1, ...; `step_view` and `prefill_view` are what the attention layers see."""

    def __init__(self, layers: int, rows: int, heads: int, capacity: int, head_dim: int, dtype, device):
        shape = (rows, heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.capacity = capacity

    def move_row(self, source: int, target: int) -> None:
        for buffers in (self.keys, self.values):
            for layer in buffers:
                layer[target].copy_(layer[source])


class _StepView:
    """One decoding step of rows 0..A-1: each row's new key and value go to its own slot; attention reads slots
    0..width-1 of every row (the mask hides what a row does not own)."""

    def __init__(self, cache: RowCache, positions: torch.Tensor, width: int):
        self.cache, self.positions, self.width = cache, positions, width
        self.rows = torch.arange(len(positions), device=positions.device)

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        count = len(self.positions)
        k_buf, v_buf = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        k_buf[self.rows, :, self.positions] = keys[:, :, 0]  # keys (A, H, 1, D)
        v_buf[self.rows, :, self.positions] = values[:, :, 0]
        return k_buf[:count, :, :self.width], v_buf[:count, :, :self.width]

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.width - 1


class _PrefillView:
    """One row's prompt after the slots already filled (`length`): appended in place, attended causally."""

    def __init__(self, cache: RowCache, row: int, length: int):
        self.cache, self.row, self.length = cache, row, length

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        end = self.length + keys.shape[2]
        k_buf, v_buf = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        k_buf[self.row, :, self.length:end] = keys[0]
        v_buf[self.row, :, self.length:end] = values[0]
        return k_buf[self.row:self.row + 1, :, :end], v_buf[self.row:self.row + 1, :, :end]

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.length


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def core_model(model):
    """The QWenLMHeadModel under a PEFT wrapper, if any (its LoRA layers stay in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class Engine:
    """Generates answers for requests, `max_batch_size` at a time, refilling a row as soon as its answer ends."""

    def __init__(self, model, tokenizer, max_batch_size: int = 8, vocabulary=None, cuda_graphs: bool | None = None,
                 static_width: bool | None = None, dense_penalty: bool | None = None):
        """`cuda_graphs` (default: on a CUDA device) replays each decoding step as one CUDA graph per (batch bucket,
        width bucket); `static_width` (implied by it) makes every step attend over a bucketed width of the cache
        instead of exactly the slots in use, the shapes a graph needs, which on the CPU tests that path;
        `dense_penalty` (default: on a CUDA device) keeps the repetition penalty's seen tokens as a (rows, vocab)
        mask, a few kernels a step whatever the batch, instead of a gather per row."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.model = core_model(model)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.vocabulary = vocabulary  # grammar.Vocabulary: the bitmask width
        config = self.model.config
        parameter = next(self.model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.heads = config.num_attention_heads
        self.head_dim = getattr(config, "kv_channels", config.hidden_size // self.heads)
        self.layers = config.num_hidden_layers
        self.seq_length = getattr(config, "seq_length", 8192)
        self.vocab_size = config.vocab_size
        if vocabulary is not None and vocabulary.vocab_size != self.vocab_size:
            raise ValueError(f"the grammar vocabulary has {vocabulary.vocab_size} ids, the model's logits "
                             f"{self.vocab_size}: build it with grammar.build_vocabulary(tokenizer, {self.vocab_size})")
        self.stops = set(stop_token_ids(tokenizer))
        self.cache: RowCache | None = None
        self.prefix: list[int] = []  # the tokens whose keys and values `prefix_kv` holds
        self.prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._empty_answer_tokens: int | None = None
        self._bitmask = None
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs needs the model on a CUDA device")
        self.static_width = self.cuda_graphs if static_width is None else (static_width or self.cuda_graphs)
        # on a GPU the repetition penalty is one masked operation over a (rows, vocab) mask of the tokens seen, which
        # costs a few kernels a step; on the CPU, gathering each row's seen tokens is cheaper than touching the vocab
        self.dense_penalty = on_cuda if dense_penalty is None else dense_penalty
        self._seen: torch.Tensor | None = None
        self._graphs: dict[tuple[int, int], "_GraphStep"] = {}
        self._graph_pool = None

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
        if capacity > self.seq_length:
            raise ValueError(f"prompt + new tokens ({capacity}) exceed the model's {self.seq_length}-token context")
        self._ensure_cache(capacity)
        rows: list[_Row] = []
        try:
            while True:
                while len(rows) < self.max_batch_size:
                    item = pull(not rows)
                    if item is None:
                        break
                    key, request = item
                    try:
                        if request.slots() > self.cache.capacity:
                            raise ValueError(f"prompt + new tokens ({request.slots()}) exceed the cache capacity "
                                             f"{self.cache.capacity}")
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

    # ---- admission and prefill ------------------------------------------------------------------------------

    def _ensure_cache(self, capacity: int) -> None:
        if self.cache is not None and self.cache.capacity >= capacity:
            return
        capacity = max(capacity, 64)
        capacity = math.ceil(capacity / 64) * 64
        self._graphs.clear()  # they hold the old cache's buffers
        self.cache = RowCache(self.layers, self.max_batch_size, self.heads, capacity, self.head_dim, self.dtype,
                              self.device)
        # cos and sin of every slot, computed once as the model computes them (so indexing them is exact), which
        # keeps trigonometry and host work out of the decoding step
        with torch.inference_mode():
            slots = torch.arange(capacity, device=self.device)[None, :]
            self._rotary = tuple(t[0] for t in self.model.transformer.rotary_emb(slots, [1.0]))  # (capacity, 1, dim)
        if self.dense_penalty:
            self._seen = torch.zeros(self.max_batch_size, self.vocab_size, dtype=torch.bool, device=self.device)

    @torch.inference_mode()
    def _admit(self, key, request: Request, row: int) -> _Row:
        prompt = list(request.prompt)
        if not prompt:
            raise ValueError(f"request {key!r}: empty prompt")
        body = prompt[:-1]  # the last prompt token is fed by the first decoding step
        shared = common_prefix_len(self.prefix, body)
        if shared < 16:  # not worth a copy: compute this prompt whole, and keep it as the shared prefix
            shared = 0
        for layer, (keys, values) in enumerate(self.prefix_kv):
            if shared:
                self.cache.keys[layer][row, :, :shared] = keys[0, :, :shared]
                self.cache.values[layer][row, :, :shared] = values[0, :, :shared]
        if len(body) > shared:
            ids = torch.tensor([body[shared:]], device=self.device)
            self.model.transformer(input_ids=ids, past_key_values=_PrefillView(self.cache, row, shared), use_cache=True)
        if not shared and len(body) >= 16:
            self.prefix = body
            self.prefix_kv = [(self.cache.keys[layer][row:row + 1, :, :len(body)].clone(),
                               self.cache.values[layer][row:row + 1, :, :len(body)].clone())
                              for layer in range(self.layers)]
        decoding = request.decoding
        generator = None
        if decoding.do_sample:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(decoding.seed)
        if request.closable and decoding.max_new_tokens < self.empty_answer_tokens():
            raise ValueError(f"max_new_tokens {decoding.max_new_tokens} is below the {self.empty_answer_tokens()} "
                             f"tokens an answer under the answer grammar takes at the least (every field empty)")
        seen = torch.tensor(sorted(set(prompt)), device=self.device)
        if self._seen is not None:
            self._seen[row].zero_()
            self._seen[row, seen] = True
        row_state = _Row(key, request, len(body), prompt[-1], seen, None, generator, pending=request.grammar)
        if request.closable:
            row_state.scanner = AnswerScanner()
            row_state.decoder = codecs.getincrementaldecoder("utf-8")()
            row_state.fallback = (0, AnswerScanner(), None)
        return row_state

    def _resolve_grammars(self, rows: list[_Row]) -> list[tuple[int, Result]]:
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
    def _step(self, rows: list[_Row]) -> list[tuple[int, Result]]:
        """Advance every row by one token; returns (row index, result) of the rows that ended."""
        tokens = torch.tensor([r.next_token for r in rows], device=self.device)
        positions = torch.tensor([r.position for r in rows], device=self.device)
        width = max(r.position for r in rows) + 1
        if self.static_width:
            width = min(max(256, 1 << (width - 1).bit_length()), self.cache.capacity)
        if self.cuda_graphs:
            logits = self._graph_forward(tokens, positions, width)
        else:
            logits = self._forward(tokens, positions, width)  # (A, V) fp32
        for r in rows:
            r.position += 1

        self._penalise(logits, rows)
        for i, r in enumerate(rows):
            if len(r.tokens) < r.request.decoding.min_new_tokens:
                logits[i, list(self.stops)] = -math.inf
        chosen = self._choose(logits, rows)
        if self._seen is not None:
            self._seen[torch.arange(len(rows), device=self.device), torch.tensor(chosen, device=self.device)] = True

        ended = []
        for i, (r, token) in enumerate(zip(rows, chosen)):
            result = self._advance(r, token)
            if result is not None:
                ended.append((i, result))
        return ended

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, width: int) -> torch.Tensor:
        """Logits of one new token per row, through the model's own layers with a cache view that writes each row's
        key and value at its position and a mask that lets each row see its slots only."""
        body = self.model.transformer
        x = body.wte(tokens[:, None])  # (A, 1, hidden)
        rotary = (self._rotary[0][positions][:, None], self._rotary[1][positions][:, None])  # (A, 1, 1, dim)
        slots = torch.arange(width, device=self.device)
        mask = (slots[None, :] <= positions[:, None])[:, None, None, :]  # (A, 1, 1, width)
        view = _StepView(self.cache, positions, width)
        for block in body.h:
            x = block(x, rotary, mask=mask, past_key_values=view)
        x = body.ln_f(x)
        return self.model.lm_head(x[:, -1]).float()

    def _graph_forward(self, tokens: torch.Tensor, positions: torch.Tensor, width: int) -> torch.Tensor:
        """`_forward` replayed from a CUDA graph captured for the smallest batch bucket that holds the rows and for
        this width; the bucket's spare rows are cache rows no answer uses now, re-filled when one is admitted."""
        count = len(tokens)
        bucket = min(self.max_batch_size, 1 << (count - 1).bit_length())
        graph = self._graphs.get((bucket, width))
        if graph is None:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = self._graphs[(bucket, width)] = _GraphStep(self, bucket, width, self._graph_pool)
        try:
            return graph(tokens, positions)
        except RuntimeError as e:  # a capture this torch or driver refuses: the same step, eagerly, from now on
            warnings.warn(f"CUDA graph capture failed ({one_line(e)}); decoding eagerly instead")
            self.cuda_graphs = False
            self._graphs.clear()
            return self._forward(tokens, positions, width)

    def _penalise(self, logits: torch.Tensor, rows: list[_Row]) -> None:
        """transformers' repetition penalty: a seen token's logit is divided by the penalty (multiplied if negative)."""
        if self._seen is not None:
            # by a Python number, as transformers divides (on a GPU, dividing by a tensor rounds differently)
            by_penalty: dict[float, list[int]] = {}
            for i, r in enumerate(rows):
                by_penalty.setdefault(r.request.decoding.repetition_penalty, []).append(i)
            for penalty, index in by_penalty.items():
                if penalty == 1.0:
                    continue
                part = slice(0, len(rows)) if len(index) == len(rows) else torch.tensor(index, device=self.device)
                values, seen = logits[part], self._seen[:len(rows)][part]
                logits[part] = torch.where(seen, torch.where(values < 0, values * penalty, values / penalty), values)
            return
        for i, r in enumerate(rows):
            penalty = r.request.decoding.repetition_penalty
            if penalty == 1.0:
                continue
            values = logits[i, r.seen]
            logits[i, r.seen] = torch.where(values < 0, values * penalty, values / penalty)

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """Each row's token: greedy, or sampled; under a grammar, from the tokens it allows.

        A greedy row whose best token its grammar allows keeps it without masking (the masked argmax is the same
        token), which spares most masks where nearly every token is allowed (inside a text field)."""
        chosen = logits.argmax(dim=-1).tolist()
        masked = []
        for i, r in enumerate(rows):
            if r.matcher is not None:
                r.matcher.fill(self._bitmask_rows(), i)
                if r.request.decoding.do_sample or not self._allowed(i, chosen[i]):
                    masked.append(i)
        if masked and logits.device.type == "cpu":
            # a greedy row needs only the best of the tokens its mask allows: read them off the bitmask and compare
            # those (inside a span, a handful), rather than writing -inf over the other 151,000 and searching again
            sampled = [i for i in masked if rows[i].request.decoding.do_sample]
            for i in masked:
                if i not in sampled:
                    chosen[i] = self._best_allowed(logits[i], i)
            masked = sampled
        if masked:
            self._apply_masks(logits, masked)
            for i, token in zip(masked, logits[masked].argmax(dim=-1).tolist()):
                chosen[i] = token
        for i, r in enumerate(rows):
            decoding = r.request.decoding
            held = r.matcher is not None and len(r.tokens) < decoding.min_new_tokens
            if held and logits[i, chosen[i]] == -math.inf:
                chosen[i] = self.tokenizer.im_end_id  # the grammar allows only the end, which min_new_tokens held back
            elif decoding.do_sample:
                chosen[i] = sample(logits[i], decoding.temperature, decoding.top_p, r.generator)
        return chosen

    def _bitmask_rows(self) -> torch.Tensor:
        import xgrammar as xgr

        if self._bitmask is None:
            self._bitmask = xgr.allocate_token_bitmask(self.max_batch_size, self.vocab_size)
        return self._bitmask

    def _best_allowed(self, logits: torch.Tensor, row: int) -> int:
        """The allowed token with the highest logit (the lowest id among equals, as argmax over the masked row)."""
        words = self._bitmask[row].numpy()  # bit j of word w allows token 32 w + j
        used = np.flatnonzero(words)  # inside a span or the fixed text, a few words of 4,748
        bits = np.unpackbits(words[used].view(np.uint8), bitorder="little").reshape(len(used), 32)
        ids = (used[:, None] * 32 + np.arange(32))[bits.astype(bool)]
        allowed = torch.from_numpy(ids[ids < self.vocab_size])
        if not len(allowed):  # a mask that allows nothing: the grammar then rejects the token, failing this answer
            return int(logits.argmax())
        return int(allowed[logits[allowed].argmax()])

    def _allowed(self, row: int, token: int) -> bool:
        return bool((int(self._bitmask[row, token >> 5]) >> (token & 31)) & 1)

    def _apply_masks(self, logits: torch.Tensor, rows: list[int]) -> None:
        import xgrammar as xgr

        bitmask = self._bitmask[:logits.shape[0]]
        if logits.device.type != "cpu":
            bitmask = bitmask.to(logits.device, non_blocking=True)
        # xgrammar's own kernel for the device: on this project's CPUs its C++ one took 5 ms for 16 rows, four times
        # less than the torch_native backend
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)

    # ---- after the token ------------------------------------------------------------------------------------

    def _advance(self, r: _Row, token: int) -> Result | None:
        """Record `token` for row `r`; the row's result when its answer has ended."""
        request = r.request
        if r.matcher is not None and not r.matcher.accept(token):  # never seen: a bug, but this answer's alone
            return self._failed(r, f"the grammar rejected token {token}, which its own mask allowed")
        r.tokens.append(token)
        r.next_token = token
        if self._seen is None:
            r.seen = torch.cat([r.seen, torch.tensor([token], device=self.device)])
        if token in self.stops:
            return self._finish(r, "stop", truncated=False)
        try:
            if request.cancelled is not None and request.cancelled():
                return self._finish(r, "cancelled", truncated=False)
        except Exception as e:  # a caller's callback: its failure ends its own answer, never the others
            return self._failed(r, f"the request's cancelled() raised {type(e).__name__}: {one_line(e)}")
        budget = request.decoding.max_new_tokens
        if request.closable:
            return self._keep_closable(r, token, budget)
        if len(r.tokens) >= budget:
            return self._finish(r, "length", truncated=True)
        self._send(r)
        return None

    def _keep_closable(self, r: _Row, token: int, budget: int) -> Result | None:
        """Under the answer grammar, the budget can never leave an answer open: each token moves the scanner, every
        point where the answer could be closed and still fit is remembered, and when the budget is reached (or the
        answer here closes exactly at it) the answer is closed there: here, or, rolled back, at the latest point
        that fitted. A run of tokens that each end inside a character, or an item that keeps ending in white space,
        so only costs the tokens after that point."""
        try:
            r.scanner.feed(r.decoder.decode(self.tokenizer.decoder[token]))
        except (UnicodeDecodeError, KeyError, TypeError):  # not UTF-8, or a special token: never under the grammar
            r.scanner.mode = "broken"
        n = len(r.tokens)
        closing = None if r.decoder.getstate()[0] else r.scanner.closing()
        if closing is not None:
            ids = None
            if n + self.empty_answer_tokens() >= budget:  # near the budget: does the closing fit?
                ids = self._encode(closing) + [self.tokenizer.im_end_id]
            if ids is None or n + len(ids) <= budget:
                r.fallback = (n, AnswerScanner(**r.scanner.__dict__), ids)
            if ids is not None and n + len(ids) >= budget:
                return self._close(r)
        if n >= budget:
            return self._close(r)
        self._send(r, r.fallback[0])
        return None

    def _close(self, r: _Row) -> Result:
        """Close the answer at its fallback point: drop the tokens after it, then append the closing tokens."""
        kept, scanner, ids = r.fallback
        if ids is None:
            ids = self._encode(scanner.closing()) + [self.tokenizer.im_end_id]
        r.matcher.rollback(len(r.tokens) - kept)
        del r.tokens[kept:]
        for t in ids:
            if not r.matcher.accept(t):  # never seen: closing_text is tested against the grammar
                return self._failed(r, f"the grammar rejected the closing token {t}")
        r.tokens += ids
        return self._finish(r, "stop", truncated=True)

    def empty_answer_tokens(self) -> int:
        """Tokens of the shortest answer under the answer grammar, <|im_end|> included; no closing is longer."""
        if self._empty_answer_tokens is None:
            self._empty_answer_tokens = len(self._encode(empty_answer())) + 1
        return self._empty_answer_tokens

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, allowed_special=set())

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _send(self, r: _Row, upto: int | None = None) -> None:
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

    def _deliver(self, r: _Row, text: str) -> None:
        """`text` past what on_text has had; a callback that raises stops receiving (its answer still ends)."""
        try:
            r.request.on_text(text[r.sent_chars:])
        except Exception as e:  # a caller's callback: it must not end the other answers
            warnings.warn(f"request {r.key!r}: on_text raised {type(e).__name__}: {one_line(e)}; no more text sent")
            r.request.on_text = None
        r.sent_chars = len(text)

    def _finish(self, r: _Row, reason: str, truncated: bool) -> Result:
        text = self._text(r.tokens)
        if r.request.on_text is not None and len(text) > r.sent_chars:
            self._deliver(r, text)
        r.position = -1  # marks the row free
        return Result(list(r.tokens), text, reason, truncated, len(r.request.prompt))

    def _failed(self, r: _Row, why: str) -> Result:
        r.position = -1
        return Result(list(r.tokens), why, "error", False, len(r.request.prompt))

    def _compact(self, rows: list[_Row]) -> None:
        """Drop ended rows, moving the last running row into each hole, so rows 0..A-1 are the running ones."""
        i = 0
        while i < len(rows):
            if rows[i].position >= 0:
                i += 1
                continue
            last = len(rows) - 1
            if i != last:
                self.cache.move_row(last, i)
                if self._seen is not None:
                    self._seen[i].copy_(self._seen[last])
                rows[i] = rows[last]
            rows.pop()


class _GraphStep:
    """One decoding step of `bucket` rows over `width` cache slots, as a CUDA graph: the inputs are copied into
    static buffers, the graph replays the whole forward (about a thousand kernels at the 1.8B shape) in one launch,
    and the logits come back in a static buffer. The first call runs the step eagerly a few times on a side stream
    (with the real inputs, so the cache writes it makes are the step's own), then captures it."""

    def __init__(self, engine: Engine, bucket: int, width: int, pool):
        self.engine, self.bucket, self.width = engine, bucket, width
        self.tokens = torch.zeros(bucket, dtype=torch.long, device=engine.device)
        self.positions = torch.zeros(bucket, dtype=torch.long, device=engine.device)
        self.pool = pool
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        count = len(tokens)
        self.tokens[:count].copy_(tokens)
        self.positions[:count].copy_(positions)
        self.tokens[count:].zero_()
        self.positions[count:].zero_()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits[:count]

    def _capture(self) -> None:
        stream = torch.cuda.Stream(device=self.engine.device)
        stream.wait_stream(torch.cuda.current_stream(self.engine.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: lazy initialisation and kernel selection happen outside the capture
                self.engine._forward(self.tokens, self.positions, self.width)
        torch.cuda.current_stream(self.engine.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.logits = self.engine._forward(self.tokens, self.positions, self.width)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """A token drawn from softmax(logits / temperature), restricted to the smallest set of most likely tokens whose
    probability reaches top_p (transformers' top-p: the most likely token is always kept)."""
    scores = logits / temperature
    if top_p < 1.0:
        ordered, index = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[-1] = False
        scores = scores.clone()
        scores[index[remove]] = -math.inf
    probs = scores.softmax(dim=-1)
    try:
        return int(torch.multinomial(probs, 1, generator=generator).item())
    except RuntimeError:  # no finite logit to draw from (an overflow upstream): the best token, as greedy would
        return int(logits.argmax())


# --------------------------------------------------------------------------------------------------------------
# An extraction, as a request
# --------------------------------------------------------------------------------------------------------------


def extraction_request(tokenizer, user_text: str, dialogue: str, decoding: Decoding, constraint: str = "grounded",
                       vocabulary=None, max_len: int = 2048, max_src_len: int = 1560, truncation: str = "tokens",
                       instruction_chars: int = 0, **callbacks) -> tuple[Request, bool]:
    """The request that answers `user_text` (instruction + `dialogue`), with the prompt cut as training cut it, and
    whether the prompt was cut. Under `grounded`, list items come from `dialogue`; `schema` keeps only the format;
    `none` generates freely. `callbacks`: Request's on_text / cancelled."""
    ids = build_chatml_ids(tokenizer, user_text, None, max_len, max_src_len, truncation=truncation,
                           instruction_chars=instruction_chars)
    if constraint == "none":
        return Request(ids.input_ids, decoding, **callbacks), ids.truncated
    if vocabulary is None:
        raise ValueError(f"constraint {constraint!r} needs the grammar vocabulary (grammar.build_vocabulary)")
    if ids.truncated:  # spans only from what the model reads: the dialogue as the cut prompt holds it
        dialogue = visible_dialogue(tokenizer, ids.input_ids, instruction_chars)

    def build() -> AnswerGrammar:
        return AnswerGrammar.for_dialogue(vocabulary, dialogue, constraint)
    return Request(ids.input_ids, decoding, build, closable=True, **callbacks), ids.truncated


def visible_dialogue(tokenizer, prompt: Sequence[int], instruction_chars: int) -> str:
    """The dialogue a generation prompt (utils.build_chatml_ids's) holds, after its instruction: all of it, or the
    part a cut left (a character the cut split is dropped)."""
    from qwen1_8.qwen_generation_utils import chatml_block, text_ids

    nl = text_ids(tokenizer, "\n")
    head = len(chatml_block(tokenizer, "system", SYSTEM_PROMPT)) + len(nl) + 1 + len(text_ids(tokenizer, "user")) \
        + len(nl)
    tail = 1 + len(nl) + 1 + len(text_ids(tokenizer, "assistant")) + len(nl)  # <|im_end|>\n<|im_start|>assistant\n
    content = tokenizer.decode(list(prompt[head:len(prompt) - tail]), errors="replace").rstrip("\ufffd")
    return content[instruction_chars:]


def reference_config(tokenizer, decoding: Decoding):
    """transformers' GenerationConfig for the same decoding: `model.generate` with it is the plain reference the
    engine is tested and benchmarked against (the chapter's way of generating, one prompt at a time)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=decoding.max_new_tokens, do_sample=decoding.do_sample,
                              repetition_penalty=decoding.repetition_penalty, eos_token_id=stop_token_ids(tokenizer),
                              pad_token_id=tokenizer.eod_id, use_cache=True, min_new_tokens=decoding.min_new_tokens)
    if decoding.do_sample:
        config.top_p, config.temperature, config.top_k = decoding.top_p, decoding.temperature, 0
    else:  # transformers' neutral values: unset, they would be filled from the model's sampling settings
        config.top_p, config.temperature, config.top_k = 1.0, 1.0, 50
    return config
