"""From a decoding step's logits to each row's next token.

Per row: the repetition penalty over the tokens of its prompt and answer (as transformers applies it, but never to
padding), stop tokens held back before `min_new_tokens`, the grammar's token mask (xgrammar's bitmask, one row per
cache row), then greedy choice or temperature/top-p sampling from the row's own seeded generator, so an answer does
not depend on which others share its batch.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from .decoding import Decoding

if TYPE_CHECKING:
    from .engine import Row


class Sampler:
    """Chooses the next token of rows 0..A-1 from their logits, and keeps what the repetition penalty weighs on."""

    def __init__(self, max_rows: int, vocab_size: int, stops: Sequence[int], end_id: int, device: torch.device,
                 dense_penalty: bool):
        """`stops`: the tokens that end an answer, masked before min_new_tokens; `end_id`: <|im_end|>, the end a
        grammar allows. `dense_penalty` keeps the tokens each row has seen as a (rows, vocab) mask, a few kernels a
        step whatever the batch (a GPU's way), instead of a gather per row (the CPU's)."""
        self.max_rows, self.vocab_size, self.device = max_rows, vocab_size, device
        self.stops, self.end_id = list(stops), end_id
        self.seen = torch.zeros(max_rows, vocab_size, dtype=torch.bool, device=device) if dense_penalty else None
        self._bitmask = None

    def start_row(self, row: int, prompt: Sequence[int],
                  decoding: Decoding) -> tuple[torch.Tensor, torch.Generator | None]:
        """The ids of `prompt` the penalty weighs on (also marked in the dense mask's `row`), and the row's seeded
        generator when it samples."""
        generator = None
        if decoding.do_sample:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(decoding.seed)
        seen = torch.tensor(sorted(set(prompt)), device=self.device)
        if self.seen is not None:
            self.seen[row].zero_()
            self.seen[row, seen] = True
        return seen, generator

    def move_row(self, source: int, target: int) -> None:
        if self.seen is not None:
            self.seen[target].copy_(self.seen[source])

    def choose(self, logits: torch.Tensor, rows: Sequence[Row]) -> list[int]:
        """Each row's next token from `logits` (A, vocab), which it modifies; the tokens are recorded as seen."""
        self._penalise(logits, rows)
        for i, r in enumerate(rows):
            if len(r.tokens) < r.request.decoding.min_new_tokens:
                logits[i, self.stops] = -math.inf
        chosen = self._choose(logits, rows)
        if self.seen is not None:
            self.seen[torch.arange(len(rows), device=self.device), torch.tensor(chosen, device=self.device)] = True
        else:
            for r, token in zip(rows, chosen):
                r.seen = torch.cat([r.seen, torch.tensor([token], device=self.device)])
        return chosen

    def _penalise(self, logits: torch.Tensor, rows: Sequence[Row]) -> None:
        """transformers' repetition penalty: a seen token's logit is divided by the penalty (multiplied if negative)."""
        if self.seen is not None:
            # by a Python number, as transformers divides (on a GPU, dividing by a tensor rounds differently)
            by_penalty: dict[float, list[int]] = {}
            for i, r in enumerate(rows):
                by_penalty.setdefault(r.request.decoding.repetition_penalty, []).append(i)
            for penalty, index in by_penalty.items():
                if penalty == 1.0:
                    continue
                part = slice(0, len(rows)) if len(index) == len(rows) else torch.tensor(index, device=self.device)
                values, seen = logits[part], self.seen[:len(rows)][part]
                logits[part] = torch.where(seen, torch.where(values < 0, values * penalty, values / penalty), values)
            return
        for i, r in enumerate(rows):
            penalty = r.request.decoding.repetition_penalty
            if penalty == 1.0:
                continue
            values = logits[i, r.seen]
            logits[i, r.seen] = torch.where(values < 0, values * penalty, values / penalty)

    def _choose(self, logits: torch.Tensor, rows: Sequence[Row]) -> list[int]:
        """Each row's token: greedy, or sampled; under a grammar, from the tokens it allows.

        A greedy row whose best token its grammar allows keeps it without masking (the masked argmax is the same
        token), which spares most masks where nearly every token is allowed (inside a text field)."""
        chosen = logits.argmax(dim=-1).tolist()
        masked = []
        for i, r in enumerate(rows):
            if r.matcher is not None:
                r.matcher.fill(self.bitmask(), i)
                if r.request.decoding.do_sample or not self._allowed(i, chosen[i]):
                    masked.append(i)
        if masked and logits.device.type == "cpu":
            # a greedy row needs only the best of the tokens its mask allows: read them off the bitmask and compare
            # those (inside a span, a handful), rather than writing -inf over the other 151,000 and searching again
            sampled = [i for i in masked if rows[i].request.decoding.do_sample]
            for i in masked:
                if i not in sampled:
                    chosen[i] = self.best_allowed(logits[i], i)
            masked = sampled
        if masked:
            self._apply_masks(logits, masked)
            for i, token in zip(masked, logits[masked].argmax(dim=-1).tolist()):
                chosen[i] = token
        for i, r in enumerate(rows):
            decoding = r.request.decoding
            held = r.matcher is not None and len(r.tokens) < decoding.min_new_tokens
            if held and logits[i, chosen[i]] == -math.inf:
                chosen[i] = self.end_id  # the grammar allows only the end, which min_new_tokens held back
            elif decoding.do_sample:
                chosen[i] = sample(logits[i], decoding.temperature, decoding.top_p, r.generator)
        return chosen

    def bitmask(self) -> torch.Tensor:
        """xgrammar's token bitmask, one row per cache row: bit j of word w allows token 32 w + j."""
        import xgrammar as xgr

        if self._bitmask is None:
            self._bitmask = xgr.allocate_token_bitmask(self.max_rows, self.vocab_size)
        return self._bitmask

    def best_allowed(self, logits: torch.Tensor, row: int) -> int:
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
