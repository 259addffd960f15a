"""RolloutEngine: semantic CoT, then image tokens, then pixels (DESIGN.md §2 steps 2-4).

CoT: the template is prefilled once per prompt into a shared prefix block read by the group's G
rows; rows stop on EOS or the token limit independently, and finished rows are swapped to the
back of the cache so each step runs only the active rows (no lock-step).

Image context modes:
  reprompt  (T2I-R1) ``BOS "User: {prompt}. " cot "\\n\\nAssistant:" BOI``: a fresh context per sample;
  continue  (ReasonGen / GoT) ``template cot BOI``: image tokens follow the CoT in the same rows,
            reusing the CoT's KV (no re-prefill of conditional rows).
Unconditional rows (CFG, guidance_scale > 1), ``uncond``:
  "all"       every token except BOS and the final BOI -> pad (the default; one shared
              ``BOS pad ... pad`` prefix block serves the whole batch)
  "cot"       only the CoT tokens -> pad (the prompt/template is kept)
  "keep_cot"  the prompt/template tokens -> pad, the CoT kept
Every sequence is packed (no padding): position i of a sample's sequence is i, exactly what the
trainer's teacher-forced forward uses. Settings: rollout.config.RolloutConfig.

Random streams: generation g of the prompt with global index ``group_index[i]`` draws every token
(CoT and image, CFG or not, before and after its row is compacted, eager or CUDA graph) from the
stream key ``group_index[i] * G + g`` (rollout.sampling), so a sample's tokens depend only on
(seed, its key, its prompt): a rank that generates its share of a global batch with the global
indices draws what a single process generating the whole batch draws.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..data import PromptRecord
from .config import RolloutConfig, apply_overrides
from .generate import (
    ImageDecoder,
    check_keys,
    default_flatten,
    image_cache,
    prefill_rows,
    rows_cache,
    trunk_for,
)
from .sampling import Sampler
from .templates import IMAGE_TEMPLATE_HEAD, IMAGE_TEMPLATE_TAIL, cot_prompt, image_prompt

_CTX, _COT, _KEEP = 0, 1, 2  # token segments: prompt/template, CoT, always kept (BOS, final BOI)


@dataclass
class RolloutSample:
    """One sample. Sequences are packed: token i sits at position i.

    CoT log-probs belong to ``cot_context_ids + cot_ids`` (text head); image log-probs to
    ``image_context_ids + image_tokens`` (image head; image tokens embedded by the generation
    embedding). With CFG the image log-probs are under the guided distribution; the matching
    unconditional sequence is ``uncond_context_ids + image_tokens``. These stored log-probs are
    the *sampling* distribution's (guided, filtered): the trainer recomputes its own.
    """

    prompt_index: int
    prompt: str
    cot_context_ids: list
    cot_ids: list  # sampled tokens, the final EOS included when the row stopped on it
    cot_text: str  # the CoT decoded with special tokens skipped (what the image context and rewards see)
    cot_logprobs: torch.Tensor  # float32 [len(cot_ids)]
    image_context_ids: list  # ends with BOI
    uncond_context_ids: list | None
    image_tokens: torch.Tensor  # int64 [num_image_tokens]
    image_logprobs: torch.Tensor  # float32 [num_image_tokens]
    image: torch.Tensor | None  # uint8 [H, W, 3]
    metadata: dict = field(default_factory=dict)  # the prompt record's fields (task_type, nouns, ...)


@dataclass
class RolloutBatch:
    """A rollout: samples prompt-major (sample s belongs to prompt s // num_generations)."""

    samples: list
    image_tokens: torch.Tensor  # [N, num_image_tokens]
    images: torch.Tensor | None  # uint8 [N, H, W, 3]
    timing: dict = field(default_factory=dict)  # seconds: cot, image, decode, total
    num_generations: int = 1
    config: RolloutConfig | None = None  # the settings that produced it
    group_index: list | None = None  # the global index of each prompt (generate's group_index)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def group_ids(self) -> torch.Tensor:
        """int64 [N]: the prompt (group) index of every sample within this batch (0 .. P-1)."""
        return torch.tensor([s.prompt_index for s in self.samples], dtype=torch.long)

    @property
    def global_group_ids(self) -> torch.Tensor:
        """int64 [N]: the global prompt index of every sample (``group_index[prompt_index]``)."""
        gi = self.group_index if self.group_index is not None else range(max(self.group_ids.tolist(), default=-1) + 1)
        return torch.tensor([gi[s.prompt_index] for s in self.samples], dtype=torch.long)

    @property
    def sample_keys(self) -> torch.Tensor:
        """int64 [N]: the random-stream key of every sample, global prompt index * G + generation."""
        G = self.num_generations
        return self.global_group_ids * G + torch.arange(len(self.samples)) % G

    def reward_inputs(self) -> dict:
        """Keyword arguments of a Reward / RewardEnsemble call: images, prompts, metadata, cots."""
        if self.images is None:
            raise ValueError("this rollout was generated with decode=False: it has no images to score")
        return dict(
            images=self.images,
            prompts=[s.prompt for s in self.samples],
            metadata=[s.metadata for s in self.samples],
            cots=[s.cot_text for s in self.samples],
        )


def decode_images(policy, tokens: torch.Tensor, rounding: str = "round") -> torch.Tensor:
    """Image tokens -> uint8 [N, H, W, 3]. ``rounding``: "round" to the nearest level, or
    "truncate" as the seed does (``uint8(clip((x + 1) / 2 * 255, 0, 255))``, grpo_trainer.py:702-706)."""
    from fastbicot.vq import vq_decode

    if rounding == "round" and policy.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return vq_decode(policy.vqmodel, tokens, output="uint8")
    if policy.dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = vq_decode(policy.vqmodel, tokens, output="float")
    else:  # transformers' decoder (float64 models: the extension is float32/16 only)
        x = policy.vqmodel.decode(tokens)
    x = ((x.float() + 1) / 2 * 255).clamp(0, 255)
    x = x.round() if rounding == "round" else x.trunc()
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RolloutEngine:
    """Generates BiCoT samples for a policy: ``RolloutEngine(policy, config).generate(prompts)``.

    ``config`` is a RolloutConfig (default: T2I-R1's settings); keyword arguments override its
    fields (``guidance_scale=3.0``, ``cot=dict(top_k=0)``) or use the flat names of the engine's
    first API (``cot_top_k``, ``max_new_tokens``, ``top_k`` ... see rollout.config.LEGACY_KWARGS).
    ``flatten`` and ``progress`` are execution choices, not semantics.
    """

    def __init__(self, policy, config: RolloutConfig | None = None, *, flatten=None, progress=False,
                 **overrides):
        if policy.tokenizer is None:
            raise ValueError("RolloutEngine needs a policy with a tokenizer")
        if config is not None and not isinstance(config, RolloutConfig):
            raise TypeError(f"config must be a RolloutConfig, got {type(config).__name__}")
        self.policy = policy
        self.config = apply_overrides(config or RolloutConfig(), overrides)
        self.progress = progress
        self.flat = default_flatten(policy, flatten)

    def _encode(self, text):
        return self.policy.tokenizer.encode(text, add_special_tokens=False)

    def _records(self, prompts) -> list[PromptRecord]:
        if isinstance(prompts, (str, PromptRecord)):
            prompts = [prompts]
        if isinstance(prompts, dict) or not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of strings or PromptRecords, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt")
        records = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                p = PromptRecord(p)
            elif not isinstance(p, PromptRecord):
                raise TypeError(f"prompts[{i}] must be a string or a PromptRecord, got {type(p).__name__} {p!r:.80}")
            if not isinstance(p.prompt, str) or not p.prompt.strip():
                raise ValueError(f"prompts[{i}] is empty or not text: {p.prompt!r:.80}")
            records.append(p)
        return records

    def cot_context(self, prompt: str, o: RolloutConfig | None = None) -> list:
        """[BOS] + the tokenized CoT prompt, left-truncated to ``max_prompt_length`` as the seed does."""
        o = o or self.config
        ids = [self.policy.bos_token_id] + self._encode(cot_prompt(prompt, o.template, o.system, o.instruction))
        return ids[-o.max_prompt_length:] if o.max_prompt_length is not None else ids

    @torch.no_grad()
    def generate(self, prompts, num_generations=None, *, seed=0, group_index=None, **overrides) -> RolloutBatch:
        """Sample ``num_generations`` (default: the config's) CoT + image per prompt.

        ``prompts``: strings or PromptRecords (their metadata travels to the rewards). Samples are
        ordered prompt-major: sample s belongs to prompt s // G.
        ``group_index``: the global index of each prompt in the step's batch (distinct non-negative
        ints; default 0 .. len(prompts)-1). Generation g of prompt i draws from the random stream
        ``group_index[i] * G + g``, so splitting a batch across calls (ranks) with the matching
        indices gives the samples one call gives.
        """
        o = apply_overrides(self.config, overrides)
        records = self._records(prompts)
        G = o.num_generations if num_generations is None else num_generations
        if isinstance(G, bool) or not isinstance(G, int) or G < 1:
            raise ValueError(f"num_generations must be a positive integer, got {G!r}")
        group_index = check_keys(group_index, len(records), "group_index", per="prompt")
        if min(group_index) < 0 or max(group_index) >= 2**63 // G:
            raise ValueError(f"group_index must hold non-negative ints below 2**63 / num_generations, got "
                             f"{min(group_index)} .. {max(group_index)}")
        sample_key = [group_index[s // G] * G + s % G for s in range(len(records) * G)]
        texts = [r.prompt for r in records]
        policy, dev = self.policy, self.policy.device
        P, R, N = len(records), len(records) * G, policy.num_image_tokens
        cfg, cont = o.guidance_scale > 1, o.image_mode == "continue"
        trunk = trunk_for(policy)
        sampler = Sampler(seed, dev)
        templates = [self.cot_context(t, o) for t in texts]
        max_new = o.cot.max_new_tokens
        longest = max(len(t) for t in templates) + max_new + 2  # + the flushed last token + BOI
        if longest > trunk.max_positions - N:
            raise ValueError(
                f"a CoT prompt of {max(len(t) for t in templates)} tokens + rollout.cot.max_new_tokens "
                f"{max_new} + {N} image tokens exceeds the model's {trunk.max_positions} positions"
            )
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=max_new + N, desc="rollout", leave=False)
        timing = {}

        # ---- semantic CoT ----------------------------------------------------------------------
        t0 = time.perf_counter()
        slot_sample = list(range(R))  # sample index held by each cache slot
        if o.semantic_cot:
            rows, groups = [templates[s // G] for s in range(R)], [s // G for s in range(R)]
            if cont:  # the same rows go on with BOI and the image tokens; the CFG rows join them later
                cache = image_cache(policy, 2 * P, longest, 2 * R, longest + N)
            else:  # a row's suffix: its context's last token + max_new (G rows share their template)
                cache, groups = rows_cache(policy, rows, groups, max_new, flat=self.flat)
            last = prefill_rows(trunk, cache, rows, range(R), groups)
            if self.flat:
                cache.flatten(0, R)
            cot_ids, cot_lps = self._cot_loop(trunk, cache, sampler, last, slot_sample, o, cont, bar, sample_key)
        else:  # images straight from the prompt (an empty plan); every context is prefilled fresh below
            cot_ids, cot_lps = [[] for _ in range(R)], [[] for _ in range(R)]
            cont = False
        if o.max_textcot_length is not None:  # the seed keeps the last N sampled tokens
            cot_ids = [c[-o.max_textcot_length:] for c in cot_ids]
            cot_lps = [c[-o.max_textcot_length:] for c in cot_lps]
        _sync(dev)
        timing["cot"] = time.perf_counter() - t0

        # ---- image tokens ----------------------------------------------------------------------
        t0 = time.perf_counter()
        eos, boi = policy.eos_token_id, policy.boi_token_id
        body = [c[:-1] if c and c[-1] == eos else c for c in cot_ids]  # the CoT without its EOS
        cot_texts = [policy.tokenizer.decode(b, skip_special_tokens=True) for b in body]
        ctx, seg = [], []
        for s in range(R):
            c, g = self.image_context(templates[s // G], texts[s // G], body[s], cot_texts[s], o)
            ctx.append(c)
            seg.append(g)
        uctx = [self._uncond(c, sg, o.uncond) for c, sg in zip(ctx, seg)] if cfg else None
        if cont:
            # conditional rows stay where the CoT left them; their next input is BOI
            first = [boi] * R
            if cfg:
                first += prefill_rows(
                    trunk,
                    cache,
                    [uctx[slot_sample[i]] for i in range(R)],
                    range(R, 2 * R),
                    [P + (slot_sample[i] // G if o.uncond == "cot" else 0) for i in range(R)],
                )
                if self.flat:
                    cache.flatten(R, 2 * R)
        else:
            slot_sample = list(range(R))
            trunk.check_positions(max(len(c) for c in ctx + (uctx or [])) + N)
            cache = None  # free the CoT cache before the image cache exists (both at once: ~10 GiB at 7B)
            rows, groups = list(ctx), list(range(R))  # a conditional row's whole context is its own block
            if cfg:
                rows += uctx
                groups += [R + (s // G if o.uncond == "cot" else 0) for s in range(R)]
            cache, groups = rows_cache(policy, rows, groups, N, flat=self.flat)
            first = prefill_rows(trunk, cache, rows, range(len(rows)), groups)
            if self.flat:
                cache.flatten(0, len(rows))
        dec = ImageDecoder(
            trunk,
            cache,
            R,
            guidance_scale=o.guidance_scale,
            temperature=o.image.temperature,
            top_k=o.image.top_k,
            top_p=o.image.top_p,
            sampler=sampler,
            num_tokens=N,
            cuda_graph=o.cuda_graph,
            flat=self.flat,
            keys=[sample_key[s] for s in slot_sample],  # the stream of the sample in each slot
        )
        tok_slots, lp_slots = dec.run(policy.embed_text(torch.tensor(first, device=dev)), progress=bar)
        order = torch.tensor([slot_sample.index(s) for s in range(R)], device=dev)
        tokens, img_lps = tok_slots[order], lp_slots[order]
        cache = dec = tok_slots = lp_slots = None  # the image cache and the decoder's tables: not needed for pixels
        _sync(dev)
        timing["image"] = time.perf_counter() - t0

        # ---- pixels ------------------------------------------------------------------------------
        t0 = time.perf_counter()
        images = decode_images(policy, tokens, o.pixel_rounding) if o.decode else None
        _sync(dev)
        timing["decode"] = time.perf_counter() - t0
        timing["total"] = timing["cot"] + timing["image"] + timing["decode"]
        if bar is not None:
            bar.close()

        tok_cpu, lp_cpu = tokens.cpu(), img_lps.cpu()
        samples = [
            RolloutSample(
                prompt_index=s // G,
                prompt=texts[s // G],
                cot_context_ids=templates[s // G],
                cot_ids=cot_ids[s],
                cot_text=cot_texts[s],
                cot_logprobs=torch.tensor(cot_lps[s], dtype=torch.float32),
                image_context_ids=ctx[s],
                uncond_context_ids=uctx[s] if cfg else None,
                image_tokens=tok_cpu[s],
                image_logprobs=lp_cpu[s],
                image=images[s] if images is not None else None,
                metadata=records[s // G].metadata,
            )
            for s in range(R)
        ]
        return RolloutBatch(samples=samples, image_tokens=tokens, images=images, timing=timing,
                            num_generations=G, config=o, group_index=group_index)

    def image_context(self, template, prompt, body, cot_text, o=None):
        """(context ids ending with BOI, segment of each id) for one sample's image step: ``template`` is
        the sample's CoT context, ``body`` its CoT ids without EOS, ``cot_text`` their decoded text."""
        o = o or self.config
        bos, boi = self.policy.bos_token_id, self.policy.boi_token_id
        if o.image_mode == "continue":
            return template + body + [boi], [_KEEP] + [_CTX] * (len(template) - 1) + [_COT] * len(body) + [_KEEP]
        if o.image_context == "splice":
            head = self._encode(IMAGE_TEMPLATE_HEAD.format(prompt=prompt))
            tail = self._encode(IMAGE_TEMPLATE_TAIL)
            ids = [bos] + head + body + tail + [boi]
            return ids, [_KEEP] + [_CTX] * len(head) + [_COT] * len(body) + [_CTX] * len(tail) + [_KEEP]
        # retokenize (the seed): the whole re-templated string tokenized at once
        text = image_prompt(prompt, cot_text)
        if o.uncond == "all":  # segments only matter to the other unconditional modes
            ids = self._encode(text)
            return [bos] + ids + [boi], [_KEEP] + [_CTX] * len(ids) + [_KEEP]
        enc = self.policy.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        cot = cot_text.strip()
        start = text.rfind(cot) if cot else len(text)
        end = start + len(cot)
        segs = [_COT if cot and start <= a < end else _CTX for a, _ in enc["offset_mapping"]]
        return [bos] + enc["input_ids"] + [boi], [_KEEP] + segs + [_KEEP]

    def _uncond(self, ids, seg, mode):
        masked = {"all": (_CTX, _COT), "cot": (_COT,), "keep_cot": (_CTX,)}[mode]
        pad = self.policy.pad_token_id
        return [pad if g in masked else t for t, g in zip(ids, seg)]

    def _cot_loop(self, trunk, cache, sampler, last, slot_sample, o, cont, bar, sample_key):
        """Sample CoT tokens for every row until EOS / max_new_tokens; returns (ids, log-probs) per sample.

        In ``continue`` mode a row that hits the limit without EOS runs one extra step so that its
        last token's KV is written too (the image context continues right after it); that step's
        draw is discarded. Step t of every row is its t-th draw, from its sample's stream key
        (``sample_key``), which moves with the row when finished rows are compacted.
        """
        policy, dev = self.policy, cache.suffix_k.device
        eos, max_new = policy.eos_token_id, o.cot.max_new_tokens
        R = len(slot_sample)
        ids = [[] for _ in range(R)]
        lps = [[] for _ in range(R)]
        x = policy.embed_text(torch.tensor(last, device=dev))
        keys = torch.tensor([sample_key[s] for s in slot_sample], dtype=torch.long, device=dev)
        n, step = R, 0
        while n > 0:
            h = trunk.decode(x[:n], cache, n, flat=self.flat)
            tok, lp = sampler(
                policy.text_logits(h),
                temperature=o.cot.temperature,
                top_k=o.cot.top_k,
                top_p=o.cot.top_p,
                offset=step,
                keys=keys[:n],
            )
            tok_l, lp_l = tok.tolist(), lp.tolist()
            if not all(map(math.isfinite, lp_l)):  # already on the host: no extra sync
                bad = [slot_sample[i] for i, x in enumerate(lp_l) if not math.isfinite(x)]
                raise FloatingPointError(f"non-finite logits in the CoT phase at CoT step {step} (samples "
                                         f"{bad[:8]}); the policy's weights or activations hold NaN/inf")
            done = []
            for i in range(n):
                s = slot_sample[i]
                stopped = len(ids[s]) == max_new or (len(ids[s]) > 0 and ids[s][-1] == eos)
                if not stopped:
                    ids[s].append(tok_l[i])
                    lps[s].append(lp_l[i])
                hit_eos = ids[s][-1] == eos  # EOS is never fed back: it is not part of any context
                at_limit = len(ids[s]) == max_new
                # at the limit without EOS: `continue` feeds the last token once more (flush step)
                done.append(stopped or hit_eos or (at_limit and not cont))
            x[:n] = policy.embed_text(tok)
            step += 1
            if bar is not None:
                bar.update(1)
            n = self._compact(cache, x, slot_sample, n, done, keys)
        return ids, lps

    @staticmethod
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
