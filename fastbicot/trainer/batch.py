"""RolloutBatch -> the training batch: the sequences of the teacher-forced forward and, per trained
token, its sample, group, segment (CoT text / image) and aggregation weight.

Sequences are exactly the rollout's (packed: token i at position i), so the training forward sees
the positions the rollout saw:
  reprompt  a CoT row  ``cot_context + cot[:-1]``   -> text-head targets ``cot`` (EOS included)
            an image row ``image_context + image[:-1]`` -> image-head targets ``image``
  continue  one row ``cot_context + body + [BOI] + image[:-1]`` -> text targets ``cot`` (its EOS is
            predicted where BOI was fed instead), image targets ``image``
  CFG log-probs add the unconditional image row ``uncond_context + image[:-1]``.

Token order inside a sample: its text targets, then its image targets; samples in batch order.
The aggregation (LossConfig.aggregation) becomes one weight per token, normalised over the whole
step, so that the step's loss is ``sum(w * l)`` however the tokens are split into micro-batches:
by whole prompt groups (``optim.micro_batch_prompts``), and within them by a token budget
(``optim.micro_batch_tokens``, ``TrainBatch.split``) that may put a sample's CoT row and its image
row into different micro-batches.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

import torch

TEXT, IMAGE = 0, 1


@dataclass
class Row:
    """One training sequence: ``ids[:n_text]`` are text ids, the rest image ids; ``targets``
    are (position whose hidden state predicts, target id, head) triples in token order."""

    ids: list
    n_text: int
    kind: str  # "cot" | "image" | "uncond": rows of one kind are forwarded together
    targets: list  # [(pos, tok, TEXT | IMAGE)]


@dataclass
class TrainSample:
    index: int  # the sample's index in the RolloutBatch
    group: int
    advantage: float
    rows: list  # conditional rows
    uncond: Row | None  # the unconditional image row (CFG log-probs only)
    num_text: int
    num_image: int

    @property
    def num_tokens(self) -> int:
        return self.num_text + self.num_image


@dataclass
class TrainBatch:
    samples: list  # TrainSample, kept samples only (DAPO-filtered groups are left out)
    seq_ids: torch.Tensor  # int64 [T]: position of the token's sample in ``samples``
    segments: torch.Tensor  # int64 [T]: TEXT or IMAGE
    weights: torch.Tensor  # float64 [T]: aggregation weights; the step's loss is sum(w * l)
    advantages: torch.Tensor  # float32 [S]
    offsets: list  # token offset of each sample (and the total at the end)

    def micro_batches(self, groups_per_micro: int) -> list:
        """Lists of sample positions, each holding ``groups_per_micro`` whole prompt groups."""
        order, by_group = [], {}
        for i, s in enumerate(self.samples):
            if s.group not in by_group:
                by_group[s.group] = []
                order.append(s.group)
            by_group[s.group].append(i)
        out = []
        for k in range(0, len(order), groups_per_micro):
            out.append([i for g in order[k:k + groups_per_micro] for i in by_group[g]])
        return out

    def token_slice(self, sample_positions: list) -> torch.Tensor:
        """Indices of the tokens of these samples, in the order the forward returns them."""
        return torch.cat([torch.arange(self.offsets[i], self.offsets[i + 1]) for i in sample_positions])

    def part(self, sample_positions: list) -> MicroBatch:
        """The micro-batch of these whole samples."""
        return MicroBatch(list(sample_positions), [self.samples[i] for i in sample_positions],
                          self.token_slice(sample_positions))

    def split(self, groups_per_micro: int, max_tokens: int = 0, whole_samples: bool = False) -> list:
        """MicroBatches: ``groups_per_micro`` whole prompt groups each (``micro_batches``); with
        ``max_tokens`` > 0 each of those is cut further so that one forward packs at most
        ``max_tokens`` tokens (``packed_size``: shared prefixes once, the unconditional rows of CFG
        log-probs included). The unit is a row -- a sample's CoT row and its image row may land in
        different micro-batches -- or a whole sample with ``whole_samples`` (GSPO's sequence ratio
        needs all of a sample's tokens at once); the CoT rows of a group come first, so its shared
        CoT prompt is packed once. A unit larger than the budget runs alone. Exact: every token's
        loss term and weight are the same whichever micro-batch holds it."""
        chunks = self.micro_batches(groups_per_micro)
        if not max_tokens:
            return [self.part(c) for c in chunks]
        out = []
        for chunk in chunks:
            if whole_samples:
                units = [(i, list(self.samples[i].rows)) for i in chunk]
            else:
                units = [(i, [r]) for first in (True, False) for i in chunk for r in self.samples[i].rows
                         if (r.kind == "cot") == first]
            cur, packer = [], _PackedCount()
            for i, rows in units:
                s = self.samples[i]
                keys = [row_key(r) for r in rows]
                if s.uncond is not None and any(h == IMAGE for r in rows for _, _, h in r.targets):
                    keys.append(row_key(s.uncond))
                if cur and packer.size_with(keys) > max_tokens:
                    out.append(self._part_of_rows(cur))
                    cur, packer = [], _PackedCount()
                cur.append((i, rows))
                packer.add(keys)
            if cur:
                out.append(self._part_of_rows(cur))
        return out

    def _part_of_rows(self, units) -> MicroBatch:
        order, rows_of = [], {}
        for i, rows in units:
            if i not in rows_of:
                order.append(i)
                rows_of[i] = []
            rows_of[i] += rows
        views, tokens = [], []
        for i in order:
            s, rows = self.samples[i], rows_of[i]
            heads = {h for r in rows for _, _, h in r.targets}
            nt = s.num_text if TEXT in heads else 0
            ni = s.num_image if IMAGE in heads else 0
            views.append(TrainSample(s.index, s.group, s.advantage, rows, s.uncond if ni else None, nt, ni))
            o = self.offsets[i]
            if nt:
                tokens.append(torch.arange(o, o + nt))
            if ni:
                tokens.append(torch.arange(o + s.num_text, o + s.num_text + ni))
        return MicroBatch(order, views, torch.cat(tokens))


@dataclass
class MicroBatch:
    """Some samples, or some rows of them, run by one forward/backward."""

    positions: list  # position in TrainBatch.samples of each part
    samples: list  # TrainSample per part: the whole sample or a view holding some of its rows
    tokens: torch.Tensor  # int64: indices into the step's per-token tensors, in the forward's order
    # the forward's packed layout and target indices (trainer/logprobs.py), built by the first forward
    # over these samples and reused by the next (the reference's, then the policy's)
    reuse: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def seq_ids(self) -> torch.Tensor:
        """int64 [len(tokens)]: the part (0 .. len(samples) - 1) of each token."""
        return torch.repeat_interleave(torch.arange(len(self.samples)),
                                       torch.tensor([s.num_tokens for s in self.samples]))


# ---- packed sizes (trainer/logprobs.py lays rows out as a prefix tree) ---------------------------

def row_key(row) -> tuple:
    """A row's tokens as comparable ints: text ids as they are, image ids as -(id + 1) (a text and an
    image token with the same id are different inputs)."""
    return tuple(row.ids[: row.n_text]) + tuple(-1 - t for t in row.ids[row.n_text:])


def common_prefix(a, b) -> int:
    """Length of the common prefix of two sequences."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]: bisect with slice compares (C speed)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _shared(a, b) -> int:
    """Tokens rows a and b share in the packed layout: their common prefix, each keeping >= 1 token."""
    return min(common_prefix(a, b), len(a) - 1, len(b) - 1)


def packed_size(keys) -> int:
    """Tokens of the packed layout of rows with these ``row_key``s: every token once, except that
    rows adjacent in sorted order share their common prefix (the prefix tree's size)."""
    keys = sorted(keys)
    return sum(len(k) for k in keys) - sum(_shared(a, b) for a, b in itertools.pairwise(keys))


class _PackedCount:
    """``packed_size`` of a growing set of rows, updated per insertion in O(log n + row length)."""

    def __init__(self):
        self.keys, self.total = [], 0

    def _delta(self, key, keys) -> int:
        j = bisect.bisect_left(keys, key)
        a = keys[j - 1] if j > 0 else None
        b = keys[j] if j < len(keys) else None
        d = len(key)
        if a is not None:
            d -= _shared(a, key)
        if b is not None:
            d -= _shared(key, b)
        if a is not None and b is not None:
            d += _shared(a, b)
        return d

    def size_with(self, new_keys) -> int:
        keys, total = list(self.keys), self.total
        for k in new_keys:
            total += self._delta(k, keys)
            bisect.insort(keys, k)
        return total

    def add(self, new_keys) -> None:
        for k in new_keys:
            self.total += self._delta(k, self.keys)
            bisect.insort(self.keys, k)


def _sample_rows(s, image_mode: str, cfg_rows: bool):
    img = s.image_tokens.tolist()
    N = len(img)
    cot = list(s.cot_ids)
    if image_mode == "continue":
        ctx = list(s.image_context_ids)  # cot_context + body + [BOI]
        c0 = len(s.cot_context_ids)
        text_t = [(c0 - 1 + j, t, TEXT) for j, t in enumerate(cot)]
        b = len(ctx)
        image_t = [(b - 1 + j, t, IMAGE) for j, t in enumerate(img)]
        rows = [Row(ctx + img[:-1], len(ctx), "image", text_t + image_t)]
    else:
        c0 = len(s.cot_context_ids)
        text_row = Row(list(s.cot_context_ids) + cot[:-1], c0 + len(cot) - 1, "cot",
                       [(c0 - 1 + j, t, TEXT) for j, t in enumerate(cot)])
        b = len(s.image_context_ids)
        image_row = Row(list(s.image_context_ids) + img[:-1], b, "image",
                        [(b - 1 + j, t, IMAGE) for j, t in enumerate(img)])
        rows = [text_row, image_row] if cot else [image_row]  # no plan (rollout.semantic_cot=False)
    uncond = None
    if cfg_rows:
        if s.uncond_context_ids is None:
            raise ValueError("loss.cfg_logprobs needs the rollout's unconditional rows: "
                             "rollout.guidance_scale must be > 1")
        u = list(s.uncond_context_ids)
        uncond = Row(u + img[:-1], len(u), "uncond", [(len(u) - 1 + j, t, IMAGE) for j, t in enumerate(img)])
    return rows, uncond, len(cot), N


def aggregation_weights(seq_ids, segments, groups, *, aggregation: str, text_weight=1.0, image_weight=1.0,
                        max_tokens=None, live=None, world=None) -> torch.Tensor:
    """float64 [T] weights w with ``loss = sum(w * l)`` equal to the chosen aggregation:
    group_token_mean  mean over groups of (sum_g s*l / sum_g s)
    token_mean        sum s*l / sum s
    seq_mean          mean over sequences of (sum_seq s*l / sum_seq s)
    dr_grpo           sum s*l / (num_sequences * max_tokens)
    where s is the segment weight of each token (text_weight / image_weight).

    ``live`` (bool [T]): tokens that count (False: a filtered group kept in the batch with weight 0).
    ``world`` (trainer/distributed.py's Parallel): the totals (group / sequence counts, token sums,
    the longest sequence) are taken over every rank's tokens, so the ranks' losses add up to the
    single-process loss of the global batch."""
    s = torch.where(segments == TEXT, float(text_weight), float(image_weight)).double()
    if live is not None:
        s = s * live.double()
    total = world.sum if world is not None else (lambda x: x)
    largest = world.max if world is not None else (lambda x: x)
    if s.numel() == 0 and world is None:
        return s

    def per(ids):
        if ids.numel() == 0:
            total(0)  # this rank has no tokens; the others still wait for its count
            return s
        _, inv = torch.unique(ids, return_inverse=True)
        tot = torch.zeros(int(inv.max()) + 1, dtype=torch.float64).index_add_(0, inv, s)
        live_ids = tot > 0
        n_live = total(int(live_ids.sum()))
        return torch.where(live_ids[inv], s / tot.clamp(min=1e-300)[inv], 0.0) / max(n_live, 1)

    if aggregation == "group_token_mean":
        return per(groups)
    if aggregation == "seq_mean":
        return per(seq_ids)
    if aggregation == "token_mean":
        z = total(float(s.sum()))
        return s / z if z > 0 else s
    if aggregation == "dr_grpo":
        if live is None:
            n_seq = total(int(torch.unique(seq_ids).numel()))
            longest = int(torch.bincount(seq_ids).max()) if seq_ids.numel() else 0
        else:
            counts = torch.bincount(seq_ids, weights=live.double()) if seq_ids.numel() else torch.zeros(0)
            n_seq = total(int((counts > 0).sum()))
            longest = int(counts.max()) if counts.numel() else 0
        if max_tokens is None:
            max_tokens = largest(longest)
        return s / max(n_seq * max_tokens, 1)
    raise ValueError(f"unknown aggregation {aggregation!r}")


def pack(batch, advantages: torch.Tensor, loss, keep: torch.Tensor | None = None, world=None) -> TrainBatch:
    """The training batch of a RolloutBatch. ``loss`` is a LossConfig; ``keep`` (bool [N]) leaves
    out the samples of filtered groups. ``world`` (a multi-rank Parallel): normalise over every rank,
    and keep filtered samples with weight 0 instead of dropping them (every rank must run the same
    forwards and backwards)."""
    drop = world is None or not world.enabled
    world = None if drop else world
    mode = batch.config.image_mode if batch.config is not None else "reprompt"
    cfg_rows = loss.cfg_logprobs != "none"
    samples, seq, seg, grp, offsets, live = [], [], [], [], [0], []
    for i, s in enumerate(batch.samples):
        if keep is not None and drop and not bool(keep[i]):
            continue
        rows, uncond, nt, ni = _sample_rows(s, mode, cfg_rows)
        k = len(samples)
        samples.append(TrainSample(i, s.prompt_index, float(advantages[i]), rows, uncond, nt, ni))
        seq += [k] * (nt + ni)
        seg += [TEXT] * nt + [IMAGE] * ni
        grp += [s.prompt_index] * (nt + ni)
        live += [keep is None or bool(keep[i])] * (nt + ni)
        offsets.append(offsets[-1] + nt + ni)
    seq_t = torch.tensor(seq, dtype=torch.long)
    seg_t = torch.tensor(seg, dtype=torch.long)
    w = aggregation_weights(seq_t, seg_t, torch.tensor(grp, dtype=torch.long), aggregation=loss.aggregation,
                            text_weight=loss.text_weight, image_weight=loss.image_weight,
                            max_tokens=loss.max_tokens, world=world,
                            live=torch.tensor(live, dtype=torch.bool) if not drop and keep is not None else None)
    adv = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
    return TrainBatch(samples, seq_t, seg_t, w, adv, offsets)


def subset_groups(batch, groups: list):
    """``batch`` (a RolloutBatch) restricted to the samples of ``groups`` (prompt indices, in that order),
    renumbered 0..len-1 -> (batch, int64 index of the kept samples in ``batch``)."""
    import dataclasses

    new_index = {g: i for i, g in enumerate(groups)}
    rows = sorted((new_index[s.prompt_index], k) for k, s in enumerate(batch.samples) if s.prompt_index in new_index)
    rows = [k for _, k in rows]
    samples = [dataclasses.replace(batch.samples[k], prompt_index=new_index[batch.samples[k].prompt_index])
               for k in rows]
    idx = torch.tensor(rows, dtype=torch.long)
    changes = {"samples": samples, "image_tokens": batch.image_tokens[idx.to(batch.image_tokens.device)],
               "images": None if batch.images is None else batch.images[idx.to(batch.images.device)]}
    if getattr(batch, "group_index", None) is not None:
        changes["group_index"] = [batch.group_index[g] for g in groups]
    return dataclasses.replace(batch, **changes), idx


def mini_batches(batch, advantages: torch.Tensor, keep: torch.Tensor | None, k: int) -> list:
    """``optim.mini_batches``: the rollout's prompt groups dealt into ``k`` mini-batches, group g to
    mini-batch g mod k -> [(batch, advantages, keep)]. Dealt rather than cut in halves so that, with
    each rank owning a contiguous share of groups divisible by k, mini-batch j holds the same global
    groups on N ranks as in one process."""
    if k == 1:
        return [(batch, advantages, keep)]
    groups = sorted({s.prompt_index for s in batch.samples})
    out = []
    for j in range(k):
        part, idx = subset_groups(batch, [g for g in groups if g % k == j])
        out.append((part, advantages[idx.to(advantages.device)],
                    None if keep is None else keep[idx.to(keep.device)]))
    return out
