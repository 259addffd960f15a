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
trainer's teacher-forced forward uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .cot import (
    COT_TEMPLATE,
    IMAGE_TEMPLATE_HEAD,
    IMAGE_TEMPLATE_TAIL,
    INSTRUCTION,
    SYSTEM_PROMPT,
    cot_prompt,
)
from .generate import ImageDecoder, default_flatten, image_cache, prefill_rows, trunk_for
from .sampling import Sampler, check_sampling_args

IMAGE_MODES = ("reprompt", "continue")
UNCOND_MODES = ("all", "cot", "keep_cot")
_CTX, _COT, _KEEP = 0, 1, 2  # token segments: prompt/template, CoT, always kept (BOS, final BOI)


@dataclass
class RolloutSample:
    """One sample. Sequences are packed: token i sits at position i.

    CoT log-probs belong to ``cot_context_ids + cot_ids`` (text head); image log-probs to
    ``image_context_ids + image_tokens`` (image head; image tokens embedded by the generation
    embedding). With CFG the image log-probs are under the guided distribution; the matching
    unconditional sequence is ``uncond_context_ids + image_tokens``.
    """

    prompt_index: int
    prompt: str
    cot_context_ids: list
    cot_ids: list  # sampled tokens, the final EOS included when the row stopped on it
    cot_text: str
    cot_logprobs: torch.Tensor  # float32 [len(cot_ids)]
    image_context_ids: list  # ends with BOI
    uncond_context_ids: list | None
    image_tokens: torch.Tensor  # int64 [num_image_tokens]
    image_logprobs: torch.Tensor  # float32 [num_image_tokens]
    image: torch.Tensor | None  # uint8 [H, W, 3]


@dataclass
class RolloutBatch:
    samples: list
    image_tokens: torch.Tensor  # [N, num_image_tokens]
    images: torch.Tensor | None  # uint8 [N, H, W, 3]
    timing: dict = field(default_factory=dict)  # seconds: cot, image, decode, total


def decode_images(policy, tokens: torch.Tensor) -> torch.Tensor:
    """Image tokens -> uint8 [N, H, W, 3] through fastbicot.vq_decode when present."""
    try:
        from fastbicot.vq import vq_decode
    except ImportError:
        vq_decode = None
    if vq_decode is not None and policy.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return vq_decode(policy.vqmodel, tokens, output="uint8")
    # transformers' decoder (float64 models, or before fastbicot.vq exists)
    x = policy.vqmodel.decode(tokens)
    return ((x.float().clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RolloutEngine:
    def __init__(
        self,
        policy,
        *,
        template=COT_TEMPLATE,
        system=SYSTEM_PROMPT,
        instruction=INSTRUCTION,
        cot_temperature=1.0,
        cot_top_k=50,
        cot_top_p=1.0,
        max_new_tokens=256,
        image_mode="reprompt",
        uncond="all",
        guidance_scale=5.0,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        decode=True,
        cuda_graph=True,
        flatten=None,
        progress=False,
    ):
        if policy.tokenizer is None:
            raise ValueError("RolloutEngine needs a policy with a tokenizer")
        self.policy = policy
        self.template, self.system, self.instruction = template, system, instruction
        self.defaults = dict(
            cot_temperature=cot_temperature,
            cot_top_k=cot_top_k,
            cot_top_p=cot_top_p,
            max_new_tokens=max_new_tokens,
            image_mode=image_mode,
            uncond=uncond,
            guidance_scale=guidance_scale,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            decode=decode,
        )
        self.cuda_graph, self.progress = cuda_graph, progress
        self.flat = default_flatten(policy, flatten)
        self._check(self.defaults)

    @staticmethod
    def _check(o):
        check_sampling_args(
            guidance_scale=o["guidance_scale"],
            temperature=o["temperature"],
            top_k=o["top_k"],
            top_p=o["top_p"],
        )
        check_sampling_args(temperature=o["cot_temperature"], top_k=o["cot_top_k"], top_p=o["cot_top_p"])
        if o["image_mode"] not in IMAGE_MODES:
            raise ValueError(f"image_mode must be one of {IMAGE_MODES}, got {o['image_mode']!r}")
        if o["uncond"] not in UNCOND_MODES:
            raise ValueError(f"uncond must be one of {UNCOND_MODES}, got {o['uncond']!r}")
        if o["max_new_tokens"] < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {o['max_new_tokens']}")

    def _encode(self, text):
        return self.policy.tokenizer.encode(text, add_special_tokens=False)

    @torch.no_grad()
    def generate(self, prompts, num_generations=8, *, seed=0, **overrides) -> RolloutBatch:
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            raise TypeError(f"unknown generate options {sorted(unknown)}")
        o = {**self.defaults, **overrides}
        self._check(o)
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt")
        if num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {num_generations}")
        policy, G, dev = self.policy, int(num_generations), self.policy.device
        P, R, N = len(prompts), len(prompts) * int(num_generations), policy.num_image_tokens
        trunk = trunk_for(policy)
        sampler = Sampler(seed, dev)
        bos, boi = policy.bos_token_id, policy.boi_token_id
        templates = [
            [bos] + self._encode(cot_prompt(p, self.template, self.system, self.instruction)) for p in prompts
        ]
        longest = max(len(t) for t in templates) + o["max_new_tokens"] + 2  # + the flushed last token + BOI
        limit = trunk.max_positions - N
        if longest > limit:
            raise ValueError(
                f"a CoT prompt of {max(len(t) for t in templates)} tokens + max_new_tokens "
                f"{o['max_new_tokens']} + {N} image tokens exceeds the model's {trunk.max_positions} "
                f"positions"
            )
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=o["max_new_tokens"] + N, desc="rollout", leave=False)
        cfg = o["guidance_scale"] > 1
        cont = o["image_mode"] == "continue"
        timing = {}

        # ---- semantic CoT ----------------------------------------------------------------------
        t0 = time.perf_counter()
        cache = image_cache(
            policy, 2 * P if cont else P, longest, 2 * R if cont else R, longest + (N if cont else 0)
        )
        slot_sample = list(range(R))  # sample index held by each cache slot
        last = prefill_rows(
            trunk, cache, [templates[s // G] for s in range(R)], range(R), [s // G for s in range(R)]
        )
        if self.flat:
            cache.flatten(0, R)
        cot_ids, cot_lps = self._cot_loop(trunk, cache, sampler, last, slot_sample, o, cont, bar)
        _sync(dev)
        timing["cot"] = time.perf_counter() - t0

        # ---- image tokens ----------------------------------------------------------------------
        t0 = time.perf_counter()
        eos = policy.eos_token_id
        body = [c[:-1] if c and c[-1] == eos else c for c in cot_ids]  # the CoT text without its EOS
        ctx, seg = [], []
        for s in range(R):
            if cont:
                t = templates[s // G]
                ctx.append(t + body[s] + [boi])
                seg.append([_KEEP] + [_CTX] * (len(t) - 1) + [_COT] * len(body[s]) + [_KEEP])
            else:
                head = self._encode(IMAGE_TEMPLATE_HEAD.format(prompt=prompts[s // G]))
                tail = self._encode(IMAGE_TEMPLATE_TAIL)
                ctx.append([bos] + head + body[s] + tail + [boi])
                seg.append(
                    [_KEEP] + [_CTX] * len(head) + [_COT] * len(body[s]) + [_CTX] * len(tail) + [_KEEP]
                )
        uctx = [self._uncond(c, sg, o["uncond"]) for c, sg in zip(ctx, seg)] if cfg else None
        if cont:
            # conditional rows stay where the CoT left them; their next input is BOI
            first = [boi] * R
            if cfg:
                first += prefill_rows(
                    trunk,
                    cache,
                    [uctx[slot_sample[i]] for i in range(R)],
                    range(R, 2 * R),
                    [P + (slot_sample[i] // G if o["uncond"] == "cot" else 0) for i in range(R)],
                )
                if self.flat:
                    cache.flatten(R, 2 * R)
        else:
            slot_sample = list(range(R))
            lens = [len(c) for c in ctx + (uctx or [])]
            cache = image_cache(policy, R + P, max(lens), 2 * R if cfg else R, max(lens) + 1 + N)
            rows, slots, groups = list(ctx), list(range(R)), list(range(R))
            if cfg:
                rows += uctx
                slots += list(range(R, 2 * R))
                groups += [R + (s // G if o["uncond"] == "cot" else 0) for s in range(R)]
            first = prefill_rows(trunk, cache, rows, slots, groups)
            if self.flat:
                cache.flatten(0, len(rows))
        dec = ImageDecoder(
            trunk,
            cache,
            R,
            guidance_scale=o["guidance_scale"],
            temperature=o["temperature"],
            top_k=o["top_k"],
            top_p=o["top_p"],
            sampler=sampler,
            num_tokens=N,
            cuda_graph=self.cuda_graph,
            flat=self.flat,
        )
        tok_slots, lp_slots = dec.run(policy.embed_text(torch.tensor(first, device=dev)), progress=bar)
        order = torch.tensor([slot_sample.index(s) for s in range(R)], device=dev)
        tokens, img_lps = tok_slots[order], lp_slots[order]
        _sync(dev)
        timing["image"] = time.perf_counter() - t0

        # ---- pixels ------------------------------------------------------------------------------
        t0 = time.perf_counter()
        images = decode_images(policy, tokens) if o["decode"] else None
        _sync(dev)
        timing["decode"] = time.perf_counter() - t0
        timing["total"] = timing["cot"] + timing["image"] + timing["decode"]
        if bar is not None:
            bar.close()

        tok_cpu, lp_cpu = tokens.cpu(), img_lps.cpu()
        samples = [
            RolloutSample(
                prompt_index=s // G,
                prompt=prompts[s // G],
                cot_context_ids=templates[s // G],
                cot_ids=cot_ids[s],
                cot_text=policy.tokenizer.decode(body[s], skip_special_tokens=False),
                cot_logprobs=torch.tensor(cot_lps[s], dtype=torch.float32),
                image_context_ids=ctx[s],
                uncond_context_ids=uctx[s] if cfg else None,
                image_tokens=tok_cpu[s],
                image_logprobs=lp_cpu[s],
                image=images[s] if images is not None else None,
            )
            for s in range(R)
        ]
        return RolloutBatch(samples=samples, image_tokens=tokens, images=images, timing=timing)

    def _uncond(self, ids, seg, mode):
        masked = {"all": (_CTX, _COT), "cot": (_COT,), "keep_cot": (_CTX,)}[mode]
        pad = self.policy.pad_token_id
        return [pad if g in masked else t for t, g in zip(ids, seg)]

    def _cot_loop(self, trunk, cache, sampler, last, slot_sample, o, cont, bar):
        """Sample CoT tokens for every row until EOS / max_new_tokens; returns (ids, log-probs) per sample.

        In ``continue`` mode a row that hits the limit without EOS runs one extra step so that its
        last token's KV is written too (the image context continues right after it); that step's
        draw is discarded.
        """
        policy, dev = self.policy, cache.suffix_k.device
        eos, max_new = policy.eos_token_id, o["max_new_tokens"]
        R = len(slot_sample)
        ids = [[] for _ in range(R)]
        lps = [[] for _ in range(R)]
        x = policy.embed_text(torch.tensor(last, device=dev))
        n, step = R, 0
        while n > 0:
            h = trunk.decode(x[:n], cache, n, flat=self.flat)
            tok, lp = sampler(
                policy.text_logits(h),
                temperature=o["cot_temperature"],
                top_k=o["cot_top_k"],
                top_p=o["cot_top_p"],
                offset=step,
            )
            tok_l, lp_l = tok.tolist(), lp.tolist()
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
            n = self._compact(cache, x, slot_sample, n, done)
        return ids, lps

    @staticmethod
    def _compact(cache, x, slot_sample, n, done):
        """Move finished rows behind the active ones (swapping only the rows that must move)."""
        n_new = n - sum(done)
        holes = [i for i in range(n_new) if done[i]]
        movers = [i for i in range(n_new, n) if not done[i]]
        if holes:
            a = torch.tensor(holes, device=x.device)
            b = torch.tensor(movers, device=x.device)
            cache.swap_rows(a, b)
            x[torch.cat([a, b])] = x[torch.cat([b, a])]
            for i, j in zip(holes, movers):
                slot_sample[i], slot_sample[j] = slot_sample[j], slot_sample[i]
        return n_new
