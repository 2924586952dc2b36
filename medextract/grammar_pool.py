"""Grammar work for the service, bounded so that no grammar one client sends can stall the others.

A grammar compile (xgrammar) is the one piece of a request whose cost the client sets: it has no bound of its own,
cannot be stopped once started, and grows faster than the grammar (on this project's CPUs a chain of `[a-z]*`
compiles in 0.65 s at 100 terms, 2.6 s at 150, 5 s at 200, 93 s at 1,000). xgrammar releases the interpreter while
it compiles (a Python loop on another thread kept its full speed beside one), so threads keep the event loop free,
but a thread cannot be stopped either. Hence:

- A client's grammar (`structured_outputs`) is first vetted in a worker process (`GrammarWorkers`, --grammar_workers
  of them): parsed, checked to admit an answer (`unproductive_rule`, then the first token mask), and compiled, within
  --grammar_timeout seconds and --grammar_memory_mb of memory. A worker whose grammar runs past the time, or whose
  client goes away, is killed and replaced (about 3 s: xgrammar imports torch), so an abandoned compile stops
  costing at once.
- A compiled grammar cannot come back from a process: xgrammar serialises the answer grammar of a 1,000-character
  dialogue (0.1 s to compile) to 137 MB of JSON in 6.5 s. So a grammar the vet passed is compiled again here, on a
  thread of `Grammars.compile_pool`, in about the time the vet took (never more than --grammar_timeout).
- Every compiled grammar is kept in an LRU keyed by its text (`GrammarCache`), with the grammars refused for what
  they are; a grammar sent again (json_object's, a client's own) costs nothing.
- An answer grammar (grammar.py's, for the part of a dialogue the cut prompt holds) is this server's own, bounded by
  --max_src_len, so it is compiled here directly, through `BoundedVocabulary`, which refuses any grammar over
  --max_grammar_bytes: a dialogue of ordinary text has an answer grammar well under 100 KB, one of long tokens made to
  fill --max_src_len 511 KB (4 s and 700 MB to compile).

What is refused is a `GrammarRefused` (the service's 400), naming the bound and the serve.py flag that sets it.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from utils import CHAPTER_FIELDS, Fields

from .errors import MedextractError
from .grammar import AnswerGrammar, Vocabulary, build_ebnf

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where the workers import medextract from
# the workers run at the lowest CPU priority from their first line (torch's import included), so that on a busy
# machine generation keeps its share while they compile or start
WORKER_CODE = "import os; os.nice(19); from medextract.grammar_pool import serve_vetting; serve_vetting()"
CACHE_ENTRIES = 64
CACHE_BYTES = 1 << 30  # compiled grammars and their texts
RESPAWN_DELAY = 5.0  # after a worker failed to start


@dataclass(frozen=True)
class GrammarBounds:
    """serve.py's --grammar_workers, --grammar_timeout, --max_grammar_bytes and --grammar_memory_mb."""
    workers: int = 2
    timeout: float = 10.0
    max_bytes: int = 262_144
    memory_mb: int = 1024

    @property
    def wait(self) -> float:
        """How long a grammar may wait for a free worker: a few grammars' bound, and a worker's start."""
        return 3 * self.timeout + 30.0


class GrammarRefused(MedextractError, ValueError):
    """A grammar this server will not use; `code` says why: invalid_grammar, empty_grammar, grammar_too_large or
    grammar_too_slow."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


class GrammarAbandoned(MedextractError):
    """The client left while its grammar was being vetted (its worker was killed)."""


class WorkersBusy(MedextractError):
    """No grammar worker came free within `GrammarBounds.wait`."""


def check_grammar_size(ebnf: str, max_bytes: int) -> None:
    size = len(ebnf.encode("utf-8"))
    if size > max_bytes:
        raise GrammarRefused(f"the grammar is {size} bytes, over the {max_bytes} bytes this server compiles "
                             f"(serve.py --max_grammar_bytes)", "grammar_too_large")


def answer_head(fields: Fields = CHAPTER_FIELDS) -> str:
    """The root rule of every answer grammar with `fields`, whatever the dialogue and constraint."""
    return build_ebnf("", "schema", fields).split("\n", 1)[0]


def answer_constraint(grammar: str, dialogue: str, fields: Fields = CHAPTER_FIELDS) -> str | None:
    """"grounded" or "schema" when `grammar` is exactly that answer grammar of `dialogue` with `fields` (the
    served schema's), else None."""
    if not grammar.startswith(answer_head(fields)):
        return None
    for constraint in ("schema", "grounded"):
        if grammar == build_ebnf(dialogue, constraint, fields):
            return constraint
    return None


def may_be_grounded_grammar(grammar: str, dialogue: str, fields: Fields = CHAPTER_FIELDS) -> bool:
    """Whether `grammar` can be the grounded answer grammar of `dialogue` with `fields`, at no cost: it has the
    answer grammar's root rule, and is no shorter than the dialogue (a dialogue's grounded grammar has a rule for
    every character of its longest line, and is some 20 to 40 times as long as an ordinary dialogue), so recognising
    it never builds the grammar of a dialogue longer than the grammar sent."""
    return grammar.startswith(answer_head(fields)) and len(dialogue) <= len(grammar)


# --------------------------------------------------------------------------------------------------------------
# The cache, and the vocabulary that compiles through it
# --------------------------------------------------------------------------------------------------------------


class GrammarCache:
    """The compiled grammars (and the refusals) last used, by grammar text: at most `entries` of them and
    `max_bytes` of compiled memory and text. Shared by the event loop and the preparation threads."""

    def __init__(self, entries: int = CACHE_ENTRIES, max_bytes: int = CACHE_BYTES):
        self.entries, self.max_bytes = entries, max_bytes
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, text: str) -> Any:
        """The compiled grammar (xgrammar.CompiledGrammar) or GrammarRefused kept for `text`, or None."""
        with self._lock:
            item = self._items.get(text)
            if item is None:
                return None
            self._items.move_to_end(text)
            return item[0]

    def put(self, text: str, value: Any) -> None:
        size = len(text) + (value.memory_size_bytes if hasattr(value, "memory_size_bytes") else 0)
        if size > self.max_bytes:
            return
        with self._lock:
            if text in self._items:
                self._bytes -= self._items.pop(text)[1]
            self._items[text] = (value, size)
            self._bytes += size
            while len(self._items) > self.entries or self._bytes > self.max_bytes:
                self._bytes -= self._items.popitem(last=False)[1][1]


@dataclass
class BoundedVocabulary(Vocabulary):
    """The engine's vocabulary, compiling through `cache` and refusing a grammar over `max_bytes`: what the
    service builds its requests' grammars with (grammar.AnswerGrammar calls `compile`)."""
    cache: GrammarCache | None = None
    max_bytes: int = GrammarBounds.max_bytes

    @classmethod
    def of(cls, vocabulary: Vocabulary, cache: GrammarCache, max_bytes: int) -> "BoundedVocabulary":
        return cls(vocabulary.info, vocabulary.compiler, vocabulary.vocab_size, cache, max_bytes)

    def compile(self, ebnf: str):
        check_grammar_size(ebnf, self.max_bytes)
        found = self.cache.get(ebnf)
        if isinstance(found, GrammarRefused):
            raise GrammarRefused(str(found), found.code)
        if found is None:
            found = super().compile(ebnf)
            self.cache.put(ebnf, found)
        return found


# --------------------------------------------------------------------------------------------------------------
# Vetting a grammar (in a worker process)
# --------------------------------------------------------------------------------------------------------------


def unproductive_rule(grammar) -> tuple[str, bool] | None:
    """(the name of a rule reachable from the root that produces no string, whether the whole grammar produces
    none) for an xgrammar.Grammar with such a rule, else None. A dead part such as `b ::= "c" b` lets the matcher
    accept tokens into it and then allow none, so an answer would stop in the middle; `root ::= root` admits nothing
    at all. None as well when the grammar's serialisation is not the one read here (xgrammar 0.2.8's "v16"): then
    only the first mask is checked.

    The serialisation holds each expression as [type, count, data...] (types: 0 bytes, 1 character class, 2 its
    star, 3 empty string, 4 rule reference, 5 sequence, 6 choices, 8 repetition [rule, min, max]); a rule is
    [name, body expression, lookahead, ...]. An expression is productive when it can produce some string; found
    bottom-up from the ones that can by themselves, as a worklist, so the cost is linear in the grammar."""
    data = json.loads(grammar.serialize_json())
    if data.get("__VERSION__") != "v16":
        return None
    values, starts, rules = data["grammar_expr_data"], data["grammar_expr_indptr"], data["rules"]
    ends = starts[1:] + [len(values)]
    exprs = [values[start:end] for start, end in zip(starts, ends)]
    parents: list[list[int]] = [[] for _ in exprs]  # the sequences and choices an expression is part of
    referrers: list[list[int]] = [[] for _ in rules]  # the references and repetitions of a rule
    missing = [0] * len(exprs)  # a sequence's parts not yet known productive
    productive = [False] * len(exprs)
    ready = []
    for index, expr in enumerate(exprs):
        kind, body = expr[0], expr[2:]
        if kind in (5, 6):
            for part in body:
                parents[part].append(index)
            missing[index] = len(body) if kind == 5 else 1
            if kind == 5 and not body:
                ready.append(index)
        elif kind == 4 or (kind == 8 and body[1] > 0):
            referrers[body[0]].append(index)
        elif kind == 1:
            if _class_has_a_character(body[0], body[1:]):
                ready.append(index)
        else:  # bytes, a star, the empty string, a repetition that may be empty, what this reader does not know
            ready.append(index)
    body_of = {}
    for rule_index, rule in enumerate(rules):
        body_of.setdefault(rule[1], []).append(rule_index)
    rule_productive = [False] * len(rules)
    while ready:
        index = ready.pop()
        if productive[index]:
            continue
        productive[index] = True
        for parent in parents[index]:
            missing[parent] -= 1
            if missing[parent] == 0:
                ready.append(parent)
        for rule_index in body_of.get(index, ()):
            if not rule_productive[rule_index]:
                rule_productive[rule_index] = True
                ready += referrers[rule_index]
    # every expression reachable from the root must be productive; the culprit named is the first dead rule
    # reference met (or the rule holding an empty character class), in the order the grammar is written
    root = data["root_rule_id"]
    seen_rules, stack, seen_exprs = {root}, [(rules[root][1], root)], set()
    while stack:
        index, rule_index = stack.pop()
        if index in seen_exprs:
            continue
        seen_exprs.add(index)
        kind, body = exprs[index][0], exprs[index][2:]
        if not productive[index] and (kind == 1 or kind in (4, 8) and not rule_productive[body[0]]):
            return rules[rule_index if kind == 1 else body[0]][0], not rule_productive[root]
        if kind in (5, 6):
            stack += [(part, rule_index) for part in reversed(body)]
        elif kind in (4, 8) and body[0] not in seen_rules:
            seen_rules.add(body[0])
            stack.append((rules[body[0]][1], body[0]))
    return None


def _class_has_a_character(negated: int, bounds: list[int]) -> bool:
    ranges = sorted(zip(bounds[0::2], bounds[1::2]))
    if not negated:
        return any(low <= high for low, high in ranges)
    covered = -1  # the highest code point covered so far, from 0 up
    for low, high in ranges:
        if low > covered + 1:
            return True
        covered = max(covered, high)
    return covered < 0x10FFFF


def vet(vocabulary: Vocabulary, ebnf: str, dialogue: str | None = None, memory_mb: int = 0,
        fields: Fields = CHAPTER_FIELDS) -> dict:
    """What a worker answers for a client's grammar: {"constraint": ...} when it is the answer grammar of
    `dialogue` with `fields` (answer_constraint), {"ok": true, "seconds": compile time} when it compiles and admits
    an answer, {"refused": code, "message": why} otherwise (`memory_mb`: the worker's memory bound, for the
    message)."""
    import xgrammar as xgr

    if dialogue is not None:
        constraint = answer_constraint(ebnf, dialogue, fields)
        if constraint is not None:
            return {"constraint": constraint}
    started = time.perf_counter()
    try:
        grammar = xgr.Grammar.from_ebnf(ebnf)
        dead = unproductive_rule(grammar)
        if dead is not None:
            rule, everywhere = dead
            return {"refused": "empty_grammar", "message": (
                f"the grammar admits no answer: no string satisfies it (its rule '{rule}' produces none)"
                if everywhere else
                f"the grammar admits no answer through its rule '{rule}', which produces no string (an answer "
                f"that entered it could never end); remove it or give it an alternative that ends")}
        compiled = vocabulary.compiler.compile_grammar(grammar)
        matcher = xgr.GrammarMatcher(compiled)
        bitmask = xgr.allocate_token_bitmask(1, vocabulary.vocab_size)
        matcher.fill_next_token_bitmask(bitmask, 0)
        if not bool(bitmask.any()):
            return {"refused": "empty_grammar", "message": "the grammar admits no answer: it allows no token to "
                                                           "start with"}
    except MemoryError:
        return memory_refusal(memory_mb)
    except RuntimeError as e:
        if "bad_alloc" in str(e):
            return memory_refusal(memory_mb)
        return {"refused": "invalid_grammar", "message": f"not a valid EBNF grammar: {xgrammar_reason(e)}"}
    return {"ok": True, "seconds": time.perf_counter() - started}


def xgrammar_reason(error: Exception) -> str:
    """xgrammar's message on one line, without its time stamp and source line."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return re.sub(r"\[[\d:]+\] \S+:\d+: ", "", first)


def memory_refusal(memory_mb: int) -> dict:
    return {"refused": "grammar_too_large", "message": f"compiling the grammar takes more than the {memory_mb} MB of "
                                                       f"memory this server gives one (serve.py --grammar_memory_mb)"}


def serve_vetting() -> None:
    """A worker's loop, run as `python -c "from medextract.grammar_pool import serve_vetting; serve_vetting()"` by
    GrammarWorkers: a line of settings and a line of the serialised xgrammar.TokenizerInfo on stdin, "ready" on
    stdout, then one JSON job a line ({"grammar", "dialogue", "fields"}) answered by one JSON line (`vet`), until
    stdin closes. It dies with the server (Linux's parent-death signal), so a compile left running never outlives
    it."""
    _die_with_parent()
    # the answers go to the original stdout; whatever else writes to it (a library's notice, C++ included) goes to
    # stderr instead, so that it can never garble an answer
    stdin, stdout = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    settings = json.loads(stdin.readline() or b"{}")
    info_json = stdin.readline()
    if not settings or not info_json:  # the server went away before it was set up
        return
    import xgrammar as xgr

    info = xgr.TokenizerInfo.deserialize_json(info_json.decode("utf-8"))
    vocabulary = Vocabulary(info, xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False), info.vocab_size)
    _limit_memory(settings["memory_mb"])
    stdout.write(b'{"ready": true}\n')
    stdout.flush()
    for line in stdin:
        job = json.loads(line)
        try:
            fields = tuple(tuple(field) for field in job.get("fields", CHAPTER_FIELDS))
            answer = vet(vocabulary, job["grammar"], job.get("dialogue"), settings["memory_mb"], fields)
        except MemoryError:
            answer = memory_refusal(settings["memory_mb"])
        stdout.write(json.dumps(answer).encode("utf-8") + b"\n")
        stdout.flush()


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _limit_memory(memory_mb: int) -> None:
    """At most `memory_mb` more of the heap than the worker holds once set up (Linux's RLIMIT_DATA): past it an
    allocation fails (MemoryError, or xgrammar's std::bad_alloc) and the grammar is refused."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            held = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    except (OSError, StopIteration, ValueError):
        return
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = held + memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


# --------------------------------------------------------------------------------------------------------------
# The workers (in the server, on its event loop)
# --------------------------------------------------------------------------------------------------------------


class GrammarWorkers:
    """`bounds.workers` processes vetting clients' grammars, one grammar each at a time. A worker whose grammar
    runs past `bounds.timeout`, whose client leaves, or that dies (out of its memory) is killed and replaced."""

    def __init__(self, vocabulary: Vocabulary, bounds: GrammarBounds):
        self.vocabulary, self.bounds = vocabulary, bounds
        self.counts = {"vetting": 0, "killed": 0}
        self._idle: asyncio.Queue | None = None
        self._processes: set[asyncio.subprocess.Process] = set()
        self._tasks: set[asyncio.Task] = set()
        self._setup = b""
        self._closed = False

    async def start(self) -> None:
        """Starts the workers in the background (the server answers meanwhile; a grammar waits for one)."""
        self._idle = asyncio.Queue()
        info = await asyncio.to_thread(self.vocabulary.info.serialize_json)
        self._setup = json.dumps({"memory_mb": self.bounds.memory_mb}).encode() + b"\n" + info.encode() + b"\n"
        for _ in range(self.bounds.workers):
            self._background(self._spawn())

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for process in list(self._processes):
            self._kill(process, replace=False)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def idle(self) -> int:
        return self._idle.qsize() if self._idle is not None else 0

    def _background(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _spawn(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}
        while not self._closed:
            process = None
            try:
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", WORKER_CODE, stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE, cwd=REPO_ROOT, env=env)
                self._processes.add(process)
                process.stdin.write(self._setup)
                await process.stdin.drain()
                if await process.stdout.readline():
                    self._idle.put_nowait(process)
                    return
                reason = f"it exited with status {await process.wait()}"
            except (OSError, ValueError) as e:
                reason = f"{type(e).__name__}: {e}"
            if process is not None:
                self._kill(process, replace=False)
            print(f"grammar worker: failed to start ({reason}); trying again in {RESPAWN_DELAY:g} s",
                  file=sys.stderr, flush=True)
            await asyncio.sleep(RESPAWN_DELAY)

    def _kill(self, process: asyncio.subprocess.Process, replace: bool = True) -> None:
        if process in self._processes:
            self._processes.discard(process)
            try:
                process.kill()
            except ProcessLookupError:
                pass
            self._background(process.wait())  # reaped, not left a zombie
            if replace and not self._closed:
                self.counts["killed"] += 1
                self._background(self._spawn())

    async def vet(self, ebnf: str, dialogue: str | None, gone: asyncio.Future,
                  fields: Fields = CHAPTER_FIELDS) -> dict:
        """`vet`'s answer for `ebnf` (with `dialogue` and `fields`) from a free worker; GrammarRefused past the time
        or memory bound, or for what the worker refused; GrammarAbandoned when `gone` completes first (the client
        left), WorkersBusy when no worker comes free within the bound's wait."""
        process = await self._take(gone)
        if gone.done():
            self._idle.put_nowait(process)
            raise GrammarAbandoned("the client left while its grammar waited for a worker")
        self.counts["vetting"] += 1
        try:
            try:
                job = {"grammar": ebnf, "dialogue": dialogue, "fields": [list(field) for field in fields]}
                process.stdin.write(json.dumps(job).encode("utf-8") + b"\n")
                await process.stdin.drain()
                line = await _first(process.stdout.readline(), gone, self.bounds.timeout)
            except BaseException as e:  # the bound, the client gone, the server stopping, a broken pipe
                self._kill(process)
                if isinstance(e, TimeoutError):
                    raise GrammarRefused(f"the grammar took longer than {self.bounds.timeout:g} s to compile, the "
                                         f"most this server gives one (serve.py --grammar_timeout)",
                                         "grammar_too_slow") from None
                raise
            try:
                answer = json.loads(line)
            except ValueError:  # it died (the kernel killed it for its memory, or someone did), or is broken
                self._kill(process)
                raise GrammarRefused(memory_refusal(self.bounds.memory_mb)["message"], "grammar_too_large") \
                    from None
            self._idle.put_nowait(process)
        finally:
            self.counts["vetting"] -= 1
        if "refused" in answer:
            raise GrammarRefused(answer["message"], answer["refused"])
        return answer

    async def _take(self, gone: asyncio.Future) -> asyncio.subprocess.Process:
        """A free worker that still runs (one may have died while it waited: it is replaced)."""
        deadline = asyncio.get_running_loop().time() + self.bounds.wait
        while True:
            try:
                process = await _first(self._idle.get(), gone, deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                raise WorkersBusy(f"no grammar worker came free within {self.bounds.wait:g} s: the server is "
                                  f"vetting other grammars (serve.py --grammar_workers {self.bounds.workers}); try "
                                  f"again") from None
            if process.returncode is None:
                return process
            self._kill(process)


async def _first(awaitable, gone: asyncio.Future, timeout: float):
    """`awaitable`'s result; GrammarAbandoned when `gone` completes first, TimeoutError past `timeout` seconds.
    What `awaitable` was doing is cancelled then."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task, gone}, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    if task in done:
        return task.result()
    task.cancel()
    if gone in done:
        raise GrammarAbandoned("the client left while its grammar was being compiled")
    raise TimeoutError


# --------------------------------------------------------------------------------------------------------------
# All of it, as the service uses it
# --------------------------------------------------------------------------------------------------------------


def lower_thread_priority() -> None:
    """The calling thread at the lowest CPU priority (Linux sets it per thread), so that a client's grammar compiled
    here never takes the CPU from generation; elsewhere, or without the right, it stays as it is."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass


class Grammars:
    """The service's grammar work: the cache, the bounded vocabulary its requests compile with, the vetting
    workers and the threads that compile what they passed. `fields`: the served schema's, those of the answer
    grammar a client's grammar is recognised as."""

    def __init__(self, vocabulary: Vocabulary, bounds: GrammarBounds, fields: Fields = CHAPTER_FIELDS):
        self.bounds = bounds
        self.fields = tuple(tuple(field) for field in fields)
        self.schema_ebnf = build_ebnf("", "schema", self.fields)  # the same for every dialogue
        self.cache = GrammarCache()
        self.vocabulary = BoundedVocabulary.of(vocabulary, self.cache, bounds.max_bytes)
        self.workers = GrammarWorkers(vocabulary, bounds)
        self.compile_pool = ThreadPoolExecutor(max_workers=bounds.workers, thread_name_prefix="grammar",
                                               initializer=lower_thread_priority)

    async def start(self) -> None:
        await self.workers.start()

    async def close(self) -> None:
        await self.workers.close()
        self.compile_pool.shutdown(wait=False, cancel_futures=True)

    def status(self) -> dict:
        return {"grammar_workers_idle": self.workers.idle(), "grammars_vetting": self.workers.counts["vetting"],
                "grammar_workers_killed": self.workers.counts["killed"], "grammars_cached": len(self.cache)}

    async def client_grammar(self, ebnf: str, dialogue: str | None, gone: asyncio.Future) -> str | AnswerGrammar:
        """A client's grammar ready for the engine, or the answer grammar it is: "grounded" or "schema" when it is
        exactly that grammar of `dialogue` with the served fields (an extraction prompt's dialogue; None for any
        other prompt), else the grammar compiled, with its own matcher. Vetted first unless the cache knows it;
        GrammarRefused when it is refused (and the refusal kept, but for time: a busier moment may have made it
        slow)."""
        check_grammar_size(ebnf, self.bounds.max_bytes)
        if dialogue is not None and ebnf == self.schema_ebnf:
            return "schema"
        if dialogue is not None and not may_be_grounded_grammar(ebnf, dialogue, self.fields):
            dialogue = None
        known = self.cache.get(ebnf) if dialogue is None else None
        if isinstance(known, GrammarRefused):
            raise GrammarRefused(str(known), known.code)
        if known is None:
            try:
                verdict = await self.workers.vet(ebnf, dialogue, gone, self.fields)
            except GrammarRefused as e:
                if e.code != "grammar_too_slow":
                    self.cache.put(ebnf, GrammarRefused(str(e), e.code))  # without the frames of its traceback
                raise
            if "constraint" in verdict:
                return verdict["constraint"]
        return await asyncio.get_running_loop().run_in_executor(self.compile_pool, self._compile, ebnf)

    def _compile(self, ebnf: str) -> AnswerGrammar:
        try:
            return AnswerGrammar(self.vocabulary, ebnf)
        except RuntimeError as e:  # never seen: the vet compiled it
            raise GrammarRefused(f"not a valid EBNF grammar: {xgrammar_reason(e)}", "invalid_grammar") from None
