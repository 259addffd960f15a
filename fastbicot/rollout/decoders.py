"""The decode loops: the semantic CoT (decode_cot) and the CFG image tokens (ImageDecoder).

Both run on a ModelRunner's trunk and cache and draw every token through one Sampler, keyed per
sample (rollout.sampling): step t of a row is its t-th draw from its sample's stream.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .cpu_decode import FlatRowsStep
from .sampling import IMAGE_OFFSET, PLAIN_MAX_VOCAB


def decode_cot(runner, cache, sampler, last, slot_sample, keys, params, *, flush_at_limit, progress=None):
    """Sample CoT tokens for cache rows [0, R) until EOS / ``params.max_new_tokens``; returns (ids,
    log-probs) per sample.

    ``last``: every row's last context token; ``slot_sample``: the sample held by each slot (updated in
    place as rows move); ``keys``: int64 [R], the stream key of each slot's sample. Finished rows are
    swapped to the back of the cache so each step runs only the active rows (no lock-step).
    ``flush_at_limit`` (the ``continue`` image mode): a row that hits the limit without EOS runs one
    extra step so that its last token's KV is written too (the image context continues right after
    it); that step's draw is discarded.
    """
    policy, dev = runner.policy, cache.suffix_k.device
    eos, max_new = policy.eos_token_id, params.max_new_tokens
    also = set(policy.cot_stop_ids)  # other stop tokens, recorded as the end token (model.cot_stop_tokens)
    R = len(slot_sample)
    ids = [[] for _ in range(R)]
    lps = [[] for _ in range(R)]
    x = policy.embed_text(torch.tensor(last, device=dev))
    n, step = R, 0
    while n > 0:
        h = runner.trunk.decode(x[:n], cache, n, flat=runner.flat)
        tok, lp = sampler(policy.text_logits(h), temperature=params.temperature, top_k=params.top_k,
                          top_p=params.top_p, offset=step, keys=keys[:n])
        tok_l, lp_l = tok.tolist(), lp.tolist()
        if not all(map(math.isfinite, lp_l)):  # already on the host: no extra sync
            bad = [slot_sample[i] for i, x in enumerate(lp_l) if not math.isfinite(x)]
            raise FloatingPointError(f"non-finite logits in the CoT phase at CoT step {step} (samples "
                                     f"{bad[:8]}); the policy's weights or activations hold NaN/inf")
        done = []
        for i in range(n):
            s = slot_sample[i]
            stopped = len(ids[s]) == max_new or (len(ids[s]) > 0 and ids[s][-1] == eos)
            if not stopped:  # (the log-prob stays the sampled token's: the sampling distribution's)
                ids[s].append(eos if tok_l[i] in also else tok_l[i])
                lps[s].append(lp_l[i])
            hit_eos = ids[s][-1] == eos  # EOS is never fed back: it is not part of any context
            at_limit = len(ids[s]) == max_new
            done.append(stopped or hit_eos or (at_limit and not flush_at_limit))
        x[:n] = policy.embed_text(tok)
        step += 1
        if progress is not None:
            progress.update(1)
        n = _compact(cache, x, slot_sample, n, done, keys)
    return ids, lps


def _compact(cache, x, slot_sample, n, done, keys):
    """Move finished rows behind the active ones (swapping only the rows that must move), with their
    inputs ``x`` and stream ``keys``."""
    n_new = n - sum(done)
    holes = [i for i in range(n_new) if done[i]]
    movers = [i for i in range(n_new, n) if not done[i]]
    if holes:
        a = torch.tensor(holes, device=x.device)
        b = torch.tensor(movers, device=x.device)
        cache.swap_rows(a, b)
        x[torch.cat([a, b])] = x[torch.cat([b, a])]
        keys[torch.cat([a, b])] = keys[torch.cat([b, a])]
        for i, j in zip(holes, movers):
            slot_sample[i], slot_sample[j] = slot_sample[j], slot_sample[i]
    return n_new


class ImageDecoder:
    """The image decode loop over cache rows [0, rows): trunk step + image head + CFG + sampler +
    embedding of the drawn token, all into static buffers. The path is chosen once:

    * CUDA: the step captured once in a CUDA graph and replayed (the step counter and sampler offset
      are device tensors advanced inside the graph), or eager with ``cuda_graph=False``;
    * CPU, flattened rows with fused weights: rollout.cpu_decode.FlatRowsStep (the CoT's fused step
      with its tables built once; the C++ step when built), CFG as one lerp on the head's hidden;
    * otherwise (CPU, grouped layout or an unfused trunk): Trunk.decode, eagerly.

    On CPU, plain temperature sampling (no top-k / top-p) of a codebook of at most PLAIN_MAX_VOCAB
    tokens folds the temperature into the head's last Linear and draws with Sampler.draw_plain (faster
    there; for larger codebooks the sampler's keyed torch path is).

    ``keys``: the stream key of each of the n samples (row i and, with CFG, row n + i): every draw of row i is a function of (sampler seed, step, keys[i]) only (DESIGN.md §4,
    stream keys). On the device in a static buffer, read by the sampler (and the CUDA graph).
    """

    def __init__(self, runner, cache, n, *, guidance_scale, temperature, top_k, top_p, sampler, num_tokens, keys,
                 cuda_graph=True):
        policy, trunk = runner.policy, runner.trunk
        self.runner, self.trunk, self.cache, self.n, self.policy = runner, trunk, cache, n, policy
        self.cfg = guidance_scale > 1
        self.rows = 2 * n if self.cfg else n
        self.w, self.temperature, self.top_k, self.top_p = float(guidance_scale), temperature, top_k, top_p
        self.sampler, self.num_tokens = sampler, num_tokens
        dev = cache.suffix_k.device
        self.x = torch.zeros(self.rows, policy.hidden_size, dtype=policy.dtype, device=dev)
        self.tokens = torch.zeros(num_tokens, n, dtype=torch.long, device=dev)  # [step, sample]
        self.logprobs = torch.zeros(num_tokens, n, dtype=torch.float32, device=dev)
        self.step_idx = torch.zeros(1, dtype=torch.long, device=dev)  # the CUDA graph's step counter
        self.key_list = [int(k) for k in keys]
        self.sample_keys = torch.tensor(self.key_list, dtype=torch.long, device=dev)  # static: the graph reads it
        self.use_graph = cuda_graph and dev.type == "cuda"
        self.graph = None
        # The image-token embedding (generation embedding + aligner MLP) is a pure function of
        # the id: one [V_img, H] table per rollout (weights change between rollouts), one
        # index_select per step.
        with torch.no_grad():
            self.table = policy.embed_image(torch.arange(policy.image_vocab_size, device=dev))
        cpu = dev.type == "cpu"
        self.flat_step = (FlatRowsStep(trunk.fused, trunk.cos_sin, cache, self.rows, num_tokens)
                          if cpu and runner.flat and trunk.fused is not None else None)
        # drawn by Sampler.draw_plain; a function of the codebook size, not of n (rank independence)
        self.plain = cpu and top_k == 0 and top_p == 1.0 and policy.image_vocab_size <= PLAIN_MAX_VOCAB
        head = policy.image_head_linear
        t = float(temperature) if self.plain and temperature > 0 else 1.0
        self.head_w = head.weight.detach() / t  # logits / T in the head's own matmul
        self.head_b = None if head.bias is None else head.bias.detach() / t

    def _step(self, t):
        """One token for every row; ``t``: the step, or None inside the CUDA graph (the device counter
        ``step_idx`` stands for it)."""
        n = self.n
        if self.flat_step is not None:
            h = self.flat_step(self.x, t)
        else:
            h = self.trunk.decode(self.x, self.cache, self.rows, flat=self.runner.flat)
        z = self.policy.image_head_hidden(h)
        if self.cfg:  # the head's last layer is linear: CFG on its input == CFG on the logits
            z = torch.lerp(z[n:], z[:n], self.w)  # u + w (c - u) in one op (a CPU step is bound by its ops)
        tok = self._draw(F.linear(z, self.head_w, self.head_b), t)
        torch.index_select(self.table, 0, tok, out=self.x[:n])
        if self.cfg:
            self.x[n:].copy_(self.x[:n])

    def _draw(self, logits, t):
        if self.plain:
            return self.sampler.draw_plain(logits, t, num_steps=self.num_tokens, keys=self.key_list,
                                           greedy=self.temperature == 0, out=(self.tokens[t], self.logprobs[t]))
        tok, lp = self.sampler(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                               offset=(self.step_idx[0] if t is None else t) + IMAGE_OFFSET, keys=self.sample_keys)
        if t is None:  # inside the graph: no host-side index
            self.tokens.index_copy_(0, self.step_idx, tok[None])
            self.logprobs.index_copy_(0, self.step_idx, lp.float()[None])
            self.step_idx += 1
        else:
            self.tokens[t] = tok
            self.logprobs[t] = lp
        return tok

    def _capture(self):
        c = self.cache
        saved = (c.suffix_len.clone(), self.x.clone(), self.step_idx.clone())

        def restore():
            c.suffix_len.copy_(saved[0])
            self.x.copy_(saved[1])
            self.step_idx.copy_(saved[2])

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (allocator, lazy init) outside the graph
            self._step(None)
        torch.cuda.current_stream().wait_stream(stream)
        restore()
        self.graph = torch.cuda.CUDAGraph()  # no generator state: the sampler's streams are counter-based
        with torch.cuda.graph(self.graph):
            self._step(None)
        restore()

    @torch.no_grad()  # not inference_mode: the tokens are used by the training step's autograd
    def run(self, first_inputs, progress=None):
        """first_inputs [rows, H]: embeddings of each row's last context token (BOI) ->
        (tokens int64 [n, num_tokens], log-probs float32 [n, num_tokens])."""
        self.x.copy_(first_inputs)
        if self.use_graph:
            self._capture()
        for t in range(self.num_tokens):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step(t)
            if progress is not None:
                progress.update(1)
        if self.flat_step is not None:
            self.flat_step.finish()
        tokens, logprobs = self.tokens.t().contiguous(), self.logprobs.t().contiguous()
        check_finite_logprobs(logprobs, "image")
        return tokens, logprobs


def check_finite_logprobs(logprobs: torch.Tensor, phase: str) -> None:
    """NaN/inf logits give NaN log-probs for the drawn tokens (and tokens that look normal): one check
    after the loop (a single host sync, CUDA-graph safe) names the phase, the first step and the rows.
    Greedy decoding stores log-prob 0 and is not covered."""
    bad = ~torch.isfinite(logprobs)
    if bool(bad.any()):
        steps = bad.any(0).nonzero().flatten()
        rows = bad.any(1).nonzero().flatten().tolist()
        raise FloatingPointError(
            f"non-finite logits in the {phase} phase: first at {phase} step {int(steps[0])}, rows {rows[:8]}"
            f"{' ...' if len(rows) > 8 else ''}; the policy's weights or activations hold NaN/inf")
