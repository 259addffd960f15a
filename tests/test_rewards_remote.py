"""RemoteJudgeReward against a loopback OpenAI-compatible server.

The server answers with a tiny random Qwen2.5-VL (transformers' Qwen2_5_VLForConditionalGeneration,
word-level tokenizer built in code, transformers' Qwen2-VL image processor): the yes/no score the
client computes from the HTTP reply must equal P(yes)/(P(yes)+P(no)) computed directly from the
same model's logits on the same image. Other servers sleep, fail, go away or answer garbage.
"""

import base64
import io
import json
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from fastbicot.rewards import RemoteJudgeReward, RewardError
from fastbicot.rewards.judging import UnscorableAnswer, boxed_verdict, top_logprobs_yes_probability

WORDS = ["a", "red", "blue", "cat", "dog", "yes", "no", "Yes", "No"]
SPECIALS = ["<unk>", "<pad>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
TEMPLATE = "{prompt}"  # the tiny vocabulary knows the prompt words only


class TinyVLM:
    """A random tiny Qwen2.5-VL with a word-level tokenizer; 19 tokens, so top-20 covers them all."""

    def __init__(self, seed):
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import (
            PreTrainedTokenizerFast,
            Qwen2_5_VLConfig,
            Qwen2_5_VLForConditionalGeneration,
            Qwen2VLImageProcessor,
        )

        vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
        self.processor = Qwen2VLImageProcessor(
            patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=16 * 16
        )
        cfg = Qwen2_5_VLConfig(
            text_config={
                "vocab_size": len(vocab),
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "max_position_embeddings": 256,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            },
            vision_config={
                "depth": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 2,
                "out_hidden_size": 32,
                "patch_size": 4,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "window_size": 16,
                "fullatt_block_indexes": [1],
            },
            image_token_id=vocab["<|image_pad|>"],
            video_token_id=vocab["<unk>"],
            vision_start_token_id=vocab["<|vision_start|>"],
            vision_end_token_id=vocab["<|vision_end|>"],
        )
        torch.manual_seed(seed)
        self.model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
        self.lock = threading.Lock()  # the server is threaded; keep forwards one at a time

    def _inputs(self, image: np.ndarray, text: str):
        pix = self.processor(images=[Image.fromarray(image)], return_tensors="pt")
        n_img = int(pix["image_grid_thw"].prod()) // 4  # merge_size ** 2 patches per image token
        ids = self.tokenizer.convert_tokens_to_ids(
            ["<|vision_start|>"] + ["<|image_pad|>"] * n_img + ["<|vision_end|>"]
        ) + self.tokenizer.encode(text)
        return {
            "input_ids": torch.tensor([ids]),
            "pixel_values": pix["pixel_values"],
            "image_grid_thw": pix["image_grid_thw"],
        }

    @torch.no_grad()
    def next_token_logprobs(self, image, text) -> torch.Tensor:
        with self.lock:
            return torch.log_softmax(self.model(**self._inputs(image, text)).logits[0, -1].double(), -1)

    @torch.no_grad()
    def generate(self, image, text, max_new_tokens) -> str:
        with self.lock:
            inputs = self._inputs(image, text)
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


def _decode_request(body):
    """(image uint8 [H, W, 3], question) from an OpenAI chat request with one image and one text part."""
    parts = body["messages"][-1]["content"]
    url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
    assert url.startswith("data:image/png;base64,")
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
    return image, next(p["text"] for p in parts if p["type"] == "text")


def vlm_answer(vlm):
    def answer(body):
        image, question = _decode_request(body)
        if body.get("logprobs"):
            logp = vlm.next_token_logprobs(image, question).float()
            top = torch.topk(logp, min(body["top_logprobs"], logp.numel()))
            tokens = vlm.tokenizer.convert_ids_to_tokens(top.indices.tolist())
            entries = [{"token": t, "logprob": v} for t, v in zip(tokens, top.values.tolist())]
            return 200, {
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": tokens[0]},
                        "logprobs": {"content": [{**entries[0], "top_logprobs": entries}]},
                    }
                ]
            }
        text = vlm.generate(image, question, body["max_tokens"])
        return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}

    return answer


class Server:
    """ThreadingHTTPServer on 127.0.0.1:<free port>; ``handler(body) -> (status, json or bytes)``."""

    def __init__(self, handler):
        self.requests = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, body))
                status, reply = handler(body)
                data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def vlm():
    return TinyVLM(seed=1234)


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 16, 12, 3), dtype=torch.uint8, generator=g)


PROMPTS = ["a red cat", "a blue dog", "a cat", "red dog", "a dog", "blue cat", "cat"]


def test_yesno_matches_the_model(vlm, seed):
    images = _images(len(PROMPTS), seed)
    with Server(vlm_answer(vlm)) as server:
        judge = RemoteJudgeReward(
            server.url, "tiny-qwen2.5-vl", question_template=TEMPLATE, max_concurrency=3
        )
        out = judge(images, PROMPTS)
    ref = []
    for img, p in zip(images, PROMPTS):
        prob = vlm.next_token_logprobs(img.numpy(), p).exp()
        y = prob[vlm.tokenizer.convert_tokens_to_ids(["yes", "Yes"])].sum()
        n = prob[vlm.tokenizer.convert_tokens_to_ids(["no", "No"])].sum()
        ref.append((y / (y + n)).item())
    assert out.dtype == torch.float32 and out.shape == (len(PROMPTS),)
    torch.testing.assert_close(out.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-5, rtol=0)
    assert len({round(r, 6) for r in ref}) > 1  # the scores depend on image and prompt, so order is checked
    path, body = server.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "tiny-qwen2.5-vl"
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["max_tokens"] == 1
    assert len(server.requests) == len(PROMPTS)


def test_boxed_with_the_model_is_unparsable(vlm):
    """A random model does not write \\boxed{0/1}: error by default, the configured fallback otherwise."""
    with Server(vlm_answer(vlm)) as server:
        kw = {"question_template": TEMPLATE, "mode": "boxed", "max_tokens": 3}
        with pytest.raises(
            RewardError, match=r"'judge'.*unscorable answer for prompt 'a red cat'.*no \\boxed"
        ):
            RemoteJudgeReward(server.url, "m", name="judge", **kw)(_images(1, 0), ["a red cat"])
        judge = RemoteJudgeReward(server.url, "m", fallback=0.0, **kw)
        assert judge(_images(2, 0), ["a red cat", "dog"]).tolist() == [0.0, 0.0]
        assert judge.num_fallbacks == 2
    assert server.requests[0][1]["max_tokens"] == 3 and "logprobs" not in server.requests[0][1]


def _canned(content=None, top=None, status=200):
    def answer(body):
        choice = {"index": 0, "message": {"role": "assistant", "content": content}}
        if top is not None:
            choice["logprobs"] = {
                "content": [{"token": top[0]["token"], "logprob": top[0]["logprob"], "top_logprobs": top}]
            }
        return status, {"choices": [choice]}

    return answer


def test_boxed_parsing_over_http():
    for content, want in [
        ("reasoning... \\boxed{1}", 1.0),
        ("\\boxed{ 1 }", 1.0),
        ("\\boxed{0} so \\boxed{0}", 0.0),
    ]:
        with Server(_canned(content)) as server:
            assert RemoteJudgeReward(server.url, "m", mode="boxed")(_images(1, 0), ["p"]).item() == want
    for bad in ["\\boxed{yes}", "The answer is 1", "\\boxed{0.5}", "\\boxed{10}", "\\boxed{1} no wait \\boxed{0}"]:
        with pytest.raises(UnscorableAnswer):
            boxed_verdict(bad)
    with Server(_canned("\\boxed{yes}")) as server, pytest.raises(RewardError, match=r"prompt 'a cat'.*\\boxed\{yes\} is not"):
        RemoteJudgeReward(server.url, "m", mode="boxed")(_images(1, 0), ["a cat"])
    # a judge that changes its mind gives no verdict (until issue 16 the last box won: 0.0 here)
    with Server(_canned("\\boxed{1} no wait \\boxed{0}")) as server:
        with pytest.raises(RewardError, match=r"prompt 'a cat'.*disagree"):
            RemoteJudgeReward(server.url, "m", mode="boxed")(_images(1, 0), ["a cat"])
        assert RemoteJudgeReward(server.url, "m", mode="boxed", fallback=0.5)(_images(2, 0), ["a", "b"]).tolist() == [0.5] * 2


def test_yes_probability_closed_form():
    top = [
        {"token": " Yes", "logprob": np.log(0.3)},
        {"token": "yes", "logprob": np.log(0.1)},
        {"token": "NO", "logprob": np.log(0.2)},
        {"token": "maybe", "logprob": np.log(0.4)},
    ]
    assert top_logprobs_yes_probability(top) == pytest.approx(0.4 / 0.6)
    assert top_logprobs_yes_probability([{"token": "no", "logprob": -1000.0}]) == 0.0
    assert top_logprobs_yes_probability(
        [{"token": "yes", "logprob": -1000.0}, {"token": "no", "logprob": -1001.0}]
    ) == pytest.approx(1 / (1 + np.exp(-1.0)))
    with pytest.raises(UnscorableAnswer, match="neither 'yes' nor 'no'"):
        top_logprobs_yes_probability([{"token": "maybe", "logprob": 0.0}])


def test_no_yes_no_token_uses_fallback_or_errors():
    top = [{"token": "maybe", "logprob": -0.1}, {"token": "cat", "logprob": -2.0}]
    with Server(_canned("maybe", top)) as server:
        with pytest.raises(
            RewardError, match=r"unscorable answer for prompt 'a dog'.*neither 'yes' nor 'no'"
        ):
            RemoteJudgeReward(server.url, "m")(_images(1, 0), ["a dog"])
        judge = RemoteJudgeReward(server.url, "m", fallback=0.5)
        assert judge(_images(3, 0), ["a", "b", "c"]).tolist() == [0.5] * 3 and judge.num_fallbacks == 3


def test_malformed_replies():
    with Server(lambda body: (200, {"id": "x", "object": "chat.completion"})) as server, pytest.raises(RewardError, match=r"malformed reply for prompt 'a cat'.*'choices'"):
        RemoteJudgeReward(server.url, "m", fallback=0.0)(_images(1, 0), ["a cat"])  # not a fallback case
    with Server(lambda body: (200, b"<html>gateway</html>")) as server, pytest.raises(RewardError, match="invalid JSON"):
        RemoteJudgeReward(server.url, "m")(_images(1, 0), ["a cat"])
    with Server(lambda body: (400, {"error": "model 'm' not found"})) as server, pytest.raises(RewardError, match="HTTP 400.*not found"):
        RemoteJudgeReward(server.url, "m", retries=3, backoff=0.01)(_images(1, 0), ["a cat"])
    assert len(server.requests) == 1  # client errors are not retried


def test_timeout_then_error():
    def slow(body):
        time.sleep(1.0)
        return _canned("yes", [{"token": "yes", "logprob": 0.0}])(body)

    with Server(slow) as server:
        judge = RemoteJudgeReward(server.url, "m", timeout=0.2, retries=1, backoff=0.01)
        t0 = time.perf_counter()
        with pytest.raises(RewardError, match=r"failed 2 attempts \(timeout 0.2s\).*(timed out|Timeout)"):
            judge(_images(1, 0), ["a cat"])
        assert time.perf_counter() - t0 < 0.9
        assert len(server.requests) == 2


def test_retries_until_the_server_answers(vlm):
    calls = {"n": 0}
    answer = vlm_answer(vlm)

    def flaky(body):
        calls["n"] += 1
        return (503, {"error": "warming up"}) if calls["n"] <= 2 else answer(body)

    image = _images(1, 5)
    with Server(flaky) as server:
        out = RemoteJudgeReward(server.url, "m", question_template=TEMPLATE, retries=2, backoff=0.01)(
            image, ["a cat"]
        )
    prob = vlm.next_token_logprobs(image[0].numpy(), "a cat").exp()
    ids = vlm.tokenizer.convert_tokens_to_ids
    y, n = prob[ids(["yes", "Yes"])].sum(), prob[ids(["no", "No"])].sum()
    assert calls["n"] == 3 and out.item() == pytest.approx((y / (y + n)).item(), abs=1e-5)
    calls["n"] = 0
    with Server(flaky) as server, pytest.raises(RewardError, match=r"failed 2 attempts.*HTTP 503.*warming up"):
        RemoteJudgeReward(server.url, "m", retries=1, backoff=0.01)(image, ["a cat"])


def test_server_down():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now
    judge = RemoteJudgeReward(f"http://127.0.0.1:{port}/v1", "m", retries=2, backoff=0.02)
    t0 = time.perf_counter()
    with pytest.raises(
        RewardError, match=rf"127.0.0.1:{port}/v1/chat/completions failed 3 attempts.*refused"
    ):
        judge(_images(2, 0), ["a", "b"])
    assert time.perf_counter() - t0 >= 0.02 + 0.04  # it did back off


def test_template_fields_and_bad_config():
    with Server(_canned("\\boxed{1}")) as server:
        judge = RemoteJudgeReward(
            server.url,
            "m",
            mode="boxed",
            system_prompt="be strict",
            question_template="{prompt} | {cot} | {task_type}",
        )
        judge(_images(1, 0), ["a cat"], [{"task_type": "object"}], ["a plan"])
        body = server.requests[0][1]
        assert body["messages"][0] == {"role": "system", "content": "be strict"}
        assert _decode_request(body)[1] == "a cat | a plan | object"
        with pytest.raises(RewardError, match=r"needs field 'task_type' that prompt 'a cat'"):
            judge(_images(1, 0), ["a cat"])
    with pytest.raises(ValueError, match="mode must be"):
        RemoteJudgeReward("http://x", "m", mode="score")


# ---- issue 15: deadlines, partial answers, malformed replies, argument checks -------------------

YES = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "yes"},
                    "logprobs": {"content": [{"token": "yes", "logprob": -0.1,
                                              "top_logprobs": [{"token": "yes", "logprob": -0.1},
                                                               {"token": "no", "logprob": -2.5}]}]}}]}
YES_P = 1 / (1 + np.exp(-(2.5 - 0.1)))  # P(yes) / (P(yes) + P(no)) for YES


class TrickleServer:
    """Answers every POST by sending ``reply`` one byte every ``gap`` seconds (< the client's timeout),
    for at most ``limit`` seconds; ``head`` = trickle the status line and headers too."""

    def __init__(self, gap=0.05, limit=6.0, head=True):
        reply = json.dumps(YES).encode()
        raw = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
               + str(len(reply) + 10_000).encode() + b"\r\n\r\n" + reply + b" " * 10_000)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.stop = threading.Event()
        self.connections = 0

        def serve(conn):
            t0 = time.monotonic()
            try:
                conn.recv(1 << 20)
                header_end = raw.index(b"\r\n\r\n") + 4
                if not head:
                    conn.sendall(raw[:header_end])
                for i in range(0 if head else header_end, len(raw)):
                    if self.stop.is_set() or time.monotonic() - t0 > limit:
                        break
                    conn.sendall(raw[i:i + 1])
                    time.sleep(gap)
            except OSError:
                pass  # the client gave up: what the deadline is for
            finally:
                conn.close()

        def accept():
            self.sock.settimeout(0.05)
            while not self.stop.is_set():
                try:
                    conn, _ = self.sock.accept()
                except OSError:
                    continue
                self.connections += 1
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.sock.close()


@pytest.mark.parametrize("head", [True, False], ids=["trickled-headers", "trickled-body"])
@pytest.mark.parametrize("retries", [0, 1])
def test_timeout_is_a_deadline_against_a_trickling_server(head, retries):
    timeout = 0.4
    with TrickleServer(gap=0.05, head=head) as server:
        judge = RemoteJudgeReward(server.url, "m", timeout=timeout, retries=retries, backoff=0.01)
        t0 = time.monotonic()
        with pytest.raises(RewardError, match=rf"failed {retries + 1} attempts.*timed out.*prompt 'a cat'"):
            judge(_images(1, 0), ["a cat"])
        elapsed = time.monotonic() - t0
    # every byte arrives well inside `timeout`, yet the call ends at the deadline, not after the trickle
    assert elapsed < (retries + 1) * timeout + 0.01 + 0.6, elapsed
    assert server.connections == retries + 1


def test_batch_timeout_bounds_the_whole_call_and_keeps_answers():
    def slow_for_some(body):
        _, question = _decode_request(body)
        if "slow" in question:
            time.sleep(1.5)
        return 200, YES

    prompts = ["fast 0", "slow 1", "fast 2", "slow 3", "fast 4"]
    with Server(slow_for_some) as server:
        judge = RemoteJudgeReward(server.url, "m", timeout=5.0, batch_timeout=0.6, retries=3, backoff=0.01,
                                  max_concurrency=5, fallback=-1.0)
        t0 = time.monotonic()
        out = judge(_images(5, 0), prompts)
        assert time.monotonic() - t0 < 1.4
        want = [YES_P, -1.0, YES_P, -1.0, YES_P]
        torch.testing.assert_close(out.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=0)
        assert judge.num_fallbacks == 2 and [i for i, _ in judge.last_failures] == [1, 3]
        assert "timed out" in judge.last_failures[0][1]
        no_fallback = RemoteJudgeReward(server.url, "m", timeout=5.0, batch_timeout=0.6, max_concurrency=5)
        t0 = time.monotonic()
        with pytest.raises(RewardError, match="slow"):
            no_fallback(_images(5, 0), prompts)
        assert time.monotonic() - t0 < 1.4


@pytest.mark.parametrize("failure", ["503", "trickle", "refuse-json", "400"])
def test_one_failed_request_keeps_the_other_answers_with_fallback(failure, seed):
    n = 6
    bad = random.Random(seed).randrange(n)

    def answer(body):
        _, question = _decode_request(body)
        if question == f"p{bad}":
            if failure == "503":
                return 503, {"error": "overloaded"}
            if failure == "400":
                return 400, {"error": "image too large"}
            if failure == "refuse-json":
                return 200, b"<html>bad gateway</html>"
            time.sleep(1.0)
        return 200, YES

    prompts = [f"p{i}" for i in range(n)]
    with Server(answer) as server:
        kw = {"question_template": "{prompt}", "timeout": 0.3, "retries": 1, "backoff": 0.01, "max_concurrency": 3}
        judge = RemoteJudgeReward(server.url, "m", fallback=0.25, **kw)
        out = judge(_images(n, seed), prompts)
        want = torch.full((n,), YES_P, dtype=torch.float64)
        want[bad] = 0.25
        torch.testing.assert_close(out.double(), want, atol=1e-6, rtol=0)
        assert judge.num_fallbacks == 1 and judge.last_failures[0][0] == bad
        with pytest.raises(RewardError, match=rf"prompt 'p{bad}'"):
            RemoteJudgeReward(server.url, "m", **kw)(_images(n, seed), prompts)


def test_every_request_failing_raises_even_with_fallback():
    with Server(lambda body: (503, {"error": "down"})) as server:
        judge = RemoteJudgeReward(server.url, "m", retries=0, fallback=0.0)
        with pytest.raises(RewardError, match="every request of the batch failed.*HTTP 503"):
            judge(_images(3, 0), ["a", "b", "c"])
        assert judge.num_fallbacks == 0


def _yes_reply(top):
    return {"choices": [{"message": {"content": "yes"}, "logprobs": {"content": [{"top_logprobs": top}]}}]}


MALFORMED = [
    {}, {"choices": []}, {"choices": None}, {"choices": "yes"}, {"choices": [None]}, {"choices": [[]]},
    [], "yes", 3, None, True, {"choices": [{"logprobs": None}]}, {"choices": [{"logprobs": {"content": []}}]},
    {"choices": [{"logprobs": {"content": "yes"}}]}, _yes_reply(None), _yes_reply({"yes": -0.1}),
    _yes_reply("yes"), _yes_reply(["yes", "no"]), _yes_reply([{"token": "yes", "logprob": "abc"}]),
    _yes_reply([{"token": "yes", "logprob": None}]), _yes_reply([{"token": "yes", "logprob": True}]),
    _yes_reply([{"token": "yes"}]), _yes_reply([{"token": "yes", "logprob": [0.0]}]),
]
MALFORMED_BOXED = [
    {"choices": [{"message": {"content": ["\\boxed{1}"]}}]}, {"choices": [{"message": {"content": 1}}]},
    {"choices": [{"message": None}]}, {"choices": [{"message": "\\boxed{1}"}]}, {"choices": [{}]},
]
UNSCORABLE = [_yes_reply([]), _yes_reply([{"token": "yes", "logprob": float("nan")}]),
              _yes_reply([{"token": "maybe", "logprob": 0.0}])]


@pytest.mark.parametrize("reply,mode", [*[(r, "yesno") for r in MALFORMED],
                                        *[(r, "boxed") for r in MALFORMED_BOXED]], ids=repr)
@pytest.mark.parametrize("fallback", [None, 0.5])
def test_malformed_replies_are_reward_errors(reply, mode, fallback):
    raw = json.dumps(reply).encode()
    with Server(lambda body: (200, raw)) as server:
        judge = RemoteJudgeReward(server.url, "m", mode=mode, name="judge", fallback=fallback, retries=0)
        with pytest.raises(RewardError, match=r"'judge'.*malformed reply for prompt 'a cat'"):
            judge(_images(1, 0), ["a cat"])


@pytest.mark.parametrize("reply", UNSCORABLE, ids=repr)
def test_unscorable_replies_error_or_fallback(reply):
    raw = json.dumps(reply).encode()
    with Server(lambda body: (200, raw)) as server:
        with pytest.raises(RewardError, match="unscorable answer for prompt 'a cat'"):
            RemoteJudgeReward(server.url, "m", retries=0)(_images(1, 0), ["a cat"])
        judge = RemoteJudgeReward(server.url, "m", retries=0, fallback=0.5)
        assert judge(_images(2, 0), ["a", "b"]).tolist() == [0.5, 0.5] and judge.num_fallbacks == 2


@pytest.mark.parametrize("raw", [b"\xff\xfe\x00", b"", b"{", b"<html/>"], ids=repr)
def test_undecodable_bodies_are_reward_errors(raw):
    with Server(lambda body: (200, raw)) as server, pytest.raises(RewardError, match="invalid JSON"):
        RemoteJudgeReward(server.url, "m", retries=0, fallback=0.0)(_images(1, 0), ["a cat"])


BAD_ARGS = [
    *[("timeout", v) for v in [float("nan"), float("inf"), 0, -1.0, True, "60", None]],
    *[("batch_timeout", v) for v in [float("nan"), float("inf"), 0.0, -5, False, "1"]],
    *[("retries", v) for v in [-1, 1.5, 2.0, True, float("nan"), "3"]],
    *[("backoff", v) for v in [float("nan"), float("inf"), -0.1, True, "0.5"]],
    *[("max_concurrency", v) for v in [0, -1, 2.5, True, float("nan")]],
    *[("top_logprobs", v) for v in [0, 1.5, True, -3]],
    *[("max_tokens", v) for v in [0, -1, 1.5, True]],
    *[("fallback", v) for v in [float("nan"), float("inf"), True, "0"]],
    *[("mode", v) for v in ["YESNO", "score", None, 1]],
    *[("question_template", v) for v in ["{prompt", "}", "", None, 3]],
    *[("system_prompt", v) for v in [3, b"x"]],
    *[("api_key", v) for v in [3, b"x"]],
]


@pytest.mark.parametrize("arg,value", BAD_ARGS, ids=repr)
def test_bad_arguments_are_named(arg, value):
    with pytest.raises(ValueError, match=arg):
        RemoteJudgeReward("http://127.0.0.1:1/v1", "m", **{arg: value})


@pytest.mark.parametrize("url", ["ftp://host/v1", "127.0.0.1:8000/v1", "", "http://", "http://h:99999/v1", 3, None],
                         ids=repr)
def test_bad_base_url_is_named(url):
    with pytest.raises(ValueError, match="base_url"):
        RemoteJudgeReward(url, "m")


@pytest.mark.parametrize("model", ["", "  ", None, 3], ids=repr)
def test_bad_model_is_named(model):
    with pytest.raises(ValueError, match="model"):
        RemoteJudgeReward("http://127.0.0.1:1/v1", model)
