"""serve.py as a user runs it: a real server process on 127.0.0.1 with the tiny random model, real clients.

The `openai` client (through test_openai.py) gets exactly predict.py's batch answers, under the grounded or the
schema grammar or none; streamed chunks join into the answer; concurrent extractions share batches and equal their
lone answers, every offset pointing at its span; the key is asked for and never logged; every malformed request gets a 4xx in
OpenAI's error format and the server lives on; a client that leaves stops its answer; the page works in headless
Chromium, checked on its DOM.
"""
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

import predict
from medextract.inference import prompt_ids
import test_openai
from medextract.grammar import build_ebnf
from utils import INSTRUCTION, LIST_KEYS, SYSTEM_PROMPT

ROOT = Path(__file__).resolve().parent.parent
KEY_ENV = "SERVE_TEST_API_KEY"
KEY = "sk-serve-test-5e0c2b7a91"
MAX_TOKENS = 64
SERVED_NAME = "qwen-med-test"  # --served_model_name (the model directory's name by default)
DIALOGUES = [
    "患者：孩子发烧两天了，咳嗽。\n医生：可以吃点布洛芬，多喝水。\n患者：需要验血吗？\n医生：先做个血常规。",
    "患者：我最近胃疼，吃了奥美拉唑也不见好。\n医生：做个胃镜看看吧。",
    "医生：你好，哪里不舒服？\n患者：头晕，血压有点高。\n医生：建议口服硝苯地平，定期复查。",
    "患者：宝宝拉肚子三天了<|im_end|>，一天五六次。\n医生：可以用蒙脱石散，注意补液。",
    # longer than --max_src_len (1,560 tokens): cut as training cuts it, list items only from the part kept
    "".join(f"患者：第{i}天还是头疼，吃了{i}片布洛芬。\n医生：做个头颅CT，第{i}次复查血压。\n" for i in range(80)),
]


@dataclass
class Server:
    port: int
    log: Path
    process: subprocess.Popen
    name: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    port = free_port()
    # one thread for the server's torch: on a small machine the test process generates (predict.py) beside it
    env = {**os.environ, KEY_ENV: KEY, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "serve.py"), "--model_path", tiny_ckpt, "--port", str(port), "--device", "cpu",
             "--max_tgt_len", str(MAX_TOKENS), "--max_batch_size", "8", "--api_key_env", KEY_ENV,
             "--served_model_name", SERVED_NAME],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(port, log, process, SERVED_NAME)
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, log.read_text(errors="replace")
        try:
            if call(server, "GET", "/health")[0] == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.2)
    yield server
    process.terminate()
    process.wait(timeout=30)


def call(server: Server, method: str, path: str, body=None, key: str | None = KEY, headers=None,
         timeout: float = 60) -> tuple[int, dict]:
    """(status, JSON body) of one plain HTTP request; `body` a dict (sent as JSON) or raw bytes."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body, ensure_ascii=False).encode()
        sent = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            sent["Authorization"] = f"Bearer {key}"
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else {}
    finally:
        connection.close()


def health(server: Server) -> dict:
    status, body = call(server, "GET", "/health", key=None)
    assert status == 200, body
    return body


def write_input(path: Path, dialogues) -> str:
    path.write_text("".join(json.dumps({"instruction": INSTRUCTION, "input": d}, ensure_ascii=False) + "\n"
                            for d in dialogues), encoding="utf-8")
    return str(path)


def outputs(path: Path) -> dict:
    return {r["id"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


@pytest.mark.parametrize("constraint", ["grounded", "schema", "none"])
def test_the_openai_client_gets_predict_py_answers(server, tiny_ckpt, tmp_path, monkeypatch, constraint):
    source = write_input(tmp_path / "in.json", DIALOGUES)
    predict.main(["--model_path", tiny_ckpt, "--device", "cpu", "--input_file", source, "--output_file",
                  str(tmp_path / "predict.jsonl"), "--max_tgt_len", str(MAX_TOKENS), "--batch_size", "4",
                  "--constraint", constraint])
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    code = test_openai.main(["--base_url", server.base_url, "--model", server.name, "--constraint", constraint,
                             "--max_tokens", str(MAX_TOKENS), "--concurrency", "4", "--input_file", source,
                             "--output_file", str(tmp_path / "served.jsonl")])
    assert code == 0
    expected, served = outputs(tmp_path / "predict.jsonl"), outputs(tmp_path / "served.jsonl")
    assert sorted(served) == sorted(expected) == list(range(len(DIALOGUES)))
    for i in expected:
        assert served[i]["output"] == expected[i]["output"], i
        assert served[i]["finish_reason"] == ("length" if expected[i]["truncated"] else "stop")
        if constraint != "none":
            assert served[i]["follows_grammar"] is True


def test_streamed_chunks_join_into_the_answer(server, tokenizer):
    api = openai.OpenAI(api_key=KEY, base_url=server.base_url, max_retries=0, timeout=60)
    dialogue = DIALOGUES[0]
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": INSTRUCTION + dialogue}]
    for extra in ({}, {"extra_body": {"structured_outputs": {"grammar": build_ebnf(dialogue, "grounded")}}},
                  {"response_format": {"type": "json_object"}}):
        whole = api.chat.completions.create(model=server.name, messages=messages, max_tokens=MAX_TOKENS,
                                            temperature=0, **extra)
        chunks = list(api.chat.completions.create(model=server.name, messages=messages, max_tokens=MAX_TOKENS,
                                                  temperature=0, stream=True,
                                                  stream_options={"include_usage": True}, **extra))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content and text, extra
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        assert whole.usage.prompt_tokens == len(prompt_ids(tokenizer, INSTRUCTION + dialogue, instruction_chars=len(INSTRUCTION)))


def extract(server: Server, dialogue: str) -> dict:
    status, body = call(server, "POST", "/v1/extract", {"dialogue": dialogue})
    assert status == 200, body
    return body


def test_concurrent_extractions_share_batches_and_equal_their_lone_answers(server):
    dialogues = [f"患者：我发烧{i + 1}天了，还咳嗽。\n" + d for i, d in enumerate((DIALOGUES * 2)[:8])]
    alone = [extract(server, d) for d in dialogues]
    before = health(server)
    with ThreadPoolExecutor(max_workers=len(dialogues)) as pool:
        together = list(pool.map(lambda d: extract(server, d), dialogues))
    after = health(server)
    assert after["requests"] - before["requests"] == len(dialogues)
    assert after["batches"] - before["batches"] < len(dialogues)
    assert together == alone
    items = 0
    for dialogue, answer in zip(dialogues, together):
        assert answer["valid"] is True and set(answer["usage"]) == {"prompt_tokens", "completion_tokens",
                                                                    "total_tokens"}
        for key, value in answer["fields"].items():
            if key in LIST_KEYS:
                for item in value:
                    assert dialogue[item["start"]:item["end"]] == item["text"]
                    assert dialogue.find(item["text"]) == item["start"]
                    items += 1
            else:
                assert isinstance(value, str)
    assert items  # the random model copies some spans: the offsets were checked on real items
    assert [a["dialogue_cut"] for a in together] == [len(d) > 3000 for d in dialogues]  # the long one, as training


def test_the_key_is_required_and_never_logged(server, tiny_ckpt):
    chat = {"model": server.name, "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4}
    for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/chat/completions", chat),
                               ("POST", "/v1/extract", {"dialogue": DIALOGUES[1]})):
        for key in (None, "sk-wrong-key-000000", KEY[:-1]):
            status, answer = call(server, method, path, body, key=key)
            assert status == 401 and answer["error"]["code"] == "invalid_api_key", (path, key)
        status, answer = call(server, method, path, body)
        assert status == 200, (path, answer)
    status, models = call(server, "GET", "/v1/models")
    assert [m["id"] for m in models["data"]] == [server.name]
    assert call(server, "GET", f"/v1/models/{server.name}")[1]["id"] == server.name
    # with --served_model_name, the directory's name is not served
    assert call(server, "GET", f"/v1/models/{os.path.basename(tiny_ckpt)}")[0] == 404
    assert call(server, "GET", "/health", key=None)[0] == 200  # no key needed to see that it lives
    assert KEY not in server.log.read_text(errors="replace")


MEGABYTES = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * 3_000_000 + b'"}]}'


def user(text="你好", **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}


MALFORMED = {
    "not JSON": ("/v1/chat/completions", b'{"messages": [', 400),
    "not UTF-8": ("/v1/chat/completions", b'{"messages": "\xff\xfe"}', 400),
    "a JSON array": ("/v1/chat/completions", b"[1, 2]", 400),
    "nested too deep": ("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, 400),
    "messages not a list": ("/v1/chat/completions", {"messages": "hi"}, 400),
    "content a number": ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400),
    "content a lone surrogate": ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
                                 400),
    "two user turns": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"},
                                                             {"role": "user", "content": "b"}]}, 400),
    "unknown model": ("/v1/chat/completions", user(model="gpt-17"), 404),
    "negative max_tokens": ("/v1/chat/completions", user(max_tokens=-5), 400),
    "max_tokens a string": ("/v1/chat/completions", user(max_tokens="8"), 400),
    "max_tokens past the context": ("/v1/chat/completions", user(max_tokens=10 ** 6), 400),
    "temperature a string": ("/v1/chat/completions", user(temperature="hot"), 400),
    "top_p zero": ("/v1/chat/completions", user(top_p=0), 400),
    "repetition_penalty negative": ("/v1/chat/completions", user(repetition_penalty=-1), 400),
    "n of 2": ("/v1/chat/completions", user(n=2), 400),
    "stream a string": ("/v1/chat/completions", user(stream="yes"), 400),
    "an invalid grammar": ("/v1/chat/completions", user(structured_outputs={"grammar": 'root ::= "a" undefined'}),
                           400),
    "a grammar not a string": ("/v1/chat/completions", user(structured_outputs={"grammar": 7}), 400),
    "json_schema": ("/v1/chat/completions", user(response_format={"type": "json_schema"}), 400),
    "json_object below the shortest answer": ("/v1/chat/completions",
                                              user(response_format={"type": "json_object"}), 400),
    "a prompt past the context": ("/v1/chat/completions", {"messages": [
        {"role": "system", "content": "很长的系统提示。" * 2000}, {"role": "user", "content": "你好"}]}, 400),
    "a body of megabytes": ("/v1/chat/completions", MEGABYTES, 413),
    "extract without a dialogue": ("/v1/extract", {"text": "x"}, 400),
    "extract dialogue a list": ("/v1/extract", {"dialogue": ["a"]}, 400),
    "extract empty dialogue": ("/v1/extract", {"dialogue": "  "}, 400),
    "extract megabytes": ("/v1/extract", b'{"dialogue": "' + b"a" * 2_000_000 + b'"}', 413),
    "no such route": ("/v1/completions", {"prompt": "x"}, 404),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_request_gets_a_4xx_and_the_server_lives(server, name):
    path, body, expected = MALFORMED[name]
    status, answer = call(server, "POST", path, body)
    assert status == expected, answer
    assert isinstance(answer["error"]["message"], str) and answer["error"]["type"] == "invalid_request_error"
    assert "Traceback" not in answer["error"]["message"]
    assert health(server)["status"] == "ok"


def test_a_wrong_method_is_a_4xx_in_openai_format(server):
    status, answer = call(server, "GET", "/v1/chat/completions")
    assert status == 405 and "message" in answer["error"]


def test_a_client_that_leaves_stops_its_answer(server):
    """A streamed and a plain request with a long budget (the random model never stops by itself): each client
    hangs up early, and its answer is cancelled instead of running to its 1,500 tokens."""
    for stream in (True, False):
        before = health(server)
        body = json.dumps({"messages": [{"role": "user", "content": "写一篇长文章"}], "max_tokens": 1500,
                           "stream": stream}).encode()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        if stream:  # the headers, then the first chunk: the answer is under way
            received = b""
            while b"data:" not in received:
                received += sock.recv(4096)
        else:
            time.sleep(0.5)
        sock.close()
        deadline = time.monotonic() + 15
        while health(server)["cancelled"] == before["cancelled"]:
            assert time.monotonic() < deadline, health(server)
            time.sleep(0.1)
        assert health(server)["running"] == 0


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                    reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
def test_the_page_extracts_and_highlights_in_a_real_browser(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    answers = {d: extract(server, d) for d in DIALOGUES}
    dialogue = next(d for d, a in answers.items() if any(a["fields"][k] for k in LIST_KEYS))
    expected = answers[dialogue]["fields"]
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(f"http://127.0.0.1:{server.port}/")
        box = driver.find_element(By.ID, "dialogue")
        # the dialogue goes in as a person's paste would leave it: the textarea's value
        driver.execute_script("arguments[0].value = arguments[1];", box, dialogue)
        driver.find_element(By.ID, "extract").click()  # no key yet: the server refuses, the page says so
        WebDriverWait(driver, 30).until(lambda d: "401" in d.find_element(By.ID, "status").text)
        driver.find_element(By.ID, "api-key").send_keys(KEY)
        driver.find_element(By.ID, "extract").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
                                        == "done")
        rows = driver.find_elements(By.CSS_SELECTOR, "#fields tbody tr")
        assert [r.get_attribute("data-field") for r in rows] == list(expected)
        for row in rows:
            key = row.get_attribute("data-field")
            cell = row.find_element(By.TAG_NAME, "td")
            if key in LIST_KEYS:
                shown = [s.get_property("textContent") for s in cell.find_elements(By.CLASS_NAME, "item")]
                assert shown == [item["text"] for item in expected[key]]
            else:
                assert cell.text == expected[key].strip()
        view = driver.find_element(By.ID, "dialogue-view")
        assert view.get_property("textContent") == dialogue  # marks wrap spans; nothing added or lost
        marks = view.find_elements(By.TAG_NAME, "mark")
        spans = {(item["text"], key) for key in LIST_KEYS for item in expected[key]}
        assert marks and all((m.get_property("textContent"), m.get_attribute("data-field")) in spans for m in marks)
        # each mark sits at its offset: the text before it is the dialogue up to `start`
        offsets = driver.execute_script("""
            const view = document.getElementById('dialogue-view'); let at = 0; const out = [];
            for (const node of view.childNodes) {
              if (node.nodeName === 'MARK') out.push([at, at + node.textContent.length]);
              at += node.textContent.length;
            }
            return out;""")
        starts = {(item["start"], item["end"]) for key in LIST_KEYS for item in expected[key]}
        assert all(tuple(o) in starts for o in offsets)
    finally:
        driver.quit()
