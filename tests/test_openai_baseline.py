"""test_openai.py against a real OpenAI-compatible HTTP server on 127.0.0.1, through the real `openai` client.

The server answers POST /v1/chat/completions. What it does for a request depends on a marker word in the dialogue
(FAIL500ONCE, RATE429ONCE, SLOWONCE, ALWAYS503, MALFORMED, NOCHOICES, NOCONTENT, REFUSE400) and on how many times
that dialogue was asked before; every other dialogue gets a JSON answer naming its marker.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest

import evaluate
import test_openai as baseline
from medextract.grammar import build_ebnf, empty_answer
from medextract.schema import load_schema
from utils import INSTRUCTION, SYSTEM_PROMPT, format_output, input_digest

SECRET = "sk-test-do-not-leak-8f3a91c2"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # a client that timed out has hung up, so writing its late answer fails, as it should; anything else is loud
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeServer:
    def __init__(self):
        self.lock = threading.Lock()
        self.bodies: list[dict] = []
        self.auth: list[str] = []
        self.seen: dict[str, int] = {}
        self.in_flight = self.max_in_flight = 0
        self.delay = 0.0  # seconds every answer waits (to observe concurrency)
        self.healthy = False  # True: every marker gets a normal answer
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                if self.path != "/v1/chat/completions":
                    return self.reply(404, b'{"error": {"message": "no such route"}}')
                body = json.loads(raw)
                with server.lock:
                    server.bodies.append(body)
                    server.auth.append(self.headers.get("Authorization", ""))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    dialogue = body["messages"][-1]["content"]
                    marker = (re.findall(r"[A-Z0-9]{4,}", dialogue) or ["PLAIN"])[-1]
                    attempt = server.seen.get(marker, 0)
                    server.seen[marker] = attempt + 1
                try:
                    time.sleep(server.delay)
                finally:  # before the reply: once the client has it, it may send the next request at once
                    with server.lock:
                        server.in_flight -= 1
                self.respond(body, marker, attempt)

            def respond(self, body, marker, attempt):
                if not server.healthy:
                    if marker == "FAIL500ONCE" and attempt == 0:
                        return self.reply(500, b'{"error": {"message": "internal hiccup"}}')
                    if marker == "RATE429ONCE" and attempt == 0:
                        return self.reply(429, b'{"error": {"message": "slow down"}}', {"Retry-After": "0"})
                    if marker == "SLOWONCE" and attempt == 0:
                        time.sleep(1.5)  # longer than the client's --timeout
                    if marker == "ALWAYS503":
                        return self.reply(503, b'{"error": {"message": "overloaded"}}')
                    if marker == "REFUSE400":
                        return self.reply(400, b'{"error": {"message": "bad request"}}')
                    if marker == "MALFORMED":
                        return self.reply(200, b'{"choices": [{"message": ')
                    if marker == "NOCHOICES":
                        return self.reply(200, b'{"id": "cmpl-1", "object": "chat.completion"}')
                    if marker == "NOCONTENT":
                        return self.reply(200, completion(body["model"], None))
                if marker == "OBEYS":  # an answer that follows the answer grammar: spans of its dialogue
                    fields = {**json.loads(empty_answer()[8:-4]), "药品名称": ["头疼"], "诊断结果": "感冒"}
                    return self.reply(200, completion(body["model"], format_output(fields)))
                content = "```json\n" + json.dumps({"药品名称": [marker], "诊断结果": "感冒"}, ensure_ascii=False) + "\n```"
                return self.reply(200, completion(body["model"], content))

            def reply(self, status, payload, headers=None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_port}/v1"

    def count(self, marker: str) -> int:
        return self.seen.get(marker, 0)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def completion(model: str, content) -> bytes:
    return json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }, ensure_ascii=False).encode()


@pytest.fixture
def server():
    srv = FakeServer()
    yield srv
    srv.close()


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    return SECRET


def dialogue(marker: str) -> str:
    return f"医生: 哪里不舒服？\n患者: 头疼 {marker}\n"


def write_input(path, markers, bare=()):
    """data_helper records, or bare {"input"} lines for the markers in `bare`."""
    with open(path, "w", encoding="utf-8") as f:
        for marker in markers:
            record = ({"input": dialogue(marker)} if marker in bare else
                      {"instruction": "请抽取要素：\n", "input": dialogue(marker), "output": "```json\n{}\n```"})
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_output(path) -> dict[int, dict]:
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "an id was written twice"
    return {r["id"]: r for r in records}


def run_flags(server, tmp_path) -> list[str]:
    return ["--base_url", server.base_url, "--input_file", str(tmp_path / "in.jsonl"),
            "--output_file", str(tmp_path / "out.jsonl"), "--retry_base_delay", "0.001"]


def run(server, tmp_path, *extra):
    return baseline.main([*run_flags(server, tmp_path), "--timeout", "5", *extra])


def assert_no_leak(tmp_path, captured):
    assert SECRET not in captured.out and SECRET not in captured.err
    for path in tmp_path.iterdir():
        assert SECRET not in path.read_text(encoding="utf-8")


def test_normal_batch(server, api_key, tmp_path, capfd):
    write_input(tmp_path / "in.jsonl", ["AAAA", "BBBB", "CCCC"], bare=("CCCC",))
    assert run(server, tmp_path, "--model", "test-model") == 0
    out = read_output(tmp_path / "out.jsonl")
    assert sorted(out) == [0, 1, 2]
    for i, marker in enumerate(["AAAA", "BBBB", "CCCC"]):
        assert out[i]["model"] == "test-model" and out[i]["finish_reason"] == "stop"
        assert json.loads(out[i]["output"].strip("`\njson")) == {"药品名称": [marker], "诊断结果": "感冒"}
    # the messages: system prompt, then the record's instruction (or the chapter's) followed by the dialogue
    by_marker = {b["messages"][1]["content"].split()[-1]: b for b in server.bodies}
    assert by_marker["AAAA"]["messages"] == [{"role": "system", "content": SYSTEM_PROMPT},
                                             {"role": "user", "content": "请抽取要素：\n" + dialogue("AAAA")}]
    assert by_marker["CCCC"]["messages"][1]["content"] == INSTRUCTION + dialogue("CCCC")
    body = by_marker["BBBB"]
    assert body["model"] == "test-model" and body["temperature"] == 0.0 and body["max_tokens"] == 512
    assert "response_format" not in body
    # the key came from the environment and went only into the Authorization header
    assert server.auth == [f"Bearer {SECRET}"] * 3
    assert all(SECRET not in json.dumps(b) for b in server.bodies)
    assert_no_leak(tmp_path, capfd.readouterr())


def test_json_mode_flag(server, api_key, tmp_path):
    write_input(tmp_path / "in.jsonl", ["AAAA"])
    assert run(server, tmp_path, "--json_mode", "--max_tokens", "64", "--temperature", "0.3") == 0
    body = server.bodies[0]
    assert body["response_format"] == {"type": "json_object"}
    assert body["max_tokens"] == 64 and body["temperature"] == 0.3
    assert baseline.parse_args(["--max_tgt_len", "64"]).max_tokens == 64  # predict.py's name for it


def test_retries_on_500_429_and_timeout(server, api_key, tmp_path, capfd):
    write_input(tmp_path / "in.jsonl", ["FAIL500ONCE", "RATE429ONCE", "SLOWONCE", "AAAA"])
    assert run(server, tmp_path, "--timeout", "0.5") == 0
    assert sorted(read_output(tmp_path / "out.jsonl")) == [0, 1, 2, 3]
    assert server.count("FAIL500ONCE") == 2 and server.count("RATE429ONCE") == 2 and server.count("SLOWONCE") == 2
    assert server.count("AAAA") == 1
    assert_no_leak(tmp_path, capfd.readouterr())


def test_failures_are_reported_left_out_and_retried_on_rerun(server, api_key, tmp_path, capfd):
    markers = ["AAAA", "ALWAYS503", "MALFORMED", "NOCHOICES", "NOCONTENT", "REFUSE400", "BBBB"]
    write_input(tmp_path / "in.jsonl", markers)
    assert run(server, tmp_path, "--max_retries", "2", "--concurrency", "3") == 1
    assert sorted(read_output(tmp_path / "out.jsonl")) == [0, 6]
    # bounded retries for a server error; no retry for a refusal or a body that is not a chat completion
    assert server.count("ALWAYS503") == 3
    assert server.count("REFUSE400") == server.count("MALFORMED") == server.count("NOCHOICES") == 1
    captured = capfd.readouterr()
    assert "id 1: failed: gave up after 3 attempts; last error: HTTP 503" in captured.err
    assert "id 2: failed: malformed response body" in captured.err
    assert "id 3: failed: malformed response body: no 'choices'" in captured.err
    assert "id 4: failed: malformed response body: choice 0 has no message content" in captured.err
    assert "id 5: failed: HTTP 400" in captured.err
    assert "5 requests failed" in captured.err and "1, 2, 3, 4, 5" in captured.err
    assert_no_leak(tmp_path, captured)

    # the server recovers: a rerun asks only for the failed ids
    server.healthy = True
    before = len(server.bodies)
    assert run(server, tmp_path) == 0
    assert len(server.bodies) - before == 5
    assert server.count("AAAA") == 1 and server.count("BBBB") == 1
    assert sorted(read_output(tmp_path / "out.jsonl")) == list(range(7))


def test_resume_requests_only_missing_ids(server, api_key, tmp_path, capfd):
    write_input(tmp_path / "in.jsonl", ["AAAA", "BBBB", "CCCC", "DDDD"])
    settings = {"model": "gpt-4o-mini", "temperature": 0.0, "max_tokens": 512, "json_mode": False}
    (tmp_path / "out.jsonl.settings.json").write_text(json.dumps(settings), encoding="utf-8")  # a killed run's
    with open(tmp_path / "out.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"id": 0, "output": "{}", "model": "m"}) + "\n")
        f.write(json.dumps({"id": 2, "output": "{}", "model": "m"}) + "\n")
        f.write('{"id": 3, "output": "{\\"药品')  # torn line from a killed run: dropped and asked again
    assert run(server, tmp_path) == 0
    assert server.seen == {"BBBB": 1, "DDDD": 1}
    out = read_output(tmp_path / "out.jsonl")
    assert sorted(out) == [0, 1, 2, 3] and out[0]["output"] == "{}"
    assert "4 records, 2 already in" in capfd.readouterr().out
    # nothing left: no request at all
    assert run(server, tmp_path) == 0
    assert len(server.bodies) == 2
    # the file was begun with these settings: another temperature would mix two runs' answers
    with pytest.raises(SystemExit, match=r"out\.jsonl was begun with other settings \(temperature 0\.0 -> 0\.7\)"):
        run(server, tmp_path, "--temperature", "0.7")
    # and so would another server's, even one serving a model of the same name
    other = server.base_url.replace("127.0.0.1", "localhost")
    with pytest.raises(SystemExit, match=r"other settings \(endpoint 'http://127\.0\.0\.1:\d+/v1/?' -> "
                                         r"'http://localhost:\d+/v1/?'\)"):
        run(server, tmp_path, "--base_url", other)
    assert len(server.bodies) == 2


def test_a_results_file_of_another_input_or_program_is_refused(server, api_key, tmp_path):
    """Ids are line numbers, so a results file could pass for any input file; each answer records a digest of its
    prompt, and the settings file which program and model wrote it."""
    write_input(tmp_path / "in.jsonl", ["AAAA", "BBBB"])
    assert run(server, tmp_path) == 0
    out = read_output(tmp_path / "out.jsonl")
    examples = baseline.read_examples(str(tmp_path / "in.jsonl"))
    assert [out[e.id]["input_digest"] for e in examples] == [input_digest(e.user_text) for e in examples]
    write_input(tmp_path / "in.jsonl", ["AAAA", "XXXX", "CCCC"])  # another data set, same file names
    with pytest.raises(SystemExit, match=r"out\.jsonl: the answer with id 1 was made for another dialogue than line "
                                         r"2 of .*in\.jsonl"):
        run(server, tmp_path)
    # predict.py's results file (its settings name a local model): not this program's to continue
    write_input(tmp_path / "in.jsonl", ["AAAA", "BBBB", "CCCC"])
    (tmp_path / "out.jsonl.settings.json").write_text(json.dumps({"model_path": "/models/merged", "dtype": "bf16"}),
                                                      encoding="utf-8")
    with pytest.raises(SystemExit, match=r"other settings \(model_path '/models/merged' -> \(none\); dtype"):
        run(server, tmp_path)
    (tmp_path / "out.jsonl.settings.json").unlink()
    with pytest.raises(SystemExit, match=r"out\.jsonl holds results but no out\.jsonl\.settings\.json"):
        run(server, tmp_path)
    assert len(server.bodies) == 2 and len(read_output(tmp_path / "out.jsonl")) == 2


def test_a_settings_file_from_before_the_endpoint_was_recorded_still_resumes(server, api_key, tmp_path):
    write_input(tmp_path / "in.jsonl", ["AAAA", "BBBB"])
    (tmp_path / "out.jsonl").write_text(json.dumps({"id": 0, "output": "{}", "model": "m"}) + "\n", encoding="utf-8")
    old = {"model": "gpt-4o-mini", "temperature": 0.0, "max_tokens": 512, "json_mode": False}
    (tmp_path / "out.jsonl.settings.json").write_text(json.dumps(old), encoding="utf-8")
    assert run(server, tmp_path) == 0 and server.seen == {"BBBB": 1}
    saved = json.loads((tmp_path / "out.jsonl.settings.json").read_text(encoding="utf-8"))
    assert saved["endpoint"].rstrip("/") == server.base_url.rstrip("/") and saved["model"] == "gpt-4o-mini"


def test_recorded_endpoint_carries_no_credentials(api_key):
    client = baseline.build_client("https://user:secret@api.example.com:8443/v1?key=secret", 5.0)
    assert baseline.endpoint(client).rstrip("/") == "https://api.example.com:8443/v1"


def test_concurrency_is_bounded(server, api_key, tmp_path):
    server.delay = 0.1
    write_input(tmp_path / "in.jsonl", [f"M{i:03d}" for i in range(8)])
    assert run(server, tmp_path, "--concurrency", "2") == 0
    assert len(read_output(tmp_path / "out.jsonl")) == 8
    assert 1 <= server.max_in_flight <= 2


def test_missing_api_key_fails_before_any_request(server, monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    write_input(tmp_path / "in.jsonl", ["AAAA"])
    with pytest.raises(SystemExit, match="OPENAI_API_KEY is not set"):
        run(server, tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", "  ")
    with pytest.raises(SystemExit, match="OPENAI_API_KEY is not set"):
        run(server, tmp_path)
    assert server.bodies == []
    assert not (tmp_path / "out.jsonl").exists()


def test_connection_errors_are_retried_a_bounded_number_of_times(api_key):
    srv = FakeServer()
    url = srv.base_url
    srv.close()  # nothing listens there any more
    client = baseline.build_client(url, timeout=2.0)
    sleeps = []
    settings = baseline.Settings(model="m", max_retries=3, retry_base_delay=0.01)
    with pytest.raises(baseline.RequestFailed, match="gave up after 4 attempts; last error: APIConnectionError"):
        baseline.ask(client, "hello", settings, sleep=sleeps.append)
    assert len(sleeps) == 3
    for retry, delay in enumerate(sleeps):
        assert 0.01 * 2 ** retry * 0.5 <= delay <= 0.01 * 2 ** retry


def test_backoff_is_capped_and_honours_retry_after():
    settings = baseline.Settings(model="m", retry_base_delay=1.0, max_retry_delay=10.0)
    assert 4.0 <= baseline.backoff_delay(3, settings) <= 8.0
    assert baseline.backoff_delay(20, settings) == 10.0
    assert baseline.backoff_delay(0, settings, server_hint=5.0) == 5.0
    assert baseline.backoff_delay(0, settings, server_hint=500.0) == 10.0


def test_interactive_mode(server, api_key, monkeypatch, capsys):
    lines = iter(["医生: 哪里不舒服？", "患者: 头疼 ZZZZ", "", "quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert baseline.main(["--base_url", server.base_url, "--retry_base_delay", "0.001"]) == 0
    out = capsys.readouterr().out
    assert json.dumps(["ZZZZ"], ensure_ascii=False, indent=2).replace("\n", "\n  ") in out  # pretty-printed
    assert server.bodies[0]["messages"][1]["content"] == INSTRUCTION + dialogue("ZZZZ")
    assert SECRET not in out


def test_interactive_failure_keeps_the_loop_going(server, api_key, monkeypatch, capsys):
    lines = iter(["患者: REFUSE400", "", "患者: 头疼 YYYY", "", "exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert baseline.main(["--base_url", server.base_url, "--retry_base_delay", "0.001"]) == 0
    captured = capsys.readouterr()
    assert "request failed: HTTP 400" in captured.err
    assert '"YYYY"' in captured.out


def test_flags_are_validated(api_key, tmp_path):
    for argv in (["--concurrency", "0"], ["--timeout", "0"], ["--max_retries", "-1"], ["--max_tokens", "0"],
                 ["--input_file", str(tmp_path / "missing.jsonl")]):
        with pytest.raises(SystemExit):
            baseline.parse_args(argv)
    args = baseline.parse_args([])
    assert (args.model, args.concurrency, args.timeout, args.max_retries, args.temperature, args.max_tokens,
            args.output_file) == ("gpt-4o-mini", 4, 60.0, 5, 0.0, 512, "predictions_openai.jsonl")
    assert isinstance(openai.OpenAI, type)


def test_stop_event_prevents_further_attempts(server, api_key):
    client = baseline.build_client(server.base_url, timeout=2.0)
    stop = threading.Event()
    stop.set()
    with pytest.raises(baseline.RequestFailed, match="cancelled"):
        baseline.ask(client, "hello", baseline.Settings(model="m"), stop=stop)
    assert server.bodies == []


def test_ctrl_c_keeps_the_answers_in_flight_and_sends_nothing_more(server, api_key, tmp_path, capsys):
    """Ctrl-C while two requests are out: nothing new is sent, the two (paid for) answers are waited for and
    written, and a rerun asks for the rest only."""
    write_input(tmp_path / "in.jsonl", ["AAAA", "BBBB", "CCCC", "DDDD"])
    server.delay = 1.0
    # Ctrl-C raises KeyboardInterrupt, also where the suite was started with SIGINT ignored (in the background of a
    # non-interactive shell, which Python then leaves ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        assert run(server, tmp_path, "--concurrency", "2") == 130
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert "waiting for the 2 requests in flight" in err and "rerun the same command to resume" in err
    assert sorted(read_output(tmp_path / "out.jsonl")) == [0, 1] and len(server.bodies) == 2
    server.delay = 0.0
    assert run(server, tmp_path) == 0
    assert sorted(read_output(tmp_path / "out.jsonl")) == [0, 1, 2, 3] and server.count("CCCC") == 1


def test_a_second_ctrl_c_leaves_at_once(server, tmp_path):
    write_input(tmp_path / "in.jsonl", ["AAAA", "BBBB"])
    server.delay = 30.0
    env = {**os.environ, "OPENAI_API_KEY": SECRET, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "test_openai.py"), *run_flags(server, tmp_path), "--timeout", "60"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal has it
    deadline = time.monotonic() + 60
    while len(server.bodies) < 2 and time.monotonic() < deadline:  # both requests out
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    while "waiting for the 2 requests" not in (line := proc.stderr.readline()) and line:
        pass
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and time.monotonic() - start < 10  # not the 30 s the server takes
    assert "left without them" in err and "Traceback" not in err and SECRET not in out + err


@pytest.fixture(scope="module")
def vocabulary(tokenizer):
    from medextract.grammar import build_vocabulary

    return build_vocabulary(tokenizer)


@pytest.fixture
def one_vocabulary(vocabulary, monkeypatch):
    """GrammarChecker's vocabulary (Qwen's, the conftest tokenizer's), built once for this module: it takes seconds."""
    monkeypatch.setattr("medextract.grammar.build_vocabulary", lambda tokenizer: vocabulary)


def test_constraint_sends_the_grammar_and_counts_answers_that_break_it(server, api_key, tmp_path, capfd,
                                                                        one_vocabulary):
    """--constraint grounded: each request carries its dialogue's grammar as vLLM takes it; this server ignores it
    (as a server that does not know the field may), so the answers that break it are flagged and counted."""
    write_input(tmp_path / "in.jsonl", ["OBEYS", "IGNORES"])
    assert run(server, tmp_path, "--constraint", "grounded") == 0
    grammars = {b["messages"][-1]["content"]: b["structured_outputs"]["grammar"] for b in server.bodies}
    for marker in ("OBEYS", "IGNORES"):
        assert grammars["请抽取要素：\n" + dialogue(marker)] == build_ebnf(dialogue(marker), "grounded")
    out = read_output(tmp_path / "out.jsonl")
    assert (out[0]["follows_grammar"], out[1]["follows_grammar"]) == (True, False)
    assert "1 of 2 answers broke the grounded grammar they were sent" in capfd.readouterr().out
    with open(tmp_path / "out.jsonl.settings.json", encoding="utf-8") as f:
        assert json.load(f)["constraint"] == "grounded"
    # the default sends no grammar (OpenAI takes none) and records no check
    write_input(tmp_path / "in.jsonl", ["OBEYS"])
    server.bodies.clear()
    assert baseline.main([*run_flags(server, tmp_path)[:-4], "--output_file", str(tmp_path / "free.jsonl"),
                          "--retry_base_delay", "0.001"]) == 0
    assert "structured_outputs" not in server.bodies[0]
    assert "follows_grammar" not in read_output(tmp_path / "free.jsonl")[0]


# a field the chapter does not have, one it has, and a text field (tests/test_schema.py's)
THREE = {"fields": [{"name": "症状", "kind": "spans"}, {"name": "药品名称", "kind": "spans"},
                    {"name": "诊断结果", "kind": "text"}]}


def test_a_schema_of_ones_own_drives_the_prompt_grammar_record_and_scoring(server, api_key, tmp_path, capsys,
                                                                            one_vocabulary):
    """--schema: bare {input} records get its instruction, the grammar sent is its fields', the settings file records
    it, and evaluate.py (no --schema) scores the file on exactly its fields."""
    (tmp_path / "three.json").write_text(json.dumps(THREE, ensure_ascii=False), encoding="utf-8")
    schema = load_schema(str(tmp_path / "three.json"))
    with open(tmp_path / "in.jsonl", "w", encoding="utf-8") as f:  # bare dialogues with gold answers: also the gold
        for marker in ("AAAA", "BBBB"):
            gold = {"症状": ["头疼"], "药品名称": [marker], "诊断结果": "感冒"}
            f.write(json.dumps({"input": dialogue(marker), "output": format_output(gold, schema.fields)},
                               ensure_ascii=False) + "\n")
    assert run(server, tmp_path, "--schema", str(tmp_path / "three.json"), "--constraint", "schema") == 0
    for body in server.bodies:
        text = body["messages"][1]["content"]
        assert text.startswith(schema.instruction) and text != INSTRUCTION + text[len(schema.instruction):]
        assert body["structured_outputs"]["grammar"] == build_ebnf(text[len(schema.instruction):], "schema",
                                                                   schema.fields)
    with open(tmp_path / "out.jsonl.settings.json", encoding="utf-8") as f:
        assert json.load(f)["schema"] == schema.to_json()
    capsys.readouterr()
    assert evaluate.main(["--gold", str(tmp_path / "in.jsonl"), "--pred", str(tmp_path / "out.jsonl"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["fields"]) == ["症状", "药品名称", "诊断结果"]
    assert report["fields"]["药品名称"]["f1"] == 1.0 and report["fields"]["症状"]["recall"] == 0.0


def test_a_results_file_is_resumed_with_the_schema_it_was_begun_with(server, api_key, tmp_path):
    """Records with an instruction of their own ask the same prompt under any schema, so only the settings file
    tells a file begun with the chapter's fields from one begun with others; either way round, nothing is asked."""
    (tmp_path / "three.json").write_text(json.dumps(THREE, ensure_ascii=False), encoding="utf-8")
    write_input(tmp_path / "in.jsonl", ["AAAA", "BBBB"])
    for first, then in (([], ["--schema", str(tmp_path / "three.json")]), (["--schema", str(tmp_path / "three.json")],
                                                                             [])):
        assert run(server, tmp_path, *first) == 0
        kept = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()[0] + "\n"
        (tmp_path / "out.jsonl").write_text(kept, encoding="utf-8")  # one answer missing: a rerun would ask for it
        asked = len(server.bodies)
        with pytest.raises(SystemExit, match=r"out\.jsonl was begun with other settings \(schema .*症状"):
            run(server, tmp_path, *then)
        assert len(server.bodies) == asked
        for path in (tmp_path / "out.jsonl", tmp_path / "out.jsonl.settings.json"):
            path.unlink()


def test_a_bad_schema_file_is_one_line(server, api_key, tmp_path):
    (tmp_path / "bad.json").write_text('{"fields": [{"name": "症状", "kind": "span"}]}', encoding="utf-8")
    for path, words in ((tmp_path / "bad.json", 'field 1 \\(症状\\): unknown kind "span"'),
                        (tmp_path / "none.json", "no such file")):
        with pytest.raises(SystemExit, match=rf"^test_openai\.py: error: --schema .*{path.name}: {words}[^\n]*$"):
            baseline.main(["--base_url", server.base_url, "--schema", str(path)])
    assert server.bodies == []


def test_interactive_mode_with_a_schema(server, api_key, tmp_path, monkeypatch, capsys):
    (tmp_path / "three.json").write_text(json.dumps(THREE, ensure_ascii=False), encoding="utf-8")
    lines = iter(["患者: 头疼 ZZZZ", "", "quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert baseline.main(["--base_url", server.base_url, "--schema", str(tmp_path / "three.json")]) == 0
    assert server.bodies[0]["messages"][1]["content"] == load_schema(str(tmp_path / "three.json")).instruction + \
        "患者: 头疼 ZZZZ\n"
    shown = capsys.readouterr().out  # read with the schema's fields: the missing 症状 is shown empty
    assert json.dumps({"症状": [], "药品名称": ["ZZZZ"], "诊断结果": "感冒"}, ensure_ascii=False, indent=2) in shown


class EchoingServer:
    """A server, or proxy, that quotes the request's Authorization header back: in a 401's error message (ECHO401),
    in every 503's (ECHO503, retried until the client gives up) and in an answer (ECHOANSWER). SURROGATE gets an
    answer holding a JSON \\ud800 escape, half of a surrogate pair."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                auth = self.headers.get("Authorization", "")
                dialogue_text = body["messages"][-1]["content"]
                if "ECHO401" in dialogue_text:
                    return self.reply(401, json.dumps({"error": {"message": f"bad header Authorization: {auth}; "
                                                                            f"key {auth.split()[-1]} revoked"}}))
                if "ECHO503" in dialogue_text:
                    return self.reply(503, json.dumps({"error": {"message": f"upstream refused {auth!r}"}}))
                if "ECHOANSWER" in dialogue_text:
                    content = f"```json\n{{\"药品名称\": [\"{auth}\"]}}\n```"
                    return self.reply(200, completion(body["model"], content).decode())
                # SURROGATE: the escape goes into the JSON text as is (json.dumps would double its backslash)
                answer = completion(body["model"], "ANSWER").decode()
                return self.reply(200, answer.replace("ANSWER", r'{\"药品名称\": [\"\ud800布洛芬\"]}'))

            def reply(self, status, text):
                payload = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_port}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def test_the_key_is_scrubbed_from_everything_printed_or_written(api_key, tmp_path, capfd, monkeypatch):
    """A server that echoes the Authorization header (in an error, a retried error or an answer) never gets the key
    onto the terminal or into the results file; an answer with a lone surrogate is written, not a crash."""
    echo = EchoingServer()
    try:
        write_input(tmp_path / "in.jsonl", ["ECHO401", "ECHO503", "ECHOANSWER", "SURROGATE"])
        assert run(echo, tmp_path, "--max_retries", "1") == 1  # two failures
        captured = capfd.readouterr()
        assert "bad header Authorization: Bearer [redacted]; key [API key] revoked" in captured.err  # id 0
        assert "gave up after 2 attempts; last error: HTTP 503: Error code: 503 - upstream refused 'Bearer " \
               "[redacted]'" in captured.err  # id 1
        out = read_output(tmp_path / "out.jsonl")
        assert sorted(out) == [2, 3]
        assert json.loads(out[2]["output"].strip("`\njson")) == {"药品名称": ["Bearer [redacted]"]}
        assert out[3]["output"] == '{"药品名称": ["\ufffd布洛芬"]}'
        assert_no_leak(tmp_path, captured)

        lines = iter(["患者: ECHO401", "", "患者: ECHOANSWER", "", "quit"])
        monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
        assert baseline.main(["--base_url", echo.base_url, "--max_retries", "0"]) == 0
        captured = capfd.readouterr()
        assert "request failed: HTTP 401" in captured.err and "Bearer [redacted]" in captured.out
        assert SECRET not in captured.out + captured.err
    finally:
        echo.close()


def test_scrub_leaves_placeholder_keys_and_other_text_alone():
    assert baseline.scrub("Authorization: bearer abc.def-123, then text", "none") == \
        "Authorization: Bearer [redacted], then text"
    assert baseline.scrub("none of the above", "none") == "none of the above"  # a placeholder is no secret
    assert baseline.scrub(f"x{SECRET}y", SECRET) == "x[API key]y"
