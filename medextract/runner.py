"""The model's side of generation: one row cache for a whole run, prompts prefilled into its rows, and decoding
steps over them, eager or replayed from CUDA graphs.

The cache and the cached forward are the model's own (qwen1_8.modeling_qwen: RowKVCache, `prefill`, `decode_step`,
through the same blocks, attention and rotary code as training); this runner decides what to run. The prompt prefix
that all prompts share (system block and instruction, about 190 of each 600-900 tokens) is computed once and copied
into each row, and the rest of each prompt runs alone at its own length.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch

from utils import one_line


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def core_model(model):
    """The QWenLMHeadModel under a PEFT wrapper, if any (its LoRA layers stay in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class ModelRunner:
    """Runs the model for `rows` cache rows: `ensure_cache`, `prefill` a row, `step` rows 0..A-1, `move_row`."""

    def __init__(self, model, rows: int, cuda_graphs: bool | None = None, static_width: bool | None = None):
        """`cuda_graphs` (default: on a CUDA device) replays each decoding step as one CUDA graph per (batch bucket,
        width bucket); `static_width` (implied by it) makes every step attend over a bucketed width of the cache
        instead of exactly the slots in use, the shapes a graph needs, which on the CPU tests that path."""
        self.model = core_model(model)
        self.rows = rows
        self.device = next(self.model.parameters()).device
        self.seq_length = getattr(self.model.config, "seq_length", 8192)
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs needs the model on a CUDA device")
        self.static_width = self.cuda_graphs if static_width is None else (static_width or self.cuda_graphs)
        self.cache = None  # the model's RowKVCache
        self.prefix: list[int] = []  # the tokens whose keys and values `prefix_kv` holds
        self.prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._graphs: dict[tuple[int, int], _GraphStep] = {}
        self._graph_pool = None

    def ensure_cache(self, capacity: int) -> None:
        """A cache of at least `capacity` slots per row (kept from an earlier run when it is large enough)."""
        if capacity > self.seq_length:
            raise ValueError(f"prompt + new tokens ({capacity}) exceed the model's {self.seq_length}-token context")
        if self.cache is not None and self.cache.capacity >= capacity:
            return
        capacity = math.ceil(max(capacity, 64) / 64) * 64
        self._graphs.clear()  # they hold the old cache's buffers
        self.cache = self.model.row_cache(self.rows, capacity)

    def prefill(self, row: int, body: list[int]) -> None:
        """Keys and values of `body` (a prompt but its last token) at slots 0.. of `row`: the part it shares with the
        last prompt computed whole is copied (when that is 16 tokens or more), the rest computed."""
        shared = common_prefix_len(self.prefix, body)
        if shared < 16:  # not worth a copy: compute this prompt whole, and keep it as the shared prefix
            shared = 0
        if shared:
            self.cache.restore(row, self.prefix_kv, shared)
        if len(body) > shared:
            self.model.prefill(torch.tensor(body[shared:], device=self.device), self.cache, row, shared)
        if not shared and len(body) >= 16:
            self.prefix = body
            self.prefix_kv = self.cache.snapshot(row, len(body))

    def move_row(self, source: int, target: int) -> None:
        self.cache.move_row(source, target)

    def step(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Logits (A, vocab), fp32, of rows 0..A-1 fed `tokens` at `positions` (their keys and values go there)."""
        width = max(positions) + 1
        if self.static_width:
            width = min(max(256, 1 << (width - 1).bit_length()), self.cache.capacity)
        tokens = torch.tensor(tokens, device=self.device)
        positions = torch.tensor(positions, device=self.device)
        if self.cuda_graphs:
            return self._graph_forward(tokens, positions, width)
        return self.forward(tokens, positions, width)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, width: int) -> torch.Tensor:
        """One eager decoding step over `width` slots of the cache."""
        return self.model.decode_step(tokens, positions, self.cache, width)

    def _graph_forward(self, tokens: torch.Tensor, positions: torch.Tensor, width: int) -> torch.Tensor:
        """`forward` replayed from a CUDA graph captured for the smallest batch bucket that holds the rows and for
        this width; the bucket's spare rows are cache rows no answer uses now, re-filled when one is admitted."""
        count = len(tokens)
        bucket = min(self.rows, 1 << (count - 1).bit_length())
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
            return self.forward(tokens, positions, width)


class _GraphStep:
    """One decoding step of `bucket` rows over `width` cache slots, as a CUDA graph: the inputs are copied into
    static buffers, the graph replays the whole forward (about a thousand kernels at the 1.8B shape) in one launch,
    and the logits come back in a static buffer. The first call runs the step eagerly a few times on a side stream
    (with the real inputs, so the cache writes it makes are the step's own), then captures it."""

    def __init__(self, runner: ModelRunner, bucket: int, width: int, pool):
        self.runner, self.bucket, self.width = runner, bucket, width
        self.tokens = torch.zeros(bucket, dtype=torch.long, device=runner.device)
        self.positions = torch.zeros(bucket, dtype=torch.long, device=runner.device)
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
        device = self.runner.device
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: lazy initialisation and kernel selection happen outside the capture
                self.runner.forward(self.tokens, self.positions, self.width)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.logits = self.runner.forward(self.tokens, self.positions, self.width)
