"""The OpenAI-compatible judge (through the openai client) against a real HTTP server on 127.0.0.1
started by the test."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest
from omegaconf import OmegaConf

from explain_prune.benchmarks import (
    BENCHMARKS,
    FakeJudge,
    OpenAICompatibleJudge,
    Record,
    build_judge,
)
from explain_prune.benchmarks.judge import cache_key
from explain_prune.core import InputError, default_file_mode

SECRET = "sk-test-DO-NOT-LEAK-5c1f0e"
KEY_ENV = "EXPLAIN_PRUNE_TEST_JUDGE_KEY"
CONF = Path(__file__).resolve().parents[1] / "conf"


class ChatHandler(BaseHTTPRequestHandler):
    """Speaks POST /v1/chat/completions; each request takes the next behaviour from the server's
    script (default "ok")."""

    timeout = 5  # an idle connection cannot hold a handler thread for long

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        with srv.lock:
            headers = {k.lower(): v for k, v in self.headers.items()}
            srv.seen.append({"path": self.path, "headers": headers, "body": body})
            action = srv.script.pop(0) if srv.script else "ok"
        if self.path != "/v1/chat/completions":
            return self._send(404, b'{"error": "not found"}')
        if action == "sleep":  # longer than the client's timeout; wakes early when the test ends
            srv.stop.wait(2.0)
            action = "ok"
        if action in ("ok", "echo_auth"):
            content = srv.reply_fn(body["messages"][-1]["content"], body.get("temperature"))  # the user turn
            if action == "echo_auth":  # a server that repeats the credentials it was sent
                content = f"{content} (you sent {self.headers.get('Authorization', '')})"
            message = {"role": "assistant", "content": content}
            payload = {"id": "x", "model": body["model"], "choices": [{"index": 0, "message": message}]}
            return self._send(200, json.dumps(payload).encode())
        if action == "malformed":
            return self._send(200, b"<html>upstream proxy error</html>", "text/html")
        if action == "no_choices":
            return self._send(200, b'{"object": "chat.completion", "choices": []}')
        if action == "500":
            return self._send(500, b'{"error": "overloaded"}')
        if action == "429":
            return self._send(429, b'{"error": "rate limited"}')
        if action == "401":  # some servers echo the key they were sent
            auth = self.headers.get("Authorization", "")
            return self._send(401, json.dumps({"error": f"Incorrect API key provided: {auth}"}).encode())
        raise AssertionError(f"unknown action {action}")


def default_reply(prompt: str, temperature) -> str:
    """Deterministic grade in [0, 1] from the prompt, so it parses as an MM-Vet score."""
    return f"{int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 11 / 10:.1f}"


@pytest.fixture
def retry_sleeps(monkeypatch):
    """The openai client's pauses between its own retries (0.5 s and up in the real client), shortened
    and recorded: a retry taken by the client itself shows up here."""
    sleeps: list[int] = []

    def short(self, remaining_retries, *args, **kwargs):
        sleeps.append(remaining_retries)
        return 0.01

    monkeypatch.setattr(openai.OpenAI, "_calculate_retry_timeout", short)
    return sleeps


@pytest.fixture
def make_server(monkeypatch, retry_sleeps):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv(KEY_ENV, SECRET)
    servers: list = []
    yield lambda: _start_server(servers)
    for srv, thread, guard in servers:
        guard.cancel()
        srv.stop.set()
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture
def server(make_server):
    return make_server()


def _start_server(servers: list):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), ChatHandler)
    srv.daemon_threads = True
    srv.lock = threading.Lock()
    srv.seen, srv.script, srv.stop = [], [], threading.Event()
    srv.reply_fn = default_reply
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    guard = threading.Timer(60.0, srv.shutdown)  # bound: the server stops itself if a test hangs
    guard.daemon = True
    guard.start()
    servers.append((srv, thread, guard))
    return srv


def make_judge(srv, tmp_path=None, **kw) -> OpenAICompatibleJudge:
    opts = dict(base_url=srv.url, model="judge-x", api_key_env=KEY_ENV, timeout=2.0, max_retries=2)
    if tmp_path is not None:
        opts["cache_dir"] = tmp_path / "judge_cache"
    opts.update(kw)
    return OpenAICompatibleJudge(**opts)


def test_success_request_shape(server):
    judge = make_judge(server)
    reply = judge.complete("grade this", temperature=0.5, max_tokens=3)
    assert reply.ok and reply.text == default_reply("grade this", 0.5) and reply.attempts == 1
    (req,) = server.seen
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["authorization"] == f"Bearer {SECRET}"
    assert req["body"] == {"model": "judge-x", "messages": [{"role": "user", "content": "grade this"}],
                           "temperature": 0.5, "max_tokens": 3}
    # a full ".../chat/completions" URL is used as is; no key env -> no Authorization header
    judge2 = make_judge(server, base_url=server.url + "/chat/completions", api_key_env=None)
    assert judge2.complete("x").ok
    assert server.seen[-1]["path"] == "/v1/chat/completions"
    assert "authorization" not in server.seen[-1]["headers"]
    assert server.seen[-1]["body"]["temperature"] == 0.0 and "max_tokens" not in server.seen[-1]["body"]


def test_malformed_reply_is_retried_then_recorded(server):
    judge = make_judge(server, max_retries=2)
    server.script = ["malformed", "no_choices", "malformed"]
    reply = judge.complete("p")
    assert not reply.ok and reply.text is None and reply.attempts == 3
    assert "malformed reply" in reply.error
    assert len(server.seen) == 3
    server.script = ["malformed"]  # one bad reply, then a good one
    reply = judge.complete("p")
    assert reply.ok and reply.attempts == 2 and len(server.seen) == 5


def test_timeout_is_retried_then_recorded(server):
    judge = make_judge(server, timeout=0.3, max_retries=1)
    server.script = ["sleep", "sleep"]
    start = time.monotonic()
    reply = judge.complete("slow")
    assert not reply.ok and "timeout" in reply.error and reply.attempts == 2
    assert len(server.seen) == 2 and time.monotonic() - start < 3.0
    server.script = ["sleep"]  # times out once, the retry succeeds
    reply = judge.complete("slow")
    assert reply.ok and reply.attempts == 2


def test_http_errors_retry_policy_and_key_redaction(server):
    judge = make_judge(server, max_retries=2)
    server.script = ["500", "500"]
    assert judge.complete("p").ok and len(server.seen) == 3  # 5xx is retried
    server.script = ["401"]
    reply = judge.complete("p")
    assert not reply.ok and reply.attempts == 1 and len(server.seen) == 4  # 401 is not retried
    assert "HTTP 401" in reply.error and SECRET not in reply.error and "***" in reply.error


def test_mmvet_through_http_cache_makes_rerun_request_free(server, tmp_path):
    records = lambda: [  # noqa: E731
        Record(id="1", prediction="a cat", answer="cat", meta={"question": "What animal?", "category": "rec"}),
        Record(id="2", prediction="x = 3", answer="3<AND>5", meta={"question": "x?", "category": "rec,math"}),
        Record(id="3", prediction="seven", answer="7<OR>seven", meta={"question": "How many?", "category": "ocr"}),
    ]
    bench = BENCHMARKS["mmvet"]()
    first_records = records()
    first = bench.score(first_records, judge=make_judge(server, tmp_path))
    assert len(server.seen) == 3  # one parsable reply per item
    assert first["judge"]["model"] == "judge-x" and first["judge"]["type"] == "openai_compatible"
    expected = [float(default_reply(r["body"]["messages"][0]["content"], 0.0)) for r in server.seen]
    assert [r.meta["judge_score"] for r in first_records] == expected
    assert first["overall"] == pytest.approx(100 * sum(expected) / 3)

    # rerun with a fresh judge on the same cache, and a server that would now answer differently
    server.reply_fn = lambda prompt, temperature: "0.0"
    second_judge = make_judge(server, tmp_path)
    second_records = records()
    second = bench.score(second_records, judge=second_judge)
    assert len(server.seen) == 3  # zero new requests
    assert second_judge.cache_hits == 3 and second_judge.requests_sent == 0
    assert second == first
    assert [r.meta["judge_score"] for r in second_records] == expected

    # the key is in no cache file and not in repr/describe
    files = sorted((tmp_path / "judge_cache").rglob("*"))
    entries = [p for p in files if p.is_file()]
    assert len(entries) == 3 and all(p.suffix == ".json" for p in entries)  # no temp files left
    for p in entries:
        text = p.read_text()
        assert SECRET not in text
        assert json.loads(text)["model"] == "judge-x"
    assert SECRET not in repr(second_judge) and "<redacted>" in repr(second_judge)
    assert SECRET not in json.dumps(second_judge.describe())


def test_mmvet_through_http_timeout_is_a_recorded_failure_and_not_cached(server, tmp_path):
    bench = BENCHMARKS["mmvet"]()
    recs = [
        Record(id="1", prediction="a", answer="a", meta={"question": "q1", "category": "rec"}),
        Record(id="2", prediction="b", answer="b", meta={"question": "q2", "category": "rec"}),
    ]
    server.script = ["sleep", "sleep"]  # item 1: both attempts time out; item 2 answers
    out = bench.score(recs, judge=make_judge(server, tmp_path, timeout=0.3, max_retries=1))
    assert out["judge_failed"] == 1 and recs[0].meta["judge_score"] == 0.0
    assert "timeout" in recs[0].meta["judge_log"][-1]
    assert len(server.seen) == 3
    # the failure was not cached: a rerun asks again for item 1 only
    bench.score(recs, judge=make_judge(server, tmp_path))
    assert len(server.seen) == 4
    assert server.seen[-1]["body"]["messages"][0]["content"].endswith("\nq1 | a | a | ")


def test_cache_key_covers_temperature_and_damaged_entries_are_misses(server, tmp_path):
    judge = make_judge(server, tmp_path)
    judge.complete("same prompt", temperature=0.0)
    judge.complete("same prompt", temperature=0.0)
    judge.complete("same prompt", temperature=0.5)  # MM-Vet's retry must not hit the first reply
    assert len(server.seen) == 2
    entries = (tmp_path / "judge_cache").rglob("*.json")
    (entry,) = [p for p in entries if json.loads(p.read_text())["temperature"] == 0.0]
    entry.write_text("{ truncated")
    assert make_judge(server, tmp_path).complete("same prompt", temperature=0.0).ok
    assert len(server.seen) == 3 and json.loads(entry.read_text())["reply"]


def test_system_prompt_is_a_system_message_and_part_of_the_cache_key(server, tmp_path):
    counter = iter(range(1, 100))
    server.reply_fn = lambda prompt, temperature: f"reply-{next(counter)}"  # each request answers differently
    strict, lenient = "You are a strict grader.", "You are a lenient grader."
    assert make_judge(server, tmp_path).complete("grade").text == "reply-1"
    assert server.seen[-1]["body"]["messages"] == [{"role": "user", "content": "grade"}]
    judge = make_judge(server, tmp_path, system_prompt=strict)
    assert judge.complete("grade").text == "reply-2"  # not the cached plain reply
    assert server.seen[-1]["body"]["messages"] == [
        {"role": "system", "content": strict}, {"role": "user", "content": "grade"}]
    assert make_judge(server, tmp_path, system_prompt=lenient).complete("grade").text == "reply-3"
    assert len(server.seen) == 3
    # a rerun with each configuration is served from its own cache entry: no request sent
    again = [make_judge(server, tmp_path, system_prompt=sp).complete("grade") for sp in (strict, None, lenient)]
    assert [(r.text, r.cached) for r in again] == [("reply-2", True), ("reply-1", True), ("reply-3", True)]
    assert len(server.seen) == 3
    entries = [json.loads(p.read_text()) for p in (tmp_path / "judge_cache").rglob("*.json")]
    systems = sorted(m["content"] for e in entries for m in e["messages"] if m["role"] == "system")
    assert systems == [lenient, strict] and all(e["messages"][-1] == {"role": "user", "content": "grade"} for e in entries)
    assert judge.describe()["system_prompt"] == strict
    # the key: sha256 of the sorted-key JSON of endpoint, model, messages and sampling settings
    user = [{"role": "user", "content": "grade"}]
    request = {"base_url": judge.url, "max_tokens": None, "messages": user, "model": "judge-x", "temperature": 0.0}
    expected = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
    assert cache_key(judge.url, "judge-x", user, 0.0, None) == expected
    assert (tmp_path / "judge_cache" / expected[:2] / f"{expected}.json").is_file()
    # from the config group: null by default, text when set; empty text is refused
    cfg = OmegaConf.load(CONF / "judge" / "openai_compatible.yaml")
    cfg.update({"base_url": server.url, "api_key_env": None, "cache_dir": None})
    assert build_judge(cfg).system_prompt is None
    cfg.system_prompt = strict
    assert build_judge(cfg).system_prompt == strict
    with pytest.raises(InputError, match="system_prompt"):
        make_judge(server, system_prompt="  ")


def test_missing_key_env_is_an_input_error(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(InputError, match=KEY_ENV):
        OpenAICompatibleJudge(base_url="http://127.0.0.1:9/v1", model="m", api_key_env=KEY_ENV)


def test_build_judge_from_configs(monkeypatch, tmp_path):
    assert build_judge(OmegaConf.load(CONF / "judge" / "none.yaml")) is None
    assert build_judge(None) is None
    fake = build_judge(OmegaConf.load(CONF / "judge" / "fake.yaml"))
    assert isinstance(fake, FakeJudge) and fake.describe()["type"] == "fake"
    a, b = fake.complete("p"), fake.complete("p")
    assert a.text == b.text and a.ok  # deterministic
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("OPENAI_API_BASE", "http://127.0.0.1:9/v1")
    cfg = OmegaConf.load(CONF / "judge" / "openai_compatible.yaml")
    cfg.cache_dir = str(tmp_path / "c")
    judge = build_judge(cfg)
    assert isinstance(judge, OpenAICompatibleJudge)
    assert judge.url == "http://127.0.0.1:9/v1/chat/completions" and judge.model == "gpt-4-turbo"
    assert SECRET not in repr(judge)
    with pytest.raises(InputError, match="unknown judge"):
        build_judge({"name": "gpt"})
    with pytest.raises(InputError, match=r"judge.api_key: unknown key \(allowed: api_key_env, ") as err:
        build_judge({"name": "openai_compatible", "base_url": "http://x", "model": "m", "api_key": SECRET})
    assert SECRET not in str(err.value)  # the error names the key, never its value


def test_base_url_is_part_of_the_cache_key(make_server, tmp_path):
    """Another server's grades are not reused: the second server still gets asked."""
    first, second = make_server(), make_server()
    second.reply_fn = lambda prompt, temperature: "second"
    assert make_judge(first, tmp_path).complete("grade").text == default_reply("grade", 0.0)
    reply = make_judge(second, tmp_path).complete("grade")
    assert (reply.text, reply.cached, len(first.seen), len(second.seen)) == ("second", False, 1, 1)
    # the same endpoint written as ".../v1" or in full shares its entries
    again = make_judge(second, tmp_path, base_url=second.url + "/chat/completions/").complete("grade")
    assert (again.text, again.cached, len(second.seen)) == ("second", True, 1)
    assert len(list((tmp_path / "judge_cache").rglob("*.json"))) == 2


def test_echoed_key_is_redacted_in_reply_and_cache(server, tmp_path):
    server.script = ["echo_auth"]
    reply = make_judge(server, tmp_path).complete("grade")
    assert reply.ok and SECRET not in reply.text and reply.text.endswith("(you sent Bearer ***)")
    (entry,) = (tmp_path / "judge_cache").rglob("*.json")
    assert SECRET not in entry.read_text() and json.loads(entry.read_text())["reply"] == reply.text
    cached = make_judge(server, tmp_path).complete("grade")
    assert cached.cached and cached.text == reply.text and len(server.seen) == 1


def test_cache_entries_get_the_umask_mode(server, tmp_path):
    """Readable by the other users of a shared cache (mkstemp alone leaves 0600)."""
    assert make_judge(server, tmp_path).complete("grade").ok
    (entry,) = (tmp_path / "judge_cache").rglob("*.json")
    assert entry.stat().st_mode & 0o777 == default_file_mode()
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temp file left


def test_missing_openai_package_is_a_one_line_input_error(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    monkeypatch.setitem(sys.modules, "openai", None)  # `import openai` now raises ImportError
    with pytest.raises(InputError) as err:
        OpenAICompatibleJudge(base_url="http://127.0.0.1:9/v1", model="m", api_key_env=KEY_ENV)
    assert str(err.value) == "judge=openai_compatible needs the openai package: pip install 'explain_prune[judge]'"
    assert isinstance(build_judge(OmegaConf.load(CONF / "judge" / "fake.yaml")), FakeJudge)  # needs no openai


def test_5xx_and_429_are_retried_by_the_openai_client(server, retry_sleeps):
    judge = make_judge(server, max_retries=2)
    server.script = ["500"]
    reply = judge.complete("p")
    assert reply.ok and reply.attempts == 2 and len(server.seen) == 2 and judge.requests_sent == 2
    assert retry_sleeps == [2]  # the client paced one retry of its own, with 2 retries left
    assert server.seen[1]["body"] == server.seen[0]["body"] and server.seen[1]["body"]["messages"][-1]["content"] == "p"
    server.script = ["429", "500", "500"]  # one more failure than the budget: recorded, not raised
    reply = judge.complete("q")
    assert not reply.ok and reply.attempts == 3 and "HTTP 500" in reply.error and len(server.seen) == 5


def test_no_key_never_falls_back_to_openai_api_key(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    assert make_judge(server, api_key_env=None).complete("x").ok
    assert "authorization" not in server.seen[-1]["headers"]
    assert SECRET not in json.dumps(server.seen[-1])
