"""The one place the rollout draws tokens (Sampler: CoT and image tokens, every device).

Every draw is ``fastbicot.kernels.cfg_sample`` (DESIGN.md §4): the Triton kernel on CUDA, its torch
path on CPU and for float64 logits. The exception is Sampler.draw_plain, the CPU image loop's plain
sampling, which draws many steps' noise per row at once (one op per row instead of one per step), for
small vocabularies only (PLAIN_MAX_VOCAB).

Stream keys: given ``keys`` (int64 [B], one per row), row r's random numbers are a function of
(seed, offset, keys[r]) alone, on every path (the kernel's Philox counter, its torch path's
counter-based hash, the per-row generators of ``stream_generator``), never of the row's position or
of the other rows. The rollout keys each sample by its global prompt index and generation index, so a
sample draws the same tokens whichever rank generates it and however the batch is split or compacted.
"""

from __future__ import annotations

import operator

import torch

from fastbicot.kernels.cfg_sample import cfg_sample

_M64 = (1 << 64) - 1
IMAGE_OFFSET = 1 << 24  # sampler offsets of image steps (CoT steps use 0, 1, ...): disjoint streams
# Largest vocabulary that Sampler.draw_plain draws; larger ones go through cfg_sample's keyed torch
# path. draw_plain's cost grows with n x V (an Exp(1) noise value per token), the torch path's has a
# ~0.4 ms fixed part per call. Measured per image step, 1 thread, keyed, n rows (draw_plain / torch
# path, us): n=16: V=512 276/432, V=1024 499/453, V=2048 1001/581, V=16384 7880/2068; n=2: V=1024
# 144/671, V=16384 1545/993; n=64: V=256 561/575, V=512 1432/742. The choice may depend on V only,
# never on n: the two paths draw different streams, and n (the samples on a rank) must not change a
# sample's tokens.
PLAIN_MAX_VOCAB = 512


def _splitmix64(x: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit ints that scatters nearby inputs (Python ints)."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _M64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _M64
    return x ^ (x >> 31)


def stream_generator(seed: int, offset: int, key: int) -> torch.Generator:
    """A CPU torch.Generator for the stream (seed, offset, key), a function of the three ints alone.

    For CPU loops that draw many values per row at once (the image loop's plain sampling). torch's
    CPU generator keeps 32 seed bits, so the three 64-bit words are hashed into them.
    """
    h = 0
    for word in (seed, offset, key):
        h = _splitmix64(h ^ (int(word) & _M64))
    return torch.Generator().manual_seed((h ^ (h >> 32)) & 0xFFFFFFFF)


def check_keys(keys, n, name="keys", per="row") -> list:
    """None -> [0 .. n-1]; else a list of n distinct ints in int64 range (a list or a 1-D int tensor),
    one per ``per``; ValueError naming ``name`` otherwise."""
    if keys is None:
        return list(range(n))
    if isinstance(keys, torch.Tensor):
        if keys.dim() != 1 or keys.dtype.is_floating_point or keys.dtype.is_complex or keys.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor or a list of ints, got {keys.dtype} "
                             f"{tuple(keys.shape)}")
        keys = keys.tolist()
    if isinstance(keys, (str, bytes)) or not hasattr(keys, "__len__"):
        raise ValueError(f"{name} must be a list of ints, got {type(keys).__name__}")
    out = []
    for i, k in enumerate(keys):
        try:
            if isinstance(k, bool):
                raise TypeError
            k = operator.index(k)
        except TypeError:
            raise ValueError(f"{name}[{i}] must be an int, got {k!r}") from None
        if not -(2**63) <= k < 2**63:
            raise ValueError(f"{name}[{i}] = {k} is outside the int64 range")
        out.append(k)
    if len(out) != n:
        raise ValueError(f"{name} must hold one entry per {per} ({n}), got {len(out)}")
    if len(set(out)) != n:
        raise ValueError(f"{name} must be distinct (equal keys draw identical random numbers), got {out[:16]}")
    return out


def check_sampling_args(*, guidance_scale=1.0, temperature=1.0, top_k=0, top_p=1.0) -> None:
    if guidance_scale < 1:
        raise ValueError(f"guidance_scale must be >= 1 (1 disables CFG), got {guidance_scale}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def filtered_logits(logits, *, temperature=1.0, top_k=0, top_p=1.0):
    """z / T with top-k and top-p applied (dropped tokens -> -inf): the final sampling logits, for
    anyone recomputing the sampler's log-probs."""
    z = logits.float() / temperature
    if top_k and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, idx = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        # keep a token when the mass strictly before it is < top_p (so at least one survives)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


class Sampler:
    """Draws tokens for one rollout; ``seed`` fixes the random stream, ``offset`` advances per step."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._noise = None  # draw_plain's noise: (keys, first step, log E [n, steps, V])

    def __call__(self, logits, uncond_logits=None, *, guidance_scale=1.0, temperature=1.0, top_k=0, top_p=1.0,
                 offset=0, keys=None):
        """-> (tokens int64 [B], log-probs float32 [B] under the final sampling distribution).

        ``keys``: None (the unkeyed stream of step (seed, offset)) or an int64 tensor [B] on the
        logits' device: row r's stream is (seed, offset, keys[r]), whatever the other rows are.
        """
        # check_nan=False: the check synchronises with the device (not allowed in CUDA graphs)
        return cfg_sample(logits, uncond_logits, guidance_scale=guidance_scale, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=self.seed, offset=offset, keys=keys,
                          return_logprobs=True, check_nan=False)

    def draw_plain(self, logits, step, *, num_steps, keys, greedy, out):
        """Plain sampling on CPU (no top-k / top-p) of the image step ``step`` of ``num_steps``,
        ``logits`` [n, V] already divided by the temperature (the image loop folds it into the head).

        Gumbel-max, argmax(log p - log E) with E ~ Exp(1), the noise of many steps drawn at once (one
        op per row instead of one per step), row i's from its own generator
        stream_generator(seed, IMAGE_OFFSET + the chunk's first step, keys[i]). The chunks depend on V
        and num_steps only, not on n, so a row's noise is a function of (seed, step, key).
        ``out``: (tokens [n], log-probs [n]) written in place; ``greedy`` (temperature 0) takes the
        argmax and leaves the log-prob as it is (0 in a zeroed buffer).
        """
        tokens, logprobs = out
        if greedy:
            return torch.argmax(logits, -1, out=tokens)
        logp = torch.log_softmax(logits, -1)
        keys = tuple(keys)
        if self._noise is None or self._noise[0] != keys or not 0 <= step - self._noise[1] < self._noise[2].shape[1]:
            V = logits.shape[-1]
            chunk = max(1, min(num_steps - step, (1 << 16) // V))
            e = torch.empty(len(keys), chunk, V, dtype=logits.dtype)
            for i, key in enumerate(keys):
                e[i].exponential_(generator=stream_generator(self.seed, IMAGE_OFFSET + step, key))
            self._noise = (keys, step, e.log_())
        _, start, noise = self._noise
        tok = torch.argmax(logp - noise[:, step - start], -1, out=tokens)
        logprobs.copy_(logp.gather(1, tok[:, None])[:, 0])
        return tok
