"""LLM judges for benchmarks scored by a model (MM-Vet; the video QA benchmarks).

* `OpenAICompatibleJudge` — sends chat completions through the official `openai` client (an optional
  dependency: `pip install -e ".[judge]"`; it is imported when the judge is built, so the rest of the
  package works without it) to any server that speaks the API (OpenAI, vLLM, LMDeploy, ...).
  `base_url` is ".../v1" or the full ".../chat/completions". The API key is read from the
  environment variable named by `api_key_env` (null: no Authorization header at all, and
  OPENAI_API_KEY is never picked up behind the config's back); it is sent as a Bearer header and
  nowhere else: not in `repr`, not in `describe()`, not in the cache, not in errors.
* Retries: the openai client retries connection errors, timeouts, 429 and 5xx itself (`max_retries`,
  its own backoff — 0.5 s doubling to 8 s with jitter, or the server's Retry-After); a reply with
  no message text (an HTML error page, no choices) is retried here, from the same budget: at most
  `max_retries + 1` requests per prompt.
  Other HTTP errors fail at once. A failure is returned as a `JudgeReply(ok=False, error=...)`,
  never raised, so the caller records it.
* Redaction: the value of the key (the environment variable that `api_key_env` names, when at least
  8 characters long — `tracking.MIN_SECRET_LENGTH`) is replaced by "***" in replies (a server may
  echo it), in error text and in cache entries, before they are stored or returned.
* `system_prompt` (default None): when set, sent as a system message before every user message
  (VLMEvalKit and lmms-eval put their rating instructions there) and recorded in `describe()`.
* An on-disk JSON cache (one file per request under `cache_dir`, written to a temp file and
  published with the umask's mode, so other users of a shared cache can read it) keyed by
  `cache_key`: sha256 of the endpoint URL, judge model, the full messages list (system prompt
  included), temperature and max_tokens. The URL is part of it so another server's grades are never
  reused; temperature and max_tokens because MM-Vet retries the *same* prompt at a higher
  temperature. A rerun therefore sends no request and gets the same replies. Only successful
  replies are cached. Entries written before the URL joined the key simply miss and are asked again.
* `FakeJudge` — deterministic and offline (tests, smoke runs). It answers with the caller's
  `fake_reply()` when given one (benchmarks supply a rule-based stand-in for the real grader), else
  with a fixed string derived from the prompt hash. Its scores are NOT the benchmark's metric;
  `describe()` says "fake" so results cannot be mistaken for judged ones. It has no server and no
  cache.

`build_judge(cfg)` maps the `judge` config group (`none | openai_compatible | fake`) to a judge or
None.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from explain_prune.core import InputError, publish
from explain_prune.core.registry import Registry
from explain_prune.core.schema import check_mapping
from explain_prune.tracking import MASK, MIN_SECRET_LENGTH

log = logging.getLogger("explain_prune.judge")

NO_OPENAI = "judge=openai_compatible needs the openai package: pip install 'explain_prune[judge]'"


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
    base_url: str, model: str, messages: Sequence[Mapping[str, str]], temperature: float | None, max_tokens: int | None
) -> str:
    """sha256 of everything that decides the reply: which server, which model, the whole
    conversation sent (system prompt included) and the sampling settings."""
    request = {
        "base_url": base_url,
        "model": model,
        "messages": [dict(m) for m in messages],
        "temperature": temperature,
        "max_tokens": max_tokens,
    }
    payload = json.dumps(request, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgeCache:
    """`<dir>/<key[:2]>/<key>.json` = {"base_url", "model", "temperature", "max_tokens", "messages",
    "reply"}, secrets already masked by the judge."""

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
        """Write a unique temp file, then `publish` it: mkstemp's 0600 would hide the entry from the
        other users of a shared cache directory."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:8]}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(entry, fh, ensure_ascii=False, indent=1)
            publish(Path(tmp), path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# --- OpenAI-compatible judge ------------------------------------------------------------------


class _Malformed(Exception):
    """A 200 reply without message text; retried by the judge (the openai client would not)."""


def _import_openai() -> Any:
    try:
        import openai
    except ImportError:
        raise InputError(NO_OPENAI) from None
    return openai


def _reply_text(completion: Any) -> str:
    """The first choice's message text. The openai client hands back a non-JSON body (a proxy's
    HTML page) as a plain str, and an empty `choices` as is: both are malformed."""
    if isinstance(completion, str):
        raise _Malformed(f"malformed reply (not JSON): {completion[:200]!r}")
    try:
        content = completion.choices[0].message.content
    except (AttributeError, IndexError, TypeError):
        raise _Malformed("malformed reply: no choices[0].message") from None
    if not isinstance(content, str):
        raise _Malformed(f"malformed reply: message content is {type(content).__name__}, not text")
    return content


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
        self.base_url = base[: -len("/chat/completions")] if base.endswith("/chat/completions") else base
        self.url = self.base_url + "/chat/completions"  # the endpoint; part of the cache key
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
        self._secrets = [self._api_key] if self._api_key and len(self._api_key) >= MIN_SECRET_LENGTH else []
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        if self.max_retries < 0:
            raise InputError(f"judge max_retries must be >= 0, got {self.max_retries}")
        self.temperature = float(temperature)
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        if system_prompt is not None and not (isinstance(system_prompt, str) and system_prompt.strip()):
            raise InputError(f"judge system_prompt must be null or non-empty text, got {system_prompt!r}")
        self.system_prompt = system_prompt
        self.cache = JudgeCache(cache_dir) if cache_dir else None
        self.requests_sent = 0  # HTTP requests, retries included (counted by the client's hook)
        self.cache_hits = 0
        self._openai = _import_openai()  # here, not at import: a missing package fails before the run
        self._client = self._openai.OpenAI(
            base_url=self.base_url,
            # explicit, so the client never falls back to OPENAI_API_KEY; without a key the
            # Authorization header is omitted per request and the placeholder is never sent
            api_key=self._api_key or "no-key",
            max_retries=self.max_retries,
            timeout=self.timeout,
            http_client=self._openai.DefaultHttpxClient(event_hooks={"request": [self._count_request]}),
        )

    def _count_request(self, request: Any) -> None:
        self.requests_sent += 1

    def __repr__(self) -> str:
        return (
            f"OpenAICompatibleJudge(url={self._redact(self.url)!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r}, api_key={'<redacted>' if self._api_key else None}, "
            f"timeout={self.timeout}, max_retries={self.max_retries}, temperature={self.temperature}, "
            f"cache={str(self.cache.directory) if self.cache else None!r})"
        )

    def describe(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "model": self.model,
            "url": self._redact(self.url),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "system_prompt": self.system_prompt,
        }

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text

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
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        messages.append({"role": "user", "content": prompt})
        key = cache_key(self.url, self.model, messages, temp, limit)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.cache_hits += 1
                return JudgeReply(text=hit, ok=True, cached=True)
        start = self.requests_sent
        text, error = self._send(messages, temp, limit)
        attempts = self.requests_sent - start
        if text is None:
            return JudgeReply(text=None, ok=False, error=error, attempts=attempts)
        text = self._redact(text)
        if self.cache is not None:
            entry = {
                "base_url": self._redact(self.base_url),
                "model": self.model,
                "temperature": temp,
                "max_tokens": limit,
                "messages": [{**m, "content": self._redact(m["content"])} for m in messages],
                "reply": text,
            }
            self.cache.put(key, entry)
        return JudgeReply(text=text, ok=True, attempts=attempts)

    def _send(self, messages: list[dict[str, str]], temp: float, limit: int | None) -> tuple[str | None, str]:
        """(reply text, "") or (None, redacted error). The openai client spends the retry budget on
        transport errors and 429/5xx; what it leaves pays for retrying malformed replies."""
        openai = self._openai
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": temp}
        if limit is not None:
            body["max_tokens"] = limit
        if self._api_key is None:
            body["extra_headers"] = {"Authorization": openai.Omit()}
        start = self.requests_sent
        error = "no attempt made"
        for _ in range(self.max_retries + 1):  # each pass sends at least one request
            left = self.max_retries - (self.requests_sent - start)
            if left < 0:
                break
            try:
                completion = self._client.with_options(max_retries=left).chat.completions.create(**body)
                return _reply_text(completion), ""
            except _Malformed as err:
                error = str(err)
                log.warning("judge reply unusable (request %d of at most %d): %s",
                            self.requests_sent - start, self.max_retries + 1, self._redact(error))
                continue
            except openai.APITimeoutError:
                error = f"timeout after {self.timeout}s"
            except openai.APIConnectionError as err:
                error = f"connection error: {err.__cause__ or err}"
            except openai.APIStatusError as err:
                error = f"HTTP {err.status_code} from {self.url}: {err.response.text[:300]}"
            except openai.OpenAIError as err:
                error = f"{type(err).__name__}: {err}"
            break
        error = self._redact(error)
        log.warning("judge request failed after %d request(s): %s", self.requests_sent - start, error)
        return None, error


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
