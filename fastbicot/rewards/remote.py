"""RemoteJudgeReward: a VLM judge served by vLLM / SGLang behind the OpenAI-compatible chat API.

One chat request per image (the image inline as a base64 PNG data URL, then the question), sent from
a pool of ``max_concurrency`` threads so the server can batch them. Standard library only.

* ``mode="yesno"``: asks for one token with ``logprobs`` / ``top_logprobs`` and scores
  P(yes) / (P(yes) + P(no)), summing the probabilities of every top token that reads "yes" or "no"
  once stripped and lower-cased ("Yes", " yes", "YES" ...).
* ``mode="boxed"``: lets the judge reason and reads the last ``\\boxed{...}`` of its answer, which
  must be exactly 0 or 1.

An answer that cannot be scored (no yes/no among the top tokens, no valid ``\\boxed{}``) is an error
naming the reward, the prompt and the answer, or ``fallback`` when one is configured. A server that
cannot be reached, times out or answers 5xx / 429 is retried ``retries`` times with exponential
backoff (``backoff * 2**attempt`` seconds); if it stays down the call raises -- there is no
fallback for that, a training run must not silently learn from made-up scores.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from .base import Reward, RewardError, _short

DEFAULT_QUESTION = 'Does this image match the description: "{prompt}"? Answer yes or no.'
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def png_data_url(image: torch.Tensor) -> str:
    """uint8 [H, W, 3] -> "data:image/png;base64,..."."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.cpu().numpy())).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class UnscorableAnswer(ValueError):
    """The judge answered, but the answer does not give a score."""


def _logsumexp(values: list[float]) -> float:
    m = max(values, default=-math.inf)
    return m if m == -math.inf else m + math.log(sum(math.exp(v - m) for v in values))


def yes_probability(top_logprobs) -> float:
    """P(yes) / (P(yes) + P(no)) from an OpenAI ``top_logprobs`` list of {token, logprob}.

    Computed in log space, sigmoid(log P(yes) - log P(no)), so logprobs like -1000 do not underflow.
    """
    logp = {"yes": [], "no": []}
    for entry in top_logprobs:
        word = str(entry.get("token", "")).strip().lower()
        if word in logp:
            logp[word].append(float(entry["logprob"]))
    ly, ln = _logsumexp(logp["yes"]), _logsumexp(logp["no"])
    if ly == ln == -math.inf or math.isnan(ly) or math.isnan(ln):
        tokens = [e.get("token") for e in top_logprobs]
        raise UnscorableAnswer(f"neither 'yes' nor 'no' among the top tokens {tokens}")
    d = ly - ln
    return 1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d))


def boxed_score(text: str) -> float:
    """1.0 / 0.0 from the last ``\\boxed{1}`` / ``\\boxed{0}`` in ``text``; anything else is unscorable."""
    found = _BOXED.findall(text or "")
    if not found:
        raise UnscorableAnswer("no \\boxed{...} in the answer")
    value = found[-1].strip()
    if value not in ("0", "1"):
        raise UnscorableAnswer(f"\\boxed{{{value}}} is not \\boxed{{0}} or \\boxed{{1}}")
    return float(value)


class RemoteJudgeReward(Reward):
    """Judge reward over an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    ``base_url``: e.g. "http://127.0.0.1:8000/v1". ``question_template``: a ``str.format`` template
    over ``{prompt}``, ``{cot}`` and the prompt's metadata fields. ``timeout``: seconds per HTTP
    request. ``retries``: extra attempts after the first. ``top_logprobs``: how many alternatives
    the server returns for the yes/no token (vLLM allows up to 20 by default).
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
        retries: int = 3,
        backoff: float = 0.5,
        max_tokens: int | None = None,
        top_logprobs: int = 20,
        api_key: str | None = None,
        fallback: float | None = None,
    ):
        super().__init__(name, fallback=fallback)
        if mode not in ("yesno", "boxed"):
            raise ValueError(f"mode must be 'yesno' or 'boxed', got {mode!r}")
        if max_concurrency < 1 or retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("need max_concurrency >= 1, retries >= 0, timeout > 0, backoff >= 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.mode, self.system_prompt = model, mode, system_prompt
        self.question_template = question_template
        self.max_concurrency, self.timeout, self.retries, self.backoff = (
            max_concurrency,
            timeout,
            retries,
            backoff,
        )
        self.max_tokens = max_tokens if max_tokens is not None else (1 if mode == "yesno" else 1024)
        self.top_logprobs = top_logprobs
        self.api_key = api_key
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

    def post(self, body: dict) -> dict:
        """POST with retries; returns the decoded JSON reply or raises RewardError."""
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code not in _RETRY_STATUS:  # a bad request does not get better by retrying
                    raise RewardError(
                        f"reward {self.name!r}: judge server {self.url} answered HTTP {e.code}: {detail}"
                    ) from None
                last = f"HTTP {e.code}: {detail}"
                continue
            except (
                OSError,
                http.client.HTTPException,
            ) as e:  # refused, reset, timed out (URLError is an OSError)
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                continue
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                raise RewardError(
                    f"reward {self.name!r}: judge server {self.url} sent invalid JSON: {raw[:200]!r}"
                ) from None
        raise RewardError(
            f"reward {self.name!r}: judge server {self.url} failed {self.retries + 1} attempts "
            f"(timeout {self.timeout}s); last error: {last}"
        )

    def judge(self, image: torch.Tensor, prompt: str, metadata: dict, cot: str) -> float:
        reply = self.post(self.request_body(image, self.question(prompt, metadata, cot)))
        try:
            choice = reply["choices"][0]
            if self.mode == "yesno":
                answer = choice["logprobs"]["content"][0]["top_logprobs"]
                return yes_probability(answer)
            answer = choice["message"]["content"]
            return boxed_score(answer)
        except (KeyError, IndexError, TypeError) as e:
            raise RewardError(
                f"reward {self.name!r}: malformed reply for prompt {_short(prompt)} (missing {e}): "
                f"{json.dumps(reply)[:300]}"
            ) from None
        except UnscorableAnswer as e:
            if self.fallback is None:
                raise RewardError(
                    f"reward {self.name!r}: unscorable answer for prompt {_short(prompt)}: {e}; "
                    f"answer {str(answer)[:300]!r} (set fallback=<value> to use a fixed score)"
                ) from None
            with self._lock:  # judge() runs in worker threads
                self.num_fallbacks += 1
            return self.fallback

    def score(self, images, prompts, metadata, cots):
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts))) as pool:
            return list(pool.map(self.judge, images.cpu(), prompts, metadata, cots))
