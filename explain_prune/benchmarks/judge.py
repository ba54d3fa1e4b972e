"""LLM judges for benchmarks scored by a model (MM-Vet; the video QA benchmarks).

* `OpenAICompatibleJudge` — POSTs `{base_url}/chat/completions` (OpenAI, vLLM, LMDeploy, ... all
  speak it) with the standard library only. The API key is read from the environment variable
  named by `api_key_env`; it is sent as a Bearer header and nowhere else: not in the cache, not in
  `repr`, not in `describe()`, and it is masked out of any error text. Transport errors, HTTP
  429/5xx and malformed replies are retried `max_retries` times with exponential backoff; other
  HTTP errors fail at once. A failure is returned as a `JudgeReply(ok=False, error=...)`, never
  raised, so the caller records it.
* `system_prompt` (default None): when set, sent as a system message before every user message
  (VLMEvalKit and lmms-eval put their rating instructions there) and recorded in `describe()`.
* An on-disk JSON cache (one file per request under `cache_dir`, written to a temp file and renamed)
  keyed by sha256 of the request — judge model, system prompt (when set), prompt, temperature and
  max_tokens (temperature and max_tokens are part of the key because MM-Vet retries the *same*
  prompt at a higher temperature). A rerun therefore sends no request and gets the same replies.
  Only successful replies are cached.
* `FakeJudge` — deterministic and offline (tests, smoke runs). It answers with the caller's
  `fake_reply()` when given one (benchmarks supply a rule-based stand-in for the real grader), else
  with a fixed string derived from the prompt hash. Its scores are NOT the benchmark's metric;
  `describe()` says "fake" so results cannot be mistaken for judged ones.

`build_judge(cfg)` maps the `judge` config group (`none | openai_compatible | fake`) to a judge or
None.
"""

from __future__ import annotations

import abc
import hashlib
import http.client
import json
import logging
import os
import socket
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from explain_prune.core import InputError
from explain_prune.core.registry import Registry
from explain_prune.core.schema import check_mapping

log = logging.getLogger("explain_prune.judge")


@dataclass
class JudgeReply:
    """One judge answer. `ok=False` means no usable reply after all retries (see `error`)."""

    text: str | None
    ok: bool
    error: str | None = None
    cached: bool = False
    attempts: int = 0


JUDGES: Registry = Registry("judge")  # @JUDGES.register(name); "none" (no judge) is not a class


class Judge(abc.ABC):
    kind: str = ""
    model: str = ""

    @abc.abstractmethod
    def complete(
        self,
        prompt: str,
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        fake_reply: Callable[[], str] | None = None,
    ) -> JudgeReply:
        """Send one user message; `fake_reply` is only used by `FakeJudge`."""

    def describe(self) -> dict[str, Any]:
        """Recorded in results.json next to judge-based scores."""
        return {"type": self.kind, "model": self.model}


# --- cache ------------------------------------------------------------------------------------


def cache_key(
    model: str, prompt: str, temperature: float | None, max_tokens: int | None, system_prompt: str | None = None
) -> str:
    """sha256 of the request; without a system prompt the key is the one used before that option
    existed, so existing caches stay valid."""
    request: dict[str, Any] = {"model": model, "prompt": prompt, "temperature": temperature, "max_tokens": max_tokens}
    if system_prompt is not None:
        request["system_prompt"] = system_prompt
    payload = json.dumps(request, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgeCache:
    """`<dir>/<key[:2]>/<key>.json` = {"model", "temperature", "max_tokens", "prompt", "reply"} (plus
    "system_prompt" when one was sent)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        path = self._path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:  # a damaged entry is a miss; it gets rewritten
            log.warning("ignoring unreadable judge cache entry %s: %s", path, err)
            return None
        reply = entry.get("reply") if isinstance(entry, dict) else None
        return reply if isinstance(reply, str) else None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:8]}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(entry, fh, ensure_ascii=False, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# --- OpenAI-compatible HTTP judge -------------------------------------------------------------


class _Retryable(Exception):
    pass


class _Fatal(Exception):
    pass


@JUDGES.register("openai_compatible")
class OpenAICompatibleJudge(Judge):
    kind = "openai_compatible"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 2.0,
        temperature: float = 0.0,
        max_tokens: int | None = None,
        cache_dir: str | Path | None = None,
        system_prompt: str | None = None,
    ):
        if not base_url:
            raise InputError("judge base_url is empty")
        if not model:
            raise InputError("judge model is empty")
        base = str(base_url).rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.base_url = str(base_url)
        self.model = str(model)
        self.api_key_env = api_key_env or None
        self._api_key: str | None = None
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise InputError(
                    f"judge API key environment variable {self.api_key_env} is not set "
                    f"(set it, or api_key_env=null for a server without authentication)"
                )
            self._api_key = key
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.temperature = float(temperature)
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        if system_prompt is not None and not (isinstance(system_prompt, str) and system_prompt.strip()):
            raise InputError(f"judge system_prompt must be null or non-empty text, got {system_prompt!r}")
        self.system_prompt = system_prompt
        self.cache = JudgeCache(cache_dir) if cache_dir else None
        self.requests_sent = 0
        self.cache_hits = 0

    def __repr__(self) -> str:
        return (
            f"OpenAICompatibleJudge(url={self.url!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r}, api_key={'<redacted>' if self._api_key else None}, "
            f"timeout={self.timeout}, max_retries={self.max_retries}, temperature={self.temperature}, "
            f"cache={str(self.cache.directory) if self.cache else None!r})"
        )

    def describe(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "model": self.model,
            "url": self.url,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "system_prompt": self.system_prompt,
        }

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "<redacted>") if self._api_key else text

    def complete(
        self,
        prompt: str,
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        fake_reply: Callable[[], str] | None = None,
    ) -> JudgeReply:
        temp = self.temperature if temperature is None else float(temperature)
        limit = self.max_tokens if max_tokens is None else int(max_tokens)
        key = cache_key(self.model, prompt, temp, limit, self.system_prompt)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.cache_hits += 1
                return JudgeReply(text=hit, ok=True, cached=True)
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        messages.append({"role": "user", "content": prompt})
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": temp}
        if limit is not None:
            body["max_tokens"] = limit
        data = json.dumps(body).encode("utf-8")
        error = "no attempt made"
        attempts = 0
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 60.0))
            attempts += 1
            try:
                text = self._post(data)
            except _Retryable as err:
                error = self._redact(str(err))
                log.warning("judge request %d/%d failed: %s", attempt + 1, self.max_retries + 1, error)
                continue
            except _Fatal as err:
                error = self._redact(str(err))
                log.warning("judge request failed (not retried): %s", error)
                break
            if self.cache is not None:
                entry = {"model": self.model, "temperature": temp, "max_tokens": limit, "prompt": prompt, "reply": text}
                if self.system_prompt is not None:
                    entry["system_prompt"] = self.system_prompt
                self.cache.put(key, entry)
            return JudgeReply(text=text, ok=True, attempts=attempts)
        return JudgeReply(text=None, ok=False, error=error, attempts=attempts)

    def _post(self, data: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        self.requests_sent += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:300].decode("utf-8", "replace") if err.fp is not None else ""
            msg = f"HTTP {err.code} from {self.url}: {detail}"
            if err.code == 429 or err.code >= 500:
                raise _Retryable(msg) from err
            raise _Fatal(msg) from err
        except (socket.timeout, TimeoutError) as err:
            raise _Retryable(f"timeout after {self.timeout}s: {err}") from err
        except urllib.error.URLError as err:
            if isinstance(err.reason, (socket.timeout, TimeoutError)):
                raise _Retryable(f"timeout after {self.timeout}s: {err.reason}") from err
            raise _Retryable(f"connection error: {err.reason}") from err
        except (http.client.HTTPException, OSError) as err:
            raise _Retryable(f"connection error: {type(err).__name__}: {err}") from err
        try:
            payload = json.loads(raw.decode("utf-8"))
            content = payload["choices"][0]["message"]["content"]
        except (UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError) as err:
            raise _Retryable(f"malformed reply ({type(err).__name__}): {raw[:200]!r}") from err
        if not isinstance(content, str):
            raise _Retryable(f"malformed reply: message content is {type(content).__name__}, not text")
        return content


# --- fake judge -------------------------------------------------------------------------------


@JUDGES.register("fake")
class FakeJudge(Judge):
    """Deterministic offline judge; `calls` counts completions (for tests)."""

    kind = "fake"

    def __init__(self, model: str = "fake-judge"):
        self.model = model
        self.calls: list[dict[str, Any]] = []

    def complete(
        self,
        prompt: str,
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        fake_reply: Callable[[], str] | None = None,
    ) -> JudgeReply:
        self.calls.append({"prompt": prompt, "temperature": temperature, "max_tokens": max_tokens})
        if fake_reply is not None:
            return JudgeReply(text=str(fake_reply()), ok=True, attempts=1)
        digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]
        return JudgeReply(text=f"fake-{digest}", ok=True, attempts=1)

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, "model": self.model, "note": "rule-based stand-in, not an LLM judge"}


# --- factory ----------------------------------------------------------------------------------

def build_judge(cfg: Mapping[str, Any] | None) -> Judge | None:
    """`judge` config group -> a judge, or None for `name: none` (or no config)."""
    if cfg is None:
        return None
    opts = dict(cfg.items())
    name = str(opts.pop("name", "none") or "none")
    if name == "none":
        check_mapping("judge", opts, {})
        return None
    return JUDGES.build(name, where="judge", **opts)
