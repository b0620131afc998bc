"""`mlx-flash serve` on a tiny model, on a free loopback port, driven by real HTTP clients.

The `openai` client for the API as users call it; the standard library's http.client for
malformed bodies and for hanging up mid-stream.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai")  # the test client; the server's own deps must import

import uvicorn  # noqa: E402
from mlx_lm import generate  # noqa: E402

import mlx_flash  # noqa: E402
from mlx_flash.cli import serve as serve_module  # noqa: E402
from mlx_flash.cli.serve import StopStrings, create_app  # noqa: E402
from mlx_flash.cli.serve_api import MAX_SEED, ServeSettings  # noqa: E402

PROMPT = "w1 w2 w3"


@pytest.fixture(scope="module")
def flash_dir(tiny_dirs):
    return tiny_dirs("llama")[1]  # llama: its tiny word-level tokenizer round-trips


@pytest.fixture(scope="module")
def reference(flash_dir):
    """The library's greedy output: mlx_lm.generate on a separately loaded flash model."""
    model, tokenizer = mlx_flash.load(flash_dir)

    def greedy(prompt: str, max_tokens: int) -> str:
        return generate(model, tokenizer, prompt=tokenizer.encode(prompt), max_tokens=max_tokens)

    return greedy


@pytest.fixture(scope="module")
def server(flash_dir):
    """(base url, app state) of a server running in a thread; stopped after the module."""
    model, tokenizer = mlx_flash.load(flash_dir)
    settings = ServeSettings("tiny", max_queue=1, max_body_bytes=16384, max_prompt_chars=1000)
    app = create_app(model, tokenizer, settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # a free port, held until uvicorn takes the socket over
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started, "the server did not start within 30 s"
    yield f"127.0.0.1:{port}", app.state.flash
    srv.should_exit = True
    thread.join(10)
    model.flash.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"http://{server[0]}/v1", api_key="unused", max_retries=0,
                         timeout=30)


def post(server, path: str, body: bytes) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*server[0].split(":"), timeout=30)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    out = response.status, json.loads(response.read())
    conn.close()
    return out


def health(server) -> dict:
    conn = http.client.HTTPConnection(*server[0].split(":"), timeout=10)
    conn.request("GET", "/health")
    out = json.loads(conn.getresponse().read())
    conn.close()
    return out


def wait_idle(server, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while (state := health(server))["running"] or state["waiting"]:
        assert time.monotonic() < deadline, f"the server is still busy: {state}"
        time.sleep(0.05)
    return state


# ---------------------------------------------------------------- answers


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_completion_equals_library_greedy(client, reference):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0)
    assert out.choices[0].text == reference(PROMPT, 24)
    assert out.usage.prompt_tokens == 3 and out.usage.completion_tokens == 24
    assert out.choices[0].finish_reason == "length"


def test_completion_stream_equals_library_greedy(client, reference):
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == reference(PROMPT, 24)
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_library_greedy(client, reference, stream):
    # The tiny tokenizer has no chat template: the conversation is the user's text itself.
    messages = [{"role": "user", "content": PROMPT}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24,
                                         stream=stream, temperature=0,
                                         **({"stream_options": {"include_usage": True}}
                                            if stream else {}))
    if stream:
        chunks = list(out)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].usage.completion_tokens == 24
    else:
        text = out.choices[0].message.content
        assert out.model_extra["flash"]["decode_tokens"] >= 24  # flash stats ride along
    assert text == reference(PROMPT, 24)


def test_stop_string_ends_the_answer_before_it(client, reference):
    full = reference(PROMPT, 24)
    stop = full.split()[3]
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, stop=[stop])
    assert out.choices[0].text == full[: full.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_stop_strings_hold_back_a_possible_start():
    stops = StopStrings(["END"])
    assert stops.feed("abc E") == ("abc ", False)
    assert stops.feed("N") == ("", False)
    assert stops.feed("X") == ("ENX", False)
    assert stops.feed("yE") == ("y", False)
    assert stops.feed("ND more") == ("", True)


class NaiveStopStrings:
    """The first StopStrings: every stop's every prefix checked against the text each token."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending = stops, ""

    def feed(self, text: str) -> tuple[str, bool]:
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            return buf[: min(hits)], True
        hold = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])),
                   default=0)
        self.pending = buf[len(buf) - hold:]
        return buf[: len(buf) - hold], False


def test_stop_strings_cut_where_a_full_scan_does():
    rng = random.Random(0)
    for _ in range(400):
        stops = ["".join(rng.choices("ab", k=rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        fast, naive = StopStrings(stops), NaiveStopStrings(stops)
        text = "".join(rng.choices("abc", k=40))
        while text:
            n = rng.randint(1, 4)
            piece, text = text[:n], text[n:]
            got = fast.feed(piece)
            assert got == naive.feed(piece), (stops, piece)
            if got[1]:
                break
        else:
            assert fast.flush() == naive.pending


def test_stop_check_reads_each_character_a_bounded_number_of_times():
    # The worst case for re-checking held-back text: every new "a" extends a near-match of
    # hundreds of characters (the first StopStrings did O(len(stop)^2) work per token here).
    stops = ["a" * 255 + "b", "a" * 254 + "ba", "ab" * 128, "a" * 128 + "b" * 128]
    checker, emitted = StopStrings(stops), 0
    for _ in range(4000):
        out, stopped = checker.feed("a")
        emitted += len(out)
        assert not stopped and len(checker.pending) <= 255  # held back: under a stop's length
    assert emitted == 4000 - 255
    assert checker.steps <= 2 * len(stops) * 4000  # linear in the text, whatever the stops


# ---------------------------------------------------------------- bad requests


@pytest.mark.parametrize("body, says", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"messages": [{"role": "user", "content": "w1"}], "bogus": 1}', "unknown field 'bogus'"),
    (b'{"messages": [{"role": "user", "content": "w1"}], "temperature": "hot"}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "w1"}], "max_tokens": 0}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "w1"}], "n": 2}', "'n'"),
    (b'{"messages": [{"role": "robot", "content": "w1"}]}', "role"),
    (b'{"messages": []}', "messages"),
    (b'{"messages": [{"role": "user", "content": "w1"}], "max_tokens": 999999}',
     "context"),
])
def test_malformed_requests_get_400(server, body, says):
    status, out = post(server, "/v1/chat/completions", body)
    assert status == 400, out
    assert says in out["error"]["message"]


class NoTokenizer:
    """Stands in for the tokenizer where a request must be refused before tokenizing."""

    def __getattr__(self, name):
        raise AssertionError(f"the tokenizer was used ({name}) for a request over a limit")


CHAT = [{"role": "user", "content": PROMPT}]


@pytest.mark.parametrize("path, body, param, code, says", [
    ("/v1/completions", {"prompt": PROMPT, "stop": list("abcde")}, "stop",
     "array_above_max_length", "at most 4"),
    ("/v1/completions", {"prompt": PROMPT, "stop": ["w1", "x" * 257]}, "stop",
     "string_above_max_length", "at most 256 per stop string (--max-stop-chars)"),
    ("/v1/chat/completions", {"messages": CHAT, "stop": "x" * 10_000}, "stop",
     "string_above_max_length", "--max-stop-chars"),
    ("/v1/completions", {"prompt": PROMPT, "seed": -1}, "seed", "integer_below_min_value",
     "greater than or equal to 0"),
    ("/v1/chat/completions", {"messages": CHAT, "seed": 2**70}, "seed",
     "integer_above_max_value", f"less than or equal to {MAX_SEED}"),
    ("/v1/completions", {"prompt": "w1 " * 400}, "prompt", "context_length_exceeded",
     "1200 characters; this server takes at most 1000 (--max-prompt-chars"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w1 " * 200}] * 2},
     "messages", "context_length_exceeded", "--max-prompt-chars"),
    ("/v1/completions", {"prompt": [1] * 2048}, "prompt", "context_length_exceeded",
     "2048 tokens; this server's context is 2048 (--max-kv-tokens)"),
])
def test_limits_get_400_before_tokenizing(server, monkeypatch, path, body, param, code, says):
    monkeypatch.setattr(server[1], "tokenizer", NoTokenizer())
    status, out = post(server, path, json.dumps(body).encode())
    assert status == 400, out
    assert out["error"]["param"] == param and out["error"]["code"] == code, out
    assert out["error"]["type"] == "invalid_request_error"
    assert says in out["error"]["message"]


@pytest.mark.parametrize("seed", [0, MAX_SEED])
def test_seeds_at_the_bounds_are_served(server, seed):
    status, out = post(server, "/v1/completions",
                       json.dumps({"prompt": PROMPT, "max_tokens": 2, "seed": seed,
                                   "temperature": 1.0}).encode())
    assert status == 200, out


def test_prompt_chars_default_to_eight_per_token_of_context():
    assert ServeSettings("m", max_context=100).max_prompt_chars == 800
    assert ServeSettings("m", max_context=100, max_prompt_chars=50).max_prompt_chars == 50
    with pytest.raises(ValueError, match="max_stop_chars"):
        ServeSettings("m", max_stop_chars=0)


def test_the_openai_client_sees_400_for_an_unknown_field(client):
    with pytest.raises(openai.BadRequestError, match="unknown field 'frobnicate'"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w1"}],
                                       extra_body={"frobnicate": True})


def test_oversized_body_gets_413(server):
    status, out = post(server, "/v1/completions",
                       json.dumps({"prompt": "w1 " * 6000}).encode())
    assert status == 413 and "--max-body-bytes" in out["error"]["message"]


# ---------------------------------------------------------------- the queue and disconnects


def test_queue_bound_gets_503_and_the_queued_request_is_served(server, client, reference):
    _, state = server
    gate = threading.Event()
    blocker = state.worker.submit(lambda: gate.wait(30))  # the model is now busy
    queued: dict = {}

    def ask():
        queued["out"] = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8)

    thread = threading.Thread(target=ask)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while health(server)["waiting"] < 1:  # max_queue=1: the queue is now full
            assert time.monotonic() < deadline, "the request was never queued"
            time.sleep(0.02)
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8)
        assert err.value.status_code == 503
        assert err.value.response.headers["retry-after"] == "1"
    finally:
        gate.set()
        blocker.result(10)
        thread.join(30)
    assert queued["out"].choices[0].text == reference(PROMPT, 8)
    wait_idle(server)


def test_client_gone_mid_stream_does_not_wedge_the_server(server, client, reference):
    before = wait_idle(server)
    host, port = server[0].split(":")
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                 body=json.dumps({"prompt": PROMPT, "max_tokens": 1500, "stream": True}))
    response = conn.getresponse()
    assert response.status == 200
    assert response.read(6) == b"data: "  # the first event: generation is under way
    conn.sock.shutdown(socket.SHUT_RDWR)  # hang up without reading the rest
    conn.close()
    after = wait_idle(server)
    assert after["cancelled"] == before["cancelled"] + 1  # stopped, not run to 1500 tokens
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8)
    assert out.choices[0].text == reference(PROMPT, 8)


# ---------------------------------------------------------------- tokenizing and failures


class BlockingTokenizer:
    """The real tokenizer, whose encode waits for `gate` (after setting `entered`)."""

    def __init__(self, real, gate: threading.Event):
        self.real, self.gate, self.entered = real, gate, threading.Event()

    def encode(self, *args, **kwargs):
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return self.real.encode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_health_answers_while_a_prompt_is_tokenized(server, monkeypatch, reference):
    _, state = server
    gate = threading.Event()
    stub = BlockingTokenizer(state.tokenizer, gate)
    monkeypatch.setattr(state, "tokenizer", stub)
    answer: dict = {}
    body = json.dumps({"prompt": PROMPT, "max_tokens": 8}).encode()
    thread = threading.Thread(target=lambda: answer.update(out=post(server, "/v1/completions",
                                                                    body)))
    thread.start()
    try:
        assert stub.entered.wait(10), "the request never reached the tokenizer"
        assert health(server)["status"] == "ok"  # within its 10 s timeout, the gate still shut
        assert not gate.is_set()
    finally:
        monkeypatch.setattr(state, "tokenizer", stub.real)  # the generation runs on the real one
        gate.set()
        thread.join(30)
    status, out = answer["out"]
    assert status == 200 and out["choices"][0]["text"] == reference(PROMPT, 8)


def fail_first_generation(monkeypatch, error: Exception) -> None:
    """The next generation raises `error` after its first piece of text; later ones run."""
    real, calls = serve_module.run_job, []

    def run_job(model, tokenizer, job, emit):
        calls.append(job)
        if len(calls) > 1:
            return real(model, tokenizer, job, emit)

        def emit_then_fail(text: str) -> None:
            emit(text)
            raise error

        return real(model, tokenizer, job, emit_then_fail)

    monkeypatch.setattr(serve_module, "run_job", run_job)


@pytest.mark.parametrize("error, status, code", [
    (OSError(5, "Input/output error", "ffn/layer_00.bin"), 503, "io_error"),
    (RuntimeError("a kernel failed"), 500, "model_error"),
])
def test_a_failed_generation_fails_only_its_request(server, monkeypatch, reference, error,
                                                    status, code):
    before = wait_idle(server)
    fail_first_generation(monkeypatch, error)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 8}).encode()
    got, out = post(server, "/v1/completions", body)
    assert got == status, out
    assert out["error"]["code"] == code and out["error"]["type"] == "server_error"
    assert str(error) in out["error"]["message"]  # names the cause
    got, out = post(server, "/v1/completions", body)  # the worker is still there
    assert got == 200 and out["choices"][0]["text"] == reference(PROMPT, 8)
    after = wait_idle(server)
    assert after["failed"] == before["failed"] + 1
    assert after["served"] == before["served"] + 2


def test_a_stream_failing_mid_way_ends_with_an_error_event(server, monkeypatch):
    fail_first_generation(monkeypatch, OSError(5, "Input/output error", "ffn/layer_00.bin"))
    conn = http.client.HTTPConnection(*server[0].split(":"), timeout=30)
    conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                 body=json.dumps({"prompt": PROMPT, "max_tokens": 8, "stream": True}))
    response = conn.getresponse()
    assert response.status == 200  # the headers went out before the failure
    events = [e.removeprefix("data: ") for e in response.read().decode().split("\n\n") if e]
    conn.close()
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "io_error" and "Input/output error" in error["message"]
    assert json.loads(events[0])["choices"][0]["text"]  # text came first, then the error
