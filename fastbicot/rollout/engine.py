"""RolloutEngine: semantic CoT, then image contexts, image tokens, pixels (DESIGN.md §2 steps 2-4);
generate_images: the image tokens alone. Both orchestrate: the ModelRunner (runner.py) holds the
trunk and the caches, the loops live in decoders.py.

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

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..data import PromptRecord
from ..vq import vq_decode
from .config import RolloutConfig, apply_overrides
from .decoders import ImageDecoder, decode_cot
from .kv_cache import KVCache
from .runner import ModelRunner
from .sampling import Sampler, check_keys, check_sampling_args
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

    @classmethod
    def concat(cls, batches: list) -> RolloutBatch:
        """One batch from several of the same settings, in order: prompt indices renumbered, the
        global group indices kept (when every part has them), timings summed."""
        if len(batches) == 1:
            return batches[0]
        samples, offset, timing = [], 0, {}
        for b in batches:
            samples += [dataclasses.replace(s, prompt_index=s.prompt_index + offset) for s in b.samples]
            offset += len({s.prompt_index for s in b.samples})
            for k, v in b.timing.items():
                timing[k] = timing.get(k, 0.0) + v
        first = batches[0]
        gi = None if any(b.group_index is None for b in batches) else [i for b in batches for i in b.group_index]
        return dataclasses.replace(
            first, samples=samples, timing=timing, group_index=gi,
            image_tokens=torch.cat([b.image_tokens.to(first.image_tokens.device) for b in batches]),
            images=None if first.images is None else torch.cat([b.images.to(first.images.device) for b in batches]))

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
    if rounding == "round" and policy.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return vq_decode(policy.vqmodel, tokens, output="uint8")
    if policy.dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = vq_decode(policy.vqmodel, tokens, output="float")
    else:  # transformers' decoder (float64 models: the extension is float32/16 only)
        x = policy.vqmodel.decode(tokens)
    x = ((x.float() + 1) / 2 * 255).clamp(0, 255)
    x = x.round() if rounding == "round" else x.trunc()
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@dataclass
class _Run:
    """One generate call's state, shared by its phases."""

    o: RolloutConfig
    records: list
    G: int
    group_index: list
    templates: list  # the CoT context of every prompt
    sample_key: list  # the stream key of every sample
    sampler: Sampler
    bar: object  # the progress bar or None
    longest: int  # the longest CoT row: template + max_new_tokens + the flushed last token + BOI
    cont: bool  # the image tokens continue the CoT rows (image_mode "continue" with a CoT)
    slot_sample: list  # the sample held by each cache slot
    cache: KVCache | None = None  # continue: the CoT rows' cache, in which the image rows go on

    @property
    def R(self) -> int:
        return len(self.records) * self.G


class _Timer:
    """Seconds per phase; the device is synchronised at the end so queued kernels count where they ran."""

    def __init__(self, device):
        self.device, self.times = device, {}

    @contextmanager
    def __call__(self, name):
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times[name] = time.perf_counter() - t0


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
        self.runner = ModelRunner(policy, flatten)

    @property
    def flat(self) -> bool:
        """Whether prefixes are flattened into the rows after prefill (the runner's layout choice)."""
        return self.runner.flat

    @flat.setter
    def flat(self, value: bool) -> None:
        self.runner.flat = bool(value)

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
        indices gives the samples one call gives (``prompts_per_pass`` splits a call that way).
        ``overrides``: RolloutConfig fields for this call.
        """
        k = apply_overrides(self.config, overrides).prompts_per_pass
        records = self._records(prompts)
        if 0 < k < len(records):  # in passes of k prompt groups, each sample from its own keyed stream
            gi = check_keys(group_index, len(records), "group_index", per="prompt")
            return RolloutBatch.concat([
                self.generate(records[i:i + k], num_generations, seed=seed, group_index=gi[i:i + k],
                              **{**overrides, "prompts_per_pass": 0}) for i in range(0, len(records), k)])
        # P prompts, G generations each, R = P * G samples (prompt-major), N image tokens per sample
        run = self._start(records, num_generations, seed, group_index, overrides)
        timed = _Timer(self.policy.device)
        with timed("cot"):
            cot_ids, cot_lps = self._cot(run)
        with timed("image"):
            cot_texts, ctx, uctx = self._image_contexts(run, cot_ids)
            tokens, img_lps = self._image_tokens(run, ctx, uctx)
        with timed("decode"):
            images = decode_images(self.policy, tokens, run.o.pixel_rounding) if run.o.decode else None
        timed.times["total"] = timed.times["cot"] + timed.times["image"] + timed.times["decode"]
        if run.bar is not None:
            run.bar.close()
        return self._batch(run, (cot_ids, cot_lps, cot_texts), (ctx, uctx), (tokens, img_lps), images, timed.times)

    def _batch(self, run, cot, contexts, image, images, timing) -> RolloutBatch:
        """The samples, prompt-major, with what produced them."""
        (cot_ids, cot_lps, cot_texts), (ctx, uctx), (tokens, img_lps) = cot, contexts, image
        tok_cpu, lp_cpu = tokens.cpu(), img_lps.cpu()
        G, records = run.G, run.records
        samples = [
            RolloutSample(prompt_index=s // G, prompt=records[s // G].prompt, cot_context_ids=run.templates[s // G],
                          cot_ids=cot_ids[s], cot_text=cot_texts[s],
                          cot_logprobs=torch.tensor(cot_lps[s], dtype=torch.float32), image_context_ids=ctx[s],
                          uncond_context_ids=uctx[s] if uctx is not None else None, image_tokens=tok_cpu[s],
                          image_logprobs=lp_cpu[s], image=images[s] if images is not None else None,
                          metadata=records[s // G].metadata)
            for s in range(run.R)
        ]
        return RolloutBatch(samples=samples, image_tokens=tokens, images=images, timing=timing,
                            num_generations=G, config=run.o, group_index=run.group_index)

    def _start(self, prompts, num_generations, seed, group_index, overrides) -> _Run:
        """Check the arguments and set up one rollout: settings, stream keys, CoT contexts, trunk."""
        o = apply_overrides(self.config, overrides)
        records = self._records(prompts)
        G = o.num_generations if num_generations is None else num_generations
        if isinstance(G, bool) or not isinstance(G, int) or G < 1:
            raise ValueError(f"num_generations must be a positive integer, got {G!r}")
        group_index = check_keys(group_index, len(records), "group_index", per="prompt")
        if min(group_index) < 0 or max(group_index) >= 2**63 // G:
            raise ValueError(f"group_index must hold non-negative ints below 2**63 / num_generations, got "
                             f"{min(group_index)} .. {max(group_index)}")
        R, N = len(records) * G, self.policy.num_image_tokens
        trunk = self.runner.begin()
        templates = [self.cot_context(r.prompt, o) for r in records]
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
        return _Run(o=o, records=records, G=G, group_index=group_index, templates=templates,
                    sample_key=[group_index[s // G] * G + s % G for s in range(R)],
                    sampler=Sampler(seed), bar=bar, longest=longest,
                    cont=o.image_mode == "continue" and o.semantic_cot, slot_sample=list(range(R)))

    def _cot(self, run) -> tuple:
        """The semantic CoT of every sample: (ids, log-probs) per sample. The template is prefilled once
        per prompt into a prefix block its G rows share. In ``continue`` mode the rows stay in a cache
        sized for the image tokens too (``run.cache``), where the CFG rows join them later."""
        o, G, P, R = run.o, run.G, len(run.records), run.R
        if not o.semantic_cot:  # images straight from the prompt (an empty plan)
            return [[] for _ in range(R)], [[] for _ in range(R)]
        rows, groups = [run.templates[s // G] for s in range(R)], [s // G for s in range(R)]
        if run.cont:
            N = self.policy.num_image_tokens
            cache = run.cache = self.runner.new_cache(2 * P, run.longest, 2 * R, run.longest + N)
            last = self.runner.prefill(cache, rows, range(R), groups)
        else:  # a row's suffix: its context's last token + max_new (G rows share their template)
            cache, last = self.runner.prefilled_cache(rows, groups, o.cot.max_new_tokens)
        keys = torch.tensor(run.sample_key, dtype=torch.long, device=cache.suffix_k.device)
        ids, lps = decode_cot(self.runner, cache, run.sampler, last, run.slot_sample, keys, o.cot,
                              flush_at_limit=run.cont, progress=run.bar)
        if o.max_textcot_length is not None:  # the seed keeps the last N sampled tokens
            ids = [c[-o.max_textcot_length:] for c in ids]
            lps = [c[-o.max_textcot_length:] for c in lps]
        return ids, lps

    def _image_contexts(self, run, cot_ids) -> tuple:
        """(the CoT texts, the image context of every sample, its unconditional context or None
        without CFG)."""
        policy, G = self.policy, run.G
        eos = policy.eos_token_id
        body = [c[:-1] if c and c[-1] == eos else c for c in cot_ids]  # the CoT without its EOS
        cot_texts = [policy.tokenizer.decode(b, skip_special_tokens=True) for b in body]
        ctx, seg = [], []
        for s in range(run.R):
            c, g = self.image_context(run.templates[s // G], run.records[s // G].prompt, body[s], cot_texts[s],
                                      run.o)
            ctx.append(c)
            seg.append(g)
        uctx = [self._uncond(c, sg, run.o.uncond) for c, sg in zip(ctx, seg)] if run.o.guidance_scale > 1 else None
        return cot_texts, ctx, uctx

    def _image_tokens(self, run, ctx, uctx) -> tuple:
        """(tokens int64 [R, N], log-probs float32 [R, N]) in sample order. ``continue``: conditional rows
        stay where the CoT left them (their next input is BOI); the unconditional rows are prefilled
        behind them. ``reprompt``: every context is prefilled into a fresh cache (a conditional row's
        whole context is its own block)."""
        o, G, P, R, N = run.o, run.G, len(run.records), run.R, self.policy.num_image_tokens
        uncond_block = [P + (s // G if o.uncond == "cot" else 0) for s in range(R)]  # per sample
        if run.cont:
            cache, first = run.cache, [self.policy.boi_token_id] * R
            if uctx is not None:
                slots = run.slot_sample
                first += self.runner.prefill(cache, [uctx[s] for s in slots], range(R, 2 * R),
                                             [uncond_block[s] for s in slots])
        else:
            run.slot_sample = list(range(R))
            self.runner.trunk.check_positions(max(len(c) for c in ctx + (uctx or [])) + N)
            rows, groups = list(ctx), list(range(R))
            if uctx is not None:
                rows += uctx
                groups += [R - P + b for b in uncond_block]
            cache, first = self.runner.prefilled_cache(rows, groups, N)
        run.cache = None  # the decoder holds the cache; gone with it before the pixels are decoded
        dec = ImageDecoder(self.runner, cache, R, guidance_scale=o.guidance_scale, temperature=o.image.temperature,
                           top_k=o.image.top_k, top_p=o.image.top_p, sampler=run.sampler, num_tokens=N,
                           cuda_graph=o.cuda_graph,
                           keys=[run.sample_key[s] for s in run.slot_sample])  # the stream of each slot's sample
        tokens, logprobs = dec.run(self.policy.embed_text(torch.tensor(first, device=self.policy.device)),
                                   progress=run.bar)
        order = torch.tensor([run.slot_sample.index(s) for s in range(R)], device=tokens.device)
        return tokens[order], logprobs[order]

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


@torch.no_grad()
def generate_images(policy, input_ids, *, guidance_scale=5.0, temperature=1.0, top_k=0, top_p=1.0, seed=0,
                    cuda_graph=True, flatten=None, return_logprobs=False, keys=None):
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
    runner = ModelRunner(policy, flatten)
    N = policy.num_image_tokens
    runner.begin().check_positions(max(len(s) for s in seqs) + N)
    B, rows, groups = len(seqs), seqs, list(range(len(seqs)))
    if guidance_scale > 1:  # one block for every unconditional row: BOS pad ... pad is shared
        rows = seqs + [policy.unconditional_ids(torch.tensor(s)).tolist() for s in seqs]
        groups += [B] * B
    cache, last = runner.prefilled_cache(rows, groups, N)
    dec = ImageDecoder(runner, cache, B, guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                       top_p=top_p, sampler=Sampler(seed), num_tokens=N, cuda_graph=cuda_graph,
                       keys=keys)
    tokens, logprobs = dec.run(policy.embed_text(torch.tensor(last, device=policy.device)))
    return (tokens, logprobs) if return_logprobs else tokens
