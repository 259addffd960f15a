"""RemoteJudgeReward: a VLM judge served by vLLM / SGLang behind the OpenAI-compatible chat API.

One chat request per image (the image inline as a base64 PNG data URL, then the question), sent from
a pool of ``max_concurrency`` threads so the server can batch them. Standard library only.

* ``mode="yesno"``: asks for one token with ``logprobs`` / ``top_logprobs`` and scores
  P(yes) / (P(yes) + P(no)), summing the probabilities of every top token that reads "yes" or "no"
  once stripped and lower-cased ("Yes", " yes", "YES" ...) (``judging.top_logprobs_yes_probability``).
* ``mode="boxed"``: lets the judge reason and reads the ``\\boxed{...}`` of its answer: every box must
  hold the same 0 or 1 (``judging.boxed_verdict``, the rule every boxed judge of fastbicot uses).

An answer that cannot be scored (no yes/no among the top tokens, no valid ``\\boxed{}``) is an error
naming the reward, the prompt and the answer, or ``fallback`` when one is configured. A reply that
is not the OpenAI chat-completion shape (missing or mistyped fields) is always a ``RewardError``.

Deadlines: ``timeout`` bounds one whole HTTP attempt (connect, send, every byte of the answer) -- a
server that trickles bytes cannot hold a step longer than that; ``batch_timeout`` (optional) bounds
one call of the reward, retries and backoff included. A server that cannot be reached, misses the
deadline or answers 5xx / 429 is retried ``retries`` times with exponential backoff
(``backoff * 2**attempt`` seconds). A request that still fails raises, unless ``fallback`` is
configured and at least one other request of the batch was answered: then the answers received are
kept, the failed samples get ``fallback`` (counted in ``num_fallbacks`` and listed in
``last_failures``). If every request of a batch fails the call raises -- a training run must not
silently learn from made-up scores when the judge is down.

HTTP goes through ``http.client`` directly (``http://`` and ``https://``); proxy environment variables
are not used.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import string
import threading
import time
import urllib.parse
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import numpy as np
import torch
from PIL import Image

from ..checks import ArgumentError, check_float, check_int, check_str
from .base import Reward, RewardError, _short
from .judging import UnscorableAnswer, boxed_verdict, top_logprobs_yes_probability

DEFAULT_QUESTION = 'Does this image match the description: "{prompt}"? Answer yes or no.'
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def png_data_url(image: torch.Tensor) -> str:
    """uint8 [H, W, 3] -> "data:image/png;base64,..."."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.cpu().numpy())).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class _RequestFailed(RewardError):
    """One request failed for transport reasons (after its retries): fallback-eligible in a batch."""


class _DeadlineExceeded(OSError):
    pass


class RemoteJudgeReward(Reward):
    """Judge reward over an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    ``base_url``: e.g. "http://127.0.0.1:8000/v1". ``question_template``: a ``str.format`` template
    over ``{prompt}``, ``{cot}`` and the prompt's metadata fields. ``timeout``: deadline in seconds
    for one whole HTTP attempt (connect + send + the complete answer). ``batch_timeout``: deadline for
    one call over the whole batch, retries included (None: no batch budget). ``retries``: extra
    attempts after the first. ``top_logprobs``: how many alternatives the server returns for the
    yes/no token (vLLM allows up to 20 by default).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        question_template: str = DEFAULT_QUESTION,
        mode: str = "yesno",
        name: str = "remote_judge",
        system_prompt: str | None = None,
        max_concurrency: int = 8,
        timeout: float = 60.0,
        batch_timeout: float | None = None,
        retries: int = 3,
        backoff: float = 0.5,
        max_tokens: int | None = None,
        top_logprobs: int = 20,
        api_key: str | None = None,
        fallback: float | None = None,
    ):
        super().__init__(name, fallback=fallback)
        mode = check_str("mode", mode, choices=("yesno", "boxed"))
        base_url = check_str("base_url", base_url)
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ArgumentError(f"base_url must be an http:// or https:// URL with a host, got {base_url!r}")
        try:
            parsed.port  # noqa: B018 -- raises ValueError for a bad port
        except ValueError as e:
            raise ArgumentError(f"base_url has a bad port: {base_url!r} ({e})") from e
        self.model = check_str("model", model)
        self.system_prompt = check_str("system_prompt", system_prompt, allow_empty=True, optional=True)
        self.question_template = check_str("question_template", question_template)
        try:
            list(string.Formatter().parse(self.question_template))
        except ValueError as e:
            raise ArgumentError(f"question_template is not a valid str.format template: {e}") from e
        self.max_concurrency = check_int("max_concurrency", max_concurrency, low=1)
        self.timeout = check_float("timeout", timeout, low=0.0, low_open=True)
        self.batch_timeout = check_float("batch_timeout", batch_timeout, low=0.0, low_open=True, optional=True)
        self.retries = check_int("retries", retries, low=0)
        self.backoff = check_float("backoff", backoff, low=0.0)
        max_tokens = check_int("max_tokens", max_tokens, low=1, optional=True)
        self.top_logprobs = check_int("top_logprobs", top_logprobs, low=1)
        self.api_key = check_str("api_key", api_key, optional=True)
        self.mode = mode
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._parsed = urllib.parse.urlsplit(self.url)
        self.max_tokens = max_tokens if max_tokens is not None else (1 if mode == "yesno" else 1024)
        self.last_failures: list[tuple[int, str]] = []
        self._lock = threading.Lock()

    def question(self, prompt: str, metadata: dict, cot: str) -> str:
        try:
            return self.question_template.format_map({**metadata, "prompt": prompt, "cot": cot})
        except (KeyError, IndexError) as e:
            raise RewardError(
                f"reward {self.name!r}: question_template needs field {e} that prompt "
                f"{_short(prompt)} does not have"
            ) from None

    def request_body(self, image: torch.Tensor, question: str) -> dict:
        content = [
            {"type": "image_url", "image_url": {"url": png_data_url(image)}},
            {"type": "text", "text": question},
        ]
        messages = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        body = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens, "temperature": 0.0}
        if self.mode == "yesno":
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        return body

    def _attempt(self, data: bytes, headers: dict, deadline: float) -> tuple[int, bytes]:
        """One HTTP POST that finishes by ``deadline`` (time.monotonic()) or raises _DeadlineExceeded.

        The socket timeout bounds each blocking call by the time left, and a watchdog shuts the
        socket down at the deadline, so a server that trickles bytes cannot stretch the attempt.
        """
        left = deadline - time.monotonic()
        if left <= 0:
            raise _DeadlineExceeded("deadline passed before the request was sent")
        p = self._parsed
        cls = http.client.HTTPSConnection if p.scheme == "https" else http.client.HTTPConnection
        conn = cls(p.hostname, p.port, timeout=left)
        fired = threading.Event()

        def kill():
            fired.set()
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(left, kill)
        timer.daemon = True
        timer.start()
        try:
            path = p.path + (f"?{p.query}" if p.query else "")
            conn.request("POST", path, body=data, headers=headers)
            resp = conn.getresponse()
            chunks = []
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or fired.is_set():
                    raise _DeadlineExceeded("answer not complete by the deadline")
                if conn.sock is not None:
                    conn.sock.settimeout(left)
                chunk = resp.read(65536)
                if not chunk:
                    break
                chunks.append(chunk)
            if fired.is_set():
                raise _DeadlineExceeded("answer not complete by the deadline")
            return resp.status, b"".join(chunks)
        except (OSError, http.client.HTTPException) as e:
            if fired.is_set() or time.monotonic() >= deadline:
                raise _DeadlineExceeded(f"no complete answer within the deadline ({type(e).__name__})") from e
            raise
        finally:
            timer.cancel()
            conn.close()

    def post(self, body: dict, batch_deadline: float | None = None) -> dict:
        """POST with retries; returns the decoded JSON reply or raises RewardError.

        Each attempt must finish within ``timeout`` seconds; all attempts (and the backoff between
        them) within ``batch_deadline`` (a time.monotonic() value) when given.
        """
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = None
        attempts = 0
        for attempt in range(self.retries + 1):
            if attempt:
                pause = self.backoff * 2 ** (attempt - 1)
                if batch_deadline is not None and time.monotonic() + pause >= batch_deadline:
                    last = f"{last}; batch_timeout {self.batch_timeout}s left no time to retry"
                    break
                time.sleep(pause)
            deadline = time.monotonic() + self.timeout
            if batch_deadline is not None:
                if batch_deadline <= time.monotonic():
                    last = f"batch_timeout {self.batch_timeout}s exhausted" if last is None else last
                    break
                deadline = min(deadline, batch_deadline)
            attempts += 1
            try:
                status, raw = self._attempt(data, headers, deadline)
            except _DeadlineExceeded as e:
                last = f"TimeoutError: timed out ({e})"
                continue
            except (OSError, http.client.HTTPException) as e:  # refused, reset, DNS, TLS
                last = f"{type(e).__name__}: {e}"
                continue
            if status != 200:
                detail = raw[:300].decode("utf-8", "replace")
                if status not in _RETRY_STATUS:  # a bad request does not get better by retrying
                    raise _RequestFailed(
                        f"reward {self.name!r}: judge server {self.url} answered HTTP {status}: {detail}"
                    )
                last = f"HTTP {status}: {detail}"
                continue
            try:
                return json.loads(raw)
            except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
                raise _RequestFailed(
                    f"reward {self.name!r}: judge server {self.url} sent invalid JSON: {raw[:200]!r}"
                ) from None
        raise _RequestFailed(
            f"reward {self.name!r}: judge server {self.url} failed {attempts} attempts "
            f"(timeout {self.timeout}s); last error: {last}"
        )

    def judge(self, image: torch.Tensor, prompt: str, metadata: dict, cot: str,
              batch_deadline: float | None = None) -> float:
        body = self.request_body(image, self.question(prompt, metadata, cot))
        try:
            reply = self.post(body, batch_deadline)
        except _RequestFailed as e:
            raise _RequestFailed(f"{e} [prompt {_short(prompt)}]") from None
        answer = None
        try:
            choice = reply["choices"][0]
            if self.mode == "yesno":
                answer = choice["logprobs"]["content"][0]["top_logprobs"]
                return top_logprobs_yes_probability(answer)
            answer = choice["message"]["content"]
            return boxed_verdict(answer)
        except UnscorableAnswer as e:
            if self.fallback is None:
                raise RewardError(
                    f"reward {self.name!r}: unscorable answer for prompt {_short(prompt)}: {e}; "
                    f"answer {str(answer)[:300]!r} (set fallback=<value> to use a fixed score)"
                ) from None
            with self._lock:  # judge() runs in worker threads
                self.num_fallbacks += 1
            return self.fallback
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
            what = f"missing {e}" if isinstance(e, (KeyError, IndexError)) else str(e)
            try:
                shown = json.dumps(reply)[:300]
            except (TypeError, ValueError):
                shown = repr(reply)[:300]
            raise RewardError(
                f"reward {self.name!r}: malformed reply for prompt {_short(prompt)} ({what}): {shown}"
            ) from None

    def score(self, images, prompts, metadata, cots):
        n = len(prompts)
        self.last_failures = []
        batch_deadline = time.monotonic() + self.batch_timeout if self.batch_timeout is not None else None
        results: list = [None] * n
        failures: list[tuple[int, str]] = []
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, n))
        try:
            futures = {pool.submit(self.judge, img, prompts[i], metadata[i], cots[i], batch_deadline): i
                       for i, img in enumerate(images.cpu())}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in done:
                    i = futures[fut]
                    err = fut.exception()
                    if err is None:
                        results[i] = fut.result()
                    elif isinstance(err, _RequestFailed) and self.fallback is not None:
                        failures.append((i, str(err)))
                    else:
                        for other in pending:
                            other.cancel()
                        raise err
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        self.last_failures = sorted(failures)
        if failures:
            if len(failures) == n:
                i, msg = self.last_failures[0]
                raise RewardError(f"reward {self.name!r}: every request of the batch failed ({n} of {n}); "
                                  f"first, for prompt {_short(prompts[i])}: {msg}")
            with self._lock:
                self.num_fallbacks += len(failures)
            for i, _ in failures:
                results[i] = self.fallback
        return results
