"""Image-token generation: row setup with shared prefixes, the CFG decode loop, generate_images.

Rows of one decode step live in cache slots [0, rows): conditional rows first, then (with CFG) the
unconditional row of slot i at slot n + i. Every row's first decode input is the last token of
its context (BOI): prefill covers ``context[:-1]``, split into a shared prefix per group (the
longest common prefix of the group's rows) and the row's own remainder.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import attention_backend, uses_decode_kernel
from .kv_cache import KVCache
from .sampling import Sampler, check_sampling_args, stream_generator
from .trunk import Trunk

IMAGE_OFFSET = 1 << 24  # sampler offsets of image steps (CoT steps use 0, 1, ...): disjoint streams

_TRUNKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def trunk_for(policy) -> Trunk:
    """One Trunk (RoPE tables) per policy, built on first use; its layers re-read (a LoRA wrapper
    injected since) and, on CPU, its weights re-fused per rollout."""
    t = _TRUNKS.get(policy)
    if t is None or t.cos.device != policy.device or t.cos.dtype != policy.dtype:
        t = Trunk(policy, policy.max_positions)
        _TRUNKS[policy] = t
    else:
        t.refresh()
    if policy.device.type == "cpu":
        t.fuse_weights()
    return t


def _lcp_len(seqs) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


@dataclass
class RowLayout:
    """Where the rows' contexts (``seq[:-1]``: a row's last token is its first decode input) sit in a
    KVCache: row r reads prefix block ``groups[r]`` (``prefix_lens[g]`` tokens: the longest common
    prefix of the block's rows) and keeps ``remainders[r]`` tokens of its own in its suffix."""

    groups: list
    prefix_lens: list
    remainders: list

    @property
    def num_prefixes(self) -> int:
        return len(self.prefix_lens)

    @property
    def prefix_capacity(self) -> int:
        return max(self.prefix_lens)

    @property
    def max_remainder(self) -> int:
        return max(self.remainders)

    @property
    def max_context(self) -> int:
        return max(self.prefix_lens[g] + r for g, r in zip(self.groups, self.remainders))


def _lcp2(a, b) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _greedy_runs(lens, lcps, limit):
    """Cut rows (sorted by context; ``lcps[j]``: common prefix of rows j and j + 1) into the fewest
    consecutive runs whose longest row exceeds the run's common prefix by at most ``limit`` tokens:
    [(start, end, common prefix)]."""
    out, start, lcp, top = [], 0, lens[0], lens[0]
    for j in range(1, len(lens)):
        l2, t2 = min(lcp, lcps[j - 1]), max(top, lens[j])
        if t2 - l2 <= limit:
            lcp, top = l2, t2
        else:
            out.append((start, j, lcp))
            start, lcp, top = j, lens[j], lens[j]
    out.append((start, len(lens), lcp))
    return out


def layout_rows(seqs, groups, *, split=False) -> RowLayout:
    """The prefix block of every row: rows with the same ``groups`` entry may share one (their longest
    common prefix, prefilled once); blocks are numbered 0 .. K-1 in the order of the entries' first rows.

    ``split=False``: one block per ``groups`` entry. ``split=True`` (the grouped layout, where prefixes
    stay in their blocks): an entry's rows are cut into several blocks when that makes the cache smaller.
    A static cache holds K blocks x Lp (the longest context) + rows x (S + what decoding appends), S the
    longest remainder: every row's suffix is sized by the one row that runs furthest past its block's
    common prefix (an unconditional ``BOS pad ... pad`` row longer than the shortest one of its block).
    For every candidate S the fewest blocks are found greedily over each entry's rows in lexicographic
    order of their contexts (the minimum when rows differ only in length, as the unconditional rows of
    ``uncond="all"`` do), and the S of least ``K * Lp + rows * S`` is kept (ties: fewer blocks).
    """
    ctx = [list(s[:-1]) for s in seqs]
    lens = [len(c) for c in ctx]
    members: dict = {}
    for r, g in enumerate(groups):
        members.setdefault(g, []).append(r)
    parts = []  # per entry: its rows (sorted by context when splitting) and their adjacent common prefixes
    for rows in members.values():
        if split:
            rows = sorted(rows, key=lambda r: ctx[r])
        lcps = [_lcp2(ctx[a], ctx[b]) for a, b in itertools.pairwise(rows)] if split else None
        parts.append((rows, lcps))
    if not split:
        cuts = [[(0, len(rows), _lcp_len([ctx[r] for r in rows]))] for rows, _ in parts]
    else:
        cands = {0}
        for rows, lcps in parts:  # the remainder bound of every consecutive run
            for u in range(len(rows)):
                lcp = top = lens[rows[u]]
                for v in range(u + 1, len(rows)):
                    lcp, top = min(lcp, lcps[v - 1]), max(top, lens[rows[v]])
                    cands.add(top - lcp)
        Lp, n = max(lens), len(seqs)
        part_lens = [[lens[r] for r in rows] for rows, _ in parts]
        best = None
        for limit in sorted(cands):
            if best is not None and n * limit + len(parts) * Lp > best[0]:
                break  # every later candidate costs more than the best already found
            cuts_l = [_greedy_runs(pl, lcps, limit) if len(pl) > 1 else [(0, 1, pl[0])]
                      for pl, (_, lcps) in zip(part_lens, parts)]
            cost = sum(map(len, cuts_l)) * Lp + n * limit
            if best is None or cost <= best[0]:
                best = (cost, cuts_l)
        cuts = best[1]
    out_groups, prefix_lens, rem = [0] * len(seqs), [], [0] * len(seqs)
    for (rows, _), runs in zip(parts, cuts):
        for start, end, lcp in runs:
            for r in rows[start:end]:
                out_groups[r] = len(prefix_lens)
                rem[r] = lens[r] - lcp
            prefix_lens.append(lcp)
    return RowLayout(out_groups, prefix_lens, rem)


def rows_cache(policy, seqs, groups, decode_tokens, *, flat) -> tuple:
    """(KVCache, groups) for the rows ``seqs`` that then decode ``decode_tokens`` tokens each: prefill
    it with ``prefill_rows(trunk, cache, seqs, range(len(seqs)), groups)``. The blocks hold the rows'
    shared prefixes; a row's suffix holds 1 + decode_tokens slots (the context's last token, then what
    is drawn) after its remainder (grouped layout, ``layout_rows(split=True)``) or after its whole
    context (``flat``: KVCache.flatten copies the prefix in front)."""
    lay = layout_rows(seqs, groups, split=not flat)
    need = lay.max_context if flat else lay.max_remainder
    cache = image_cache(policy, lay.num_prefixes, lay.prefix_capacity, len(seqs), need + 1 + decode_tokens)
    return cache, lay.groups


def as_token_lists(input_ids, name="input_ids"):
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ValueError(
                f"{name} must be a [B, L] tensor or a list of token-id lists, got shape {tuple(input_ids.shape)}"
            )
        seqs = input_ids.tolist()
    else:
        seqs = [list(map(int, s)) for s in input_ids]
    if not seqs:
        raise ValueError(f"{name} is empty: give at least one prompt")
    if any(len(s) == 0 for s in seqs):
        raise ValueError(f"{name} has an empty row")
    return seqs


PREFILL_TOKENS = 8192  # padded tokens (+ the prefix keys they attend to) per prefill batch


def _batches(sizes, budget=None):
    """Batches of indices into ``sizes`` = [(tokens, prefix keys)], longest first, each of at most
    ``budget`` (default PREFILL_TOKENS) padded query + key positions: rows x (longest tokens + longest
    prefix). A row over the budget goes alone. Bounds the prefill's transient activations (one layer of
    the batch) whatever the number of rows."""
    budget = PREFILL_TOKENS if budget is None else budget
    out, cur, top = [], [], (0, 0)
    for i in sorted(range(len(sizes)), key=lambda i: -sum(sizes[i])):
        t = (max(top[0], sizes[i][0]), max(top[1], sizes[i][1]))
        if cur and (len(cur) + 1) * sum(t) > budget:
            out.append(cur)
            cur, t = [], sizes[i]
        cur.append(i)
        top = t
    if cur:
        out.append(cur)
    return out


def prefill_rows(trunk: Trunk, cache: KVCache, seqs, slots, groups) -> list:
    """Fill the cache for rows ``slots`` whose contexts are ``seqs`` (token lists).

    Rows with the same ``groups`` entry (a prefix-block index) share the longest common prefix of
    their ``seq[:-1]``; the rest of each row goes to its suffix. Trunk.prefill writes each layer's
    K/V straight into the cache; blocks and remainders run in batches of at most PREFILL_TOKENS padded
    positions. Returns every row's last token, the input of its first decode step.
    """
    policy, dev = trunk.policy, cache.suffix_k.device
    by_group: dict = {}
    for s, g in zip(seqs, groups):
        by_group.setdefault(g, []).append(s[:-1])
    prefix = {g: ss[0][: _lcp_len(ss)] for g, ss in by_group.items()}
    trunk.check_positions(max(len(s) for s in seqs))
    if max(len(p) for p in prefix.values()) > cache.prefix_capacity:
        raise ValueError(
            f"prompt prefix of {max(len(p) for p in prefix.values())} tokens exceeds the cache "
            f"capacity {cache.prefix_capacity}"
        )
    # 1. shared prefix blocks, right-padded causal batches
    gs = [g for g in prefix if prefix[g]]
    for g, pre in prefix.items():
        cache.prefix_len[g] = len(pre)
    for batch in _batches([(len(prefix[g]), 0) for g in gs]):
        bg = [gs[i] for i in batch]
        L = max(len(prefix[g]) for g in bg)
        ids = torch.full((len(bg), L), policy.pad_token_id, dtype=torch.long)
        for i, g in enumerate(bg):
            ids[i, : len(prefix[g])] = torch.tensor(prefix[g])
        ids = ids.to(dev)
        trunk.prefill(policy.embed_text(ids), torch.arange(L, device=dev).expand(len(bg), L),
                      kv_out=(cache.prefix_kv, torch.tensor(bg, device=dev)))
    # 2. per-row remainders, attending to their group's prefix
    rem = [s[len(prefix[g]) : -1] for s, g in zip(seqs, groups)]
    slot_t = torch.tensor(list(slots), device=dev)
    cache.group_ids[slot_t] = torch.tensor(list(groups), dtype=torch.int32, device=dev)
    cache.suffix_len[slot_t] = torch.tensor([len(r) for r in rem], dtype=torch.int32, device=dev)
    if max(len(r) for r in rem) + 1 > cache.suffix_capacity:
        raise ValueError("row context exceeds the cache's suffix capacity")
    todo = [i for i, r in enumerate(rem) if r]
    for batch in _batches([(len(rem[i]), len(prefix[groups[i]])) for i in todo]):
        bt = [todo[j] for j in batch]
        L = max(len(rem[i]) for i in bt)
        ids = torch.full((len(bt), L), policy.pad_token_id, dtype=torch.long)
        for j, i in enumerate(bt):
            ids[j, : len(rem[i])] = torch.tensor(rem[i])
        ids = ids.to(dev)
        gid = torch.tensor([groups[i] for i in bt], dtype=torch.int32, device=dev)
        start = cache.prefix_len[gid.long()].long()
        positions = start[:, None] + torch.arange(L, device=dev)[None]
        lp = max(max(len(prefix[groups[i]]) for i in bt), 1)  # the longest prefix these rows read
        rows = slot_t[torch.tensor(bt, device=dev)]
        trunk.prefill(policy.embed_text(ids), positions, kv_out=(cache.suffix_kv, rows), prefix=(cache, gid, lp))
    return [s[-1] for s in seqs]


class ImageDecoder:
    """The image decode loop over cache rows [0, rows): trunk step + image head + CFG + sampler +
    embedding of the drawn token, all into static buffers. On CUDA the step is captured once in a
    CUDA graph and replayed (the step counter and sampler offset are device tensors advanced
    inside the graph); on CPU it runs eagerly with the same buffers.

    On CPU a decode step of a small model is bound by the number of torch ops, so the CPU step is
    lean: the fused-weight trunk step over flattened rows (Trunk.decode_flat, RoPE rows and the
    K/V write index advanced once per step, not per layer), CFG as one lerp on the head's hidden,
    the temperature folded into the head's last Linear, and plain temperature sampling (no top-k /
    top-p) as Gumbel-max with the noise of many steps drawn at once (_plain_noise).

    ``keys``: the stream key of each of the n samples (row i and, with CFG, row n + i), default
    0 .. n-1: every draw of row i is a function of (sampler seed, step, keys[i]) only (DESIGN.md §4,
    stream keys). On the device in a static buffer, read by the sampler (and the CUDA graph).
    """

    def __init__(
        self,
        trunk,
        cache,
        n,
        *,
        guidance_scale,
        temperature,
        top_k,
        top_p,
        sampler,
        num_tokens,
        cuda_graph=True,
        flat=False,
        keys=None,
    ):
        policy = trunk.policy
        self.flat = flat
        self.trunk, self.cache, self.n, self.policy = trunk, cache, n, policy
        self.cfg = guidance_scale > 1
        self.rows = 2 * n if self.cfg else n
        self.w, self.temperature, self.top_k, self.top_p = float(guidance_scale), temperature, top_k, top_p
        self.sampler, self.num_tokens = sampler, num_tokens
        dev = cache.suffix_k.device
        self.x = torch.zeros(self.rows, policy.hidden_size, dtype=policy.dtype, device=dev)
        self.tokens = torch.zeros(n, num_tokens, dtype=torch.long, device=dev)
        self.logprobs = torch.zeros(n, num_tokens, dtype=torch.float32, device=dev)
        self.step_idx = torch.zeros(1, dtype=torch.long, device=dev)
        self.key_list = list(range(n)) if keys is None else [int(k) for k in keys]
        if len(self.key_list) != n:
            raise ValueError(f"keys must hold one stream key per sample ({n}), got {len(self.key_list)}")
        self.sample_keys = torch.tensor(self.key_list, dtype=torch.long, device=dev)  # static: the graph reads it
        self.use_graph = cuda_graph and dev.type == "cuda"
        self.graph = None
        # The image-token embedding (generation embedding + aligner MLP) is a pure function of
        # the id: one [V_img, H] table per rollout (weights change between rollouts), one
        # index_select per step.
        with torch.no_grad():
            self.table = policy.embed_image(torch.arange(policy.image_vocab_size, device=dev))
        cpu = dev.type == "cpu"
        self.lean = cpu and flat and trunk.fused is not None
        self.plain = cpu and top_k == 0 and top_p == 1.0  # sampled by _draw_plain
        head = policy.image_head_linear
        t = float(temperature) if self.plain and temperature > 0 else 1.0
        self.head_w = head.weight.detach() / t  # logits / T in the head's own matmul
        self.head_b = None if head.bias is None else head.bias.detach() / t

    # ---- CPU: plain temperature sampling -------------------------------------------------------
    def _plain_noise(self, step):
        """log E [n, chunk, V], E ~ Exp(1), for steps [step, step + chunk): argmax(log p - log E) draws from p.

        Drawn a chunk of steps at a time (one op per row instead of one per step), row i's from its
        own generator stream_generator(seed, IMAGE_OFFSET + step, keys[i]). The chunks depend on V
        and the token count only, not on n, so a row's noise is a function of (seed, step, key).
        """
        V = self.table.shape[0]
        chunk = max(1, min(self.num_tokens - step, (1 << 16) // V))
        e = torch.empty(self.n, chunk, V, dtype=self.table.dtype)
        for i, key in enumerate(self.key_list):
            e[i].exponential_(generator=stream_generator(self.sampler.seed, IMAGE_OFFSET + step, key))
        return e.log_(), step

    def _draw_plain(self, s, t):
        """s [n, V]: guided logits / T -> tokens[t], logprobs[t] (buffers laid out [steps, n])."""
        if self.temperature == 0:
            torch.argmax(s, -1, out=self.tokens_t[t])  # greedy: log-prob 0 (buffer is zeros)
            return self.tokens_t[t]
        logp = torch.log_softmax(s, -1)
        if t - self.noise[1] >= self.noise[0].shape[1]:
            self.noise = self._plain_noise(t)
        tok = torch.argmax(logp - self.noise[0][:, t - self.noise[1]], -1, out=self.tokens_t[t])
        torch.gather(logp, 1, tok[:, None], out=self.logprobs_t[t][:, None])
        return tok

    def _lean_step(self, t):
        n, p = self.n, self.policy
        if self.native:
            h = self.trunk.decode_flat_native(self.x, self.cache, self.wpos[t], self.cos_sin[t])
        else:
            ls = self.ls0 + t + 1
            hidden = None if self.lim is None else self.keys[:ls] >= self.lim + t
            h = self.trunk.decode_flat(self.x, self.cache, self.widx0 + t, self.cos_sin[t], ls, hidden)
        z = p.image_head_hidden(h)
        if self.cfg:  # the head's last layer is linear: CFG on its input == CFG on the logits
            z = torch.lerp(z[n:], z[:n], self.w)
        s = F.linear(z, self.head_w, self.head_b)
        tok = self._draw_plain(s, t) if self.plain else self._draw(s, t)
        torch.index_select(self.table, 0, tok, out=self.x[:n])
        if self.cfg:
            self.x[n:].copy_(self.x[:n])

    def _lean_setup(self):
        """Per-rollout tables of the lean CPU step: RoPE rows of every step, the K/V write index,
        the key mask of rows shorter than the longest (None when all rows are equally long)."""
        c, R, N = self.cache, self.rows, self.num_tokens
        dev = self.x.device
        s0 = c.suffix_len[:R].long()  # flattened: a row's suffix is its whole context
        steps = torch.arange(N, device=dev)
        self.cos_sin = self.trunk.cos_sin[c.positions(R)[None] + steps[:, None]]  # [N, R, 2D]
        H, Ls = c.suffix_kv.shape[3], c.suffix_kv.shape[4]
        kv_t, row, head = torch.meshgrid(
            torch.arange(2, device=dev), torch.arange(R, device=dev), torch.arange(H, device=dev), indexing="ij"
        )
        self.widx0 = (((kv_t * c.num_rows + row) * H + head) * Ls + s0[None, :, None]).reshape(-1)
        self.ls0 = int(s0.max())
        self.lim = None if int(s0.min()) == self.ls0 else (s0 + 1)[:, None, None, None]
        self.keys = torch.arange(Ls, device=dev)
        self.wpos = s0[None] + steps[:, None]  # [N, R]: the slot each row writes at each step
        self.native = self.lean and self.trunk.native_ok()
        self.tokens_t = torch.zeros(N, self.n, dtype=torch.long, device=dev)
        self.logprobs_t = torch.zeros(N, self.n, dtype=self.table.dtype, device=dev)
        self.noise = (self.table.new_empty(self.n, 0, 1), 0)

    def _draw(self, s, t):
        """Any other sampling setting (top-k / top-p): the fused sampler, into the same buffers."""
        tok, lp = self.sampler(
            s,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            offset=t + IMAGE_OFFSET,
            keys=self.sample_keys,
        )
        self.tokens_t[t] = tok
        self.logprobs_t[t] = lp
        return tok

    # ---- the general step (CUDA graph, grouped CPU layout) --------------------------------------
    def _step(self):
        n, p = self.n, self.policy
        h = self.trunk.decode(self.x, self.cache, self.rows, static=self.use_graph, flat=self.flat)
        z = p.image_head_hidden(h)
        if self.cfg:  # the head's last layer is linear: CFG on its input == CFG on the logits
            z = z[n:] + self.w * (z[:n] - z[n:])
        logits = F.linear(z, self.head_w, self.head_b)
        if self.plain:
            tok = self._draw_plain(logits, self.step_i)
            self.step_i += 1
        else:
            tok, lp = self.sampler(
                logits,
                temperature=self.temperature,
                top_k=self.top_k,
                top_p=self.top_p,
                offset=self.step_idx[0] + IMAGE_OFFSET,
                keys=self.sample_keys,
            )
            self.tokens.index_copy_(1, self.step_idx, tok[:, None])
            self.logprobs.index_copy_(1, self.step_idx, lp.float()[:, None])
        e = self.table.index_select(0, tok)
        self.x[:n] = e
        if self.cfg:
            self.x[n:] = e
        self.step_idx += 1

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
            self._step()
        torch.cuda.current_stream().wait_stream(stream)
        restore()
        self.graph = torch.cuda.CUDAGraph()
        gen = getattr(self.sampler, "generator", None)
        if gen is not None and hasattr(self.graph, "register_generator_state"):
            self.graph.register_generator_state(gen)
        with torch.cuda.graph(self.graph):
            self._step()
        restore()

    @torch.no_grad()  # not inference_mode: the tokens are used by the training step's autograd
    def run(self, first_inputs, progress=None):
        """first_inputs [rows, H]: embeddings of each row's last context token (BOI)."""
        self.x.copy_(first_inputs)
        if self.use_graph:
            self._capture()
        if self.lean:
            self._lean_setup()
        elif self.plain:  # CPU, grouped layout: the general trunk step, the plain sampler
            self._lean_setup()
            self.step_i = 0
        for t in range(self.num_tokens):
            if self.graph is not None:
                self.graph.replay()
            elif self.lean:
                self._lean_step(t)
            else:
                self._step()
            if progress is not None:
                progress.update(1)
        if self.lean:
            self.cache.suffix_len[: self.rows] += self.num_tokens
        if self.lean or self.plain:
            tokens, logprobs = self.tokens_t.t().contiguous(), self.logprobs_t.t().float()
        else:
            tokens, logprobs = self.tokens, self.logprobs
        check_finite_logprobs(logprobs, "image")
        return tokens, logprobs


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


def default_flatten(policy, flatten=None) -> bool:
    """Flatten prefixes into rows (KVCache.flatten) unless the grouped decode kernel is in use."""
    return (not uses_decode_kernel(policy.device)) if flatten is None else bool(flatten)


def decode_backend(policy) -> str:
    """Which decode step generate_images runs on ``policy`` (reported by the bench):
    "cpp-decode-step" (fastbicot._C.decode_step_cpu, CPU), else the attention backend's name."""
    flat = default_flatten(policy)
    if policy.device.type == "cpu" and flat and trunk_for(policy).native_ok():
        return "cpp-decode-step"
    return attention_backend(policy.device, flat)


def image_cache(policy, num_prefixes, prefix_capacity, num_rows, suffix_capacity) -> KVCache:
    return KVCache(
        policy.num_layers,
        policy.num_kv_heads,
        policy.head_dim,
        num_prefixes=num_prefixes,
        prefix_capacity=prefix_capacity,
        num_rows=num_rows,
        suffix_capacity=suffix_capacity,
        dtype=policy.dtype,
        device=policy.device,
    )


@torch.no_grad()
def generate_images(
    policy,
    input_ids,
    *,
    guidance_scale=5.0,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    seed=0,
    cuda_graph=True,
    flatten=None,
    return_logprobs=False,
    keys=None,
):
    """Image tokens for each row of ``input_ids`` (each ending with BOI) -> LongTensor [B, N].

    Unconditional rows (guidance_scale > 1) are the conditional ids with every token except BOS
    and BOI replaced by pad, as transformers' Janus generate builds them; their common
    ``BOS pad ... pad`` prefix is computed once for the whole batch. Rows of different lengths are
    packed, not padded: each row sees the positions it would see alone. ``flatten``: copy shared
    prefixes into the rows after prefill (default: when the grouped decode kernel is not in use).
    ``keys``: the random-stream key of each row (ints, default 0 .. B-1): a row's tokens depend on
    (seed, its key, its context) only, not on the other rows.
    """
    check_sampling_args(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p)
    seqs = as_token_lists(input_ids)
    keys = check_keys(keys, len(seqs))
    if hasattr(policy, "check_token_ids"):  # before any embedding: an OOV id is a raw IndexError there
        policy.check_token_ids(seqs, "input_ids")
    bad = [i for i, s in enumerate(seqs) if s[-1] != policy.boi_token_id]
    if bad:
        raise ValueError(f"rows {bad[:5]} of input_ids do not end with the BOI token ({policy.boi_token_id})")
    trunk = trunk_for(policy)
    N = policy.num_image_tokens
    trunk.check_positions(max(len(s) for s in seqs) + N)
    B, cfg = len(seqs), guidance_scale > 1
    rows = seqs
    slots, groups = list(range(B)), list(range(B))
    if cfg:
        uncond = [policy.unconditional_ids(torch.tensor(s)).tolist() for s in seqs]
        rows = seqs + uncond
        slots += list(range(B, 2 * B))
        groups += [B] * B
    flat = default_flatten(policy, flatten)
    cache, groups = rows_cache(policy, rows, groups, N, flat=flat)
    last = prefill_rows(trunk, cache, rows, slots, groups)
    if flat:
        cache.flatten(0, len(rows))
    dec = ImageDecoder(
        trunk,
        cache,
        B,
        guidance_scale=guidance_scale,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        sampler=Sampler(seed, policy.device),
        num_tokens=N,
        cuda_graph=cuda_graph,
        flat=flat,
        keys=keys,
    )
    tokens, logprobs = dec.run(policy.embed_text(torch.tensor(last, device=policy.device)))
    return (tokens, logprobs) if return_logprobs else tokens
