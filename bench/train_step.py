"""One full BiCoT-GRPO step: fastbicot's Trainer vs a seed-style step, side by side in one run.

    python bench/train_step.py --preset tiny --device cpu --prompts 2 --generations 8 --json out.json
    python bench/train_step.py ... --micro-batch-tokens 0,512   # fastbicot once per setting

The same work for both: ``--prompts`` prompts x ``--generations`` samples, a CoT of up to
``--cot-tokens`` tokens (T=1, top-k 50), the image tokens with CFG (w=5), VQ decode, a programmatic
reward (mean red level; the reward is not what is measured), then one GRPO update (beta=0.01 against
a frozen reference, AdamW, gradient checkpointing).

seed-style: the seed's structure (CaraJ7/T2I-R1 grpo_trainer.py, run_grpo.sh) on one rank -- one prompt
per micro-batch with gradient accumulation over the prompts (per_device_train_batch_size 1), each
micro-batch rolling out its own G samples: CoT by an eager sampling loop with a DynamicCache (what HF
generate does), the image loop of fastbicot/rollout/baselines.py (eager, DynamicCache, CFG by row
doubling, softmax + multinomial), transformers' VQ decoder, the reward, then the micro-batch's loss and
backward through materialised logits (the text head over every position, the prompt's included, and
the image head over BOI + image tokens, log_softmax row by row + gather, as ``_get_per_token_logps``)
for policy and reference; clipping and one optimizer step after the last prompt.
fastbicot: ``Trainer.step()`` (static KV cache, shared prefixes, fused sampler and decode step; an
update whose forwards pack each micro-batch's rows with shared prefixes stored once, fused log-probs
that never build [N, V], the fused GRPO loss), one prompt group per micro-batch like the seed, and
with ``--micro-batch-tokens N`` (> 0) each group further cut into micro-batches of at most N packed
tokens (``optim.micro_batch_tokens``: the same loss and gradient, a bounded activation peak). Each
fastbicot row of the output names its setting.

Reported per implementation: images/s over the whole step, seconds of rollout (CoT + image), decode,
reward and update (median of --repeats steps after one warm-up step; the seed-style step's phases
summed over its micro-batches), and the update's peak memory: CUDA max_memory_allocated above the
memory before the update; CPU the growth of the peak resident set during the update, measured in a
fresh subprocess per implementation (so neither inherits the other's freed pages); for the
seed-style step the largest over its micro-batches' updates and the optimizer step, above the
memory before the first (``UpdateWindow``). Ratios fastbicot / seed-style are printed and written to --json.

Fairness: each implementation is timed in a fresh subprocess, and the implementations alternate
for --rounds rounds (seed-style, fastbicot, seed-style, fastbicot, ...); a ratio is taken within
each round and the median over rounds is reported, so a drift of the machine hits both sides. On
CPU the timed processes run with glibc's allocator pinned (``--malloc pinned``: no mmap for large
blocks, no trimming): with glibc's adaptive defaults a run's speed depends on whether its large
tensors land in fresh mmapped pages (a page fault per 4 KiB on every allocation), and on this kind
of machine the same seed-style step measured 0.76 s in one process and 1.25 s in the next.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from fastbicot.checks import ArgumentError, arg_type, check_int, check_writable_file

IMPLS = ("seed_style", "fastbicot")
# --heads real: the tiny trunk with Janus-Pro's head sizes (text vocabulary 102400, image codebook 16384),
# where the seed's materialised [B, L, V] logits weigh what they weigh on the real model.
REAL_HEADS = {"vocab_size": 102400, "vq_num_embeddings": 16384}


def preset_name(args) -> str:
    """The preset to build: ``--preset``, with Janus-Pro's heads (``--heads real``) and/or only
    ``--layers`` of its decoder layers (each layer keeps its real shape: 7B's fit one GPU that way)."""
    if args.heads == "preset" and not args.layers:
        return args.preset
    import dataclasses

    from fastbicot.models.janus import PRESETS

    changes = dict(REAL_HEADS) if args.heads == "real" else {}
    name = args.preset + ("+real-heads" if args.heads == "real" else "")
    if args.layers:
        changes["num_layers"] = args.layers
        name += f"+{args.layers}-layers"
    PRESETS.setdefault(name, dataclasses.replace(PRESETS[args.preset], **changes))
    return name


TEMPLATE = {"template": "{system}\n\nUser: {instruction}\n\nAssistant:", "system": "Plan the image.",
            "instruction": 'Describe how to draw "{prompt}" in a few words.'}


def red_reward(images, prompts, metadata, cots):
    return images[..., 0].float().mean((1, 2)) / 255


def make_config(args, out_dir, micro_batch_tokens=0):
    from fastbicot.trainer import TrainerConfig

    return TrainerConfig.from_dict({
        "output_dir": out_dir, "steps": 1000, "seed": args.seed,
        "model": {"preset": preset_name(args), "device": args.device, "dtype": args.dtype},
        "data": {"prompts_per_step": args.prompts},
        "rollout": {"num_generations": args.generations, "cot": {"max_new_tokens": args.cot_tokens},
                    "guidance_scale": 5.0, **TEMPLATE},
        "loss": {"beta": 0.01},
        "optim": {"lr": 1e-6, "micro_batch_prompts": 1, "micro_batch_tokens": micro_batch_tokens},
        "log": {"progress": False, "entropy": False},
    })


def prompts(n):
    words = ["red", "blue", "cat", "dog", "car", "left", "of", "two", "small", "green", "tree", "above"]
    g = torch.Generator().manual_seed(n)
    return [" ".join(words[int(i)] for i in torch.randint(0, len(words), (6,), generator=g)) for _ in range(n)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class UpdateWindow:
    """The update's peak memory, over one or more windows of a step (the seed-style step interleaves each
    micro-batch's rollout with its update): the growth above the memory at the first window's start, the
    largest over the windows. CUDA: max_memory_allocated. CPU: the resident set's high-water mark, only
    when ``track_rss`` (the update-peak child; the timed steps never touch /proc)."""

    track_rss = False

    def __init__(self, device):
        self.cuda, self.base, self.peak_mib = device.type == "cuda", None, None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() if self.base is None else self.base
        elif self.track_rss:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the high-water mark restarts at the current resident set
            self.base = rss_kib("VmRSS") if self.base is None else self.base
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            grown = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        elif self.track_rss:
            grown = (rss_kib("VmHWM") - self.base) / 1024
        else:
            return
        self.peak_mib = grown if self.peak_mib is None else max(self.peak_mib, grown)


# ---------------------------------------------------------------------------- the seed-style step
class SeedStyleStep:
    """The seed's step structure on a fastbicot policy (see the module docstring)."""

    def __init__(self, policy, args):
        self.policy, self.args = policy, args
        self.ref = copy.deepcopy(policy).eval()
        for p in self.ref.parameters():
            p.requires_grad_(False)
        for n, p in policy.hf_model.named_parameters():
            p.requires_grad_(n.startswith(("model.language_model.", "lm_head.")))
        lm = policy.language_model
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)
        self.gen = torch.Generator(device=policy.device).manual_seed(args.seed)

    @torch.no_grad()
    def cot(self, texts):
        """Left-padded batch, eager sampling with a DynamicCache, top-k 50, stop when every row hit EOS."""
        from transformers import DynamicCache

        from fastbicot.rollout import cot_prompt

        p, G = self.policy, self.args.generations
        ids = [[p.bos_token_id] + p.tokenizer.encode(cot_prompt(t, **TEMPLATE), add_special_tokens=False)
               for t in texts for _ in range(G)]
        L = max(len(x) for x in ids)
        tok = torch.full((len(ids), L), p.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(ids), L, dtype=torch.long)
        for i, x in enumerate(ids):
            tok[i, L - len(x):] = torch.tensor(x)
            mask[i, L - len(x):] = 1
        tok, ctx_mask = tok.to(p.device), mask.to(p.device)
        mask = ctx_mask
        emb, cache, out = p.embed_text(tok), DynamicCache(), []
        done = torch.zeros(len(ids), dtype=torch.bool, device=p.device)
        for _ in range(self.args.cot_tokens):
            o = p.language_model(inputs_embeds=emb, attention_mask=mask, past_key_values=cache, use_cache=True)
            cache = o.past_key_values
            logits = p.text_logits(o.last_hidden_state[:, -1]).float()
            kth = torch.topk(logits, 50, -1).values[:, -1:]
            probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
            nxt = torch.multinomial(probs, 1, generator=self.gen)[:, 0]
            nxt = torch.where(done, p.eos_token_id, nxt)
            out.append(nxt)
            done |= nxt == p.eos_token_id
            if bool(done.all()):
                break
            emb = p.embed_text(nxt[:, None])
            mask = torch.cat([mask, mask.new_ones(len(ids), 1)], 1)
        return tok, ctx_mask, torch.stack(out, 1)

    def step(self, texts):
        """The seed's step on one rank: per_device_train_batch_size 1 and gradient accumulation over the
        prompts (run_grpo.sh: 1 x 2), so each prompt is one micro-batch that rolls out its own G samples
        (CoT, images, decode, reward) and then runs its loss and backward; one optimizer step at the end."""
        timing = {"rollout": 0.0, "decode": 0.0, "reward": 0.0, "update": 0.0}
        window = UpdateWindow(self.policy.device)
        for text in texts:
            self.micro_batch(text, len(texts), timing, window)
        t0 = time.perf_counter()
        with window:
            torch.nn.utils.clip_grad_norm_([q for q in self.policy.parameters() if q.requires_grad], 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        sync(self.policy.device)
        timing["update"] += time.perf_counter() - t0
        if window.peak_mib is not None:
            timing["update_peak_mib"] = window.peak_mib
        return timing

    def micro_batch(self, text, n_prompts, timing, window):
        from fastbicot.rollout.baselines import t2i_r1_generate_images

        p, dev = self.policy, self.policy.device
        t0 = time.perf_counter()
        p.eval()
        ctx_ids, ctx_mask, cot = self.cot([text])
        img_ctx = []
        for i in range(cot.shape[0]):
            answer = p.tokenizer.decode(cot[i].tolist(), skip_special_tokens=True)
            img_ctx.append([p.bos_token_id] + p.tokenizer.encode(f"User: {text}. {answer}\n\nAssistant:",
                                                                 add_special_tokens=False) + [p.boi_token_id])
        tokens = t2i_r1_generate_images(p, img_ctx, guidance_scale=5.0)
        sync(dev)
        t1 = time.perf_counter()
        with torch.no_grad():
            x = p.vqmodel.decode(tokens).float()
        images = ((x.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
        sync(dev)
        t2 = time.perf_counter()
        r = red_reward(images, None, None, None).double()
        adv = ((r - r.mean()) / (r.std() + 1e-4)).to(dev)
        t3 = time.perf_counter()
        with window:
            p.train()
            # the seed's loss is the micro-batch's token mean; accumulation over the prompts averages them
            loss = self.group_loss(ctx_ids, ctx_mask, cot, img_ctx, tokens, adv) / n_prompts
            loss.backward()
            p.eval()
        sync(dev)
        t4 = time.perf_counter()
        for k, a, b in (("rollout", t0, t1), ("decode", t1, t2), ("reward", t2, t3), ("update", t3, t4)):
            timing[k] += b - a

    @staticmethod
    def logps_part(logits, ids):
        """The seed's ``_get_per_token_logps_part``: next-token log-probs, log_softmax row by row in the
        logits' dtype."""
        return torch.stack([torch.log_softmax(row, -1).gather(1, t[:, None])[:, 0]
                            for row, t in zip(logits[:, :-1], ids[:, 1:])])

    def logps(self, model, emb, mask, ids, n_targets, head):
        """The seed's ``_get_per_token_logps`` -> the log-probs of the last ``n_targets`` tokens of ``ids``.
        Text: the text head over every position, the prompt's included, then the completion's slice;
        image: the image head over BOI + the image tokens."""
        h = model.language_model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
        if head == "text":
            return self.logps_part(model.text_logits(h), ids)[:, -n_targets:]
        img = ids[:, -n_targets:]
        return self.logps_part(model.image_logits(h[:, -n_targets - 1:]), torch.cat([img[:, :1] * 0, img], 1))

    def group_loss(self, ctx, ctx_mask, cot, img_ctx, img, adv):
        p, beta = self.policy, 0.01
        eos = p.eos_token_id
        is_eos = cot == eos
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), cot.shape[1])
        cmask = (torch.arange(cot.shape[1], device=cot.device)[None] <= first[:, None]).long()
        ids = torch.cat([ctx, cot], 1)
        mask = torch.cat([ctx_mask, cmask], 1)
        emb = p.embed_text(ids)
        n = cot.shape[1]
        lp_t = self.logps(p, emb, mask, ids, n, "text")
        with torch.no_grad():
            ref_t = self.logps(self.ref, emb.detach(), mask, ids, n, "text")
        L = max(len(x) for x in img_ctx)
        t = torch.full((len(img_ctx), L), p.pad_token_id, dtype=torch.long, device=img.device)
        m = torch.zeros_like(t)
        for i, x in enumerate(img_ctx):  # right-padded, BOI after the padding (the seed's layout)
            t[i, : len(x) - 1] = torch.tensor(x[:-1])
            t[i, -1] = x[-1]
            m[i, : len(x) - 1] = 1
            m[i, -1] = 1
        emb_i = torch.cat([p.embed_text(t), p.embed_image(img[:, :-1])], 1)
        m_i = torch.cat([m, torch.ones_like(img[:, :-1])], 1)
        lp_i = self.logps(p, emb_i, m_i, img, img.shape[1], "image")
        with torch.no_grad():
            ref_i = self.logps(self.ref, emb_i.detach(), m_i, img, img.shape[1], "image")
        lp, ref = torch.cat([lp_t, lp_i], 1), torch.cat([ref_t, ref_i], 1)
        mask_all = torch.cat([cmask, torch.ones_like(img)], 1).float()
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        per_tok = -(torch.exp(lp - lp.detach()) * adv[:, None] - beta * kl)
        return (per_tok * mask_all).sum() / mask_all.sum()


# ---------------------------------------------------------------------------- fastbicot
class FastStep:
    def __init__(self, policy, args, out_dir, micro_batch_tokens=0):
        from fastbicot.rewards import FunctionReward
        from fastbicot.trainer import Trainer

        self.trainer = Trainer(make_config(args, out_dir, micro_batch_tokens), policy=policy,
                               rewards=[FunctionReward("red", red_reward)])

    def step(self, texts):
        from fastbicot.data import PromptRecord

        tr = self.trainer
        dev = tr.device
        t0 = time.perf_counter()
        batch = tr.rollout([PromptRecord(t) for t in texts])
        sync(dev)
        t1 = time.perf_counter()
        scores = tr.score(batch)
        adv, _, _ = tr.advantages(batch, scores)
        t2 = time.perf_counter()
        with UpdateWindow(dev) as window:
            tr.update(batch, adv)
        sync(dev)
        t3 = time.perf_counter()
        tr.step_idx += 1
        out = {"rollout": (t1 - t0) - batch.timing["decode"], "decode": batch.timing["decode"], "reward": t2 - t1,
               "update": t3 - t2}
        if window.peak_mib is not None:
            out["update_peak_mib"] = window.peak_mib
        return out


def int_list(text):
    """argparse type: comma-separated integers >= 0, none repeated."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or any(x < 0 for x in out) or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"expected distinct integers >= 0, got {text!r}")
    return out


def rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def row_name(impl, mbt):
    return impl if impl == "seed_style" or not mbt else f"fastbicot_mbt{mbt}"


def make_runner(impl, policy, args, mbt):
    import tempfile

    if impl == "seed_style":
        return SeedStyleStep(policy, args)
    return FastStep(policy, args, tempfile.mkdtemp(), mbt)


def run_impl(impl, args, mbt=0):
    """Warm-up step, then --repeats timed steps (CUDA: each step's update peak; CPU: measured by the
    update-peak child process instead)."""
    from fastbicot.models import JanusPolicy

    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.bfloat16 if dev.type == "cuda"
                                                                     else torch.float32)
    policy = JanusPolicy.from_preset(preset_name(args), seed=args.seed, device=dev, dtype=dtype)
    runner = make_runner(impl, policy, args, mbt)
    texts = prompts(args.prompts)
    runner.step(texts)  # warm-up
    steps = []
    for _ in range(args.repeats):
        steps.append(runner.step(texts))
    med = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
    med["step"] = med["rollout"] + med["decode"] + med["reward"] + med["update"]
    med["images_per_s"] = args.prompts * args.generations / med["step"]
    return med


# glibc, --malloc pinned: large blocks come from the heap (never a fresh mmap) and freed memory is kept,
# so a step reuses resident pages instead of faulting in new ones; the same for every implementation
PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
# glibc, peak measurement: every allocation >= 64 KiB is its own mmap and is unmapped when freed, so the
# resident set follows live memory and its high-water mark (VmHWM) is the update's peak, not a heap's leftovers
TRACKING_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def child(flag, impl, args, mbt, malloc):
    """Run this script as ``--child-<flag> impl`` in a fresh process -> the JSON it prints last."""
    cmd = [sys.executable, os.path.abspath(__file__), f"--child-{flag}", impl, "--micro-batch-tokens", str(mbt),
           "--preset", args.preset, "--heads", args.heads, "--device", args.device, "--dtype", args.dtype,
           "--prompts", str(args.prompts), "--generations", str(args.generations), "--cot-tokens",
           str(args.cot_tokens), "--repeats", str(args.repeats), "--seed", str(args.seed), "--threads",
           str(args.threads), "--layers", str(args.layers)]
    env = {k: v for k, v in os.environ.items() if k not in PINNED_MALLOC}
    env.update(malloc)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{impl} {flag} subprocess failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def child_update_peak(impl, args):
    """One warm-up step (allocator pools and lazy state exist before measuring), then one step whose
    update windows track the resident set -> prints the update's peak growth."""
    from fastbicot.models import JanusPolicy

    policy = JanusPolicy.from_preset(preset_name(args), seed=args.seed, dtype=torch.float32)
    runner = make_runner(impl, policy, args, args.micro_batch_tokens[0])
    texts = prompts(args.prompts)
    runner.step(texts)
    UpdateWindow.track_rss = True
    print(json.dumps({"update_peak_mib": runner.step(texts)["update_peak_mib"]}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "janus-pro-1b", "janus-pro-7b"])
    ap.add_argument("--heads", default="preset", choices=["preset", "real"],
                    help="real: the preset's trunk with Janus-Pro's text (102400) and image (16384) heads")
    ap.add_argument("--layers", type=arg_type(check_int, low=0), default=0,
                    help="build only this many of the preset's decoder layers, each of its real shape (0: all); "
                         "janus-pro-7b with 8 layers fits one 80-141 GB GPU for both implementations")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--prompts", type=arg_type(check_int, low=1), default=2)
    ap.add_argument("--generations", type=arg_type(check_int, low=2), default=8)
    ap.add_argument("--cot-tokens", type=arg_type(check_int, low=1), default=32)
    ap.add_argument("--repeats", type=arg_type(check_int, low=1), default=3)
    ap.add_argument("--threads", type=arg_type(check_int, low=1), default=1)
    ap.add_argument("--seed", type=arg_type(check_int, low=0), default=0)
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--micro-batch-tokens", type=int_list, default=[0],
                    help="fastbicot's optim.micro_batch_tokens, comma-separated: one fastbicot row per value "
                         "(0: off, micro-batches of one prompt group like the seed)")
    ap.add_argument("--rounds", type=arg_type(check_int, low=1), default=2,
                    help="each implementation is timed --rounds times in fresh processes, alternating; the "
                         "reported ratios are medians of the per-round ratios")
    ap.add_argument("--malloc", default="pinned", choices=["pinned", "inherit"],
                    help="CPU timing processes: pinned = glibc never mmaps large blocks nor trims (the same "
                         "allocator behaviour for every implementation); inherit = this process's environment")
    ap.add_argument("--json")
    ap.add_argument("--child-update-peak", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--child-time", choices=IMPLS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("argument --device: cuda, but CUDA is not available on this machine")
    from fastbicot.models.janus import PRESETS

    if args.layers > PRESETS[args.preset].num_layers:
        ap.error(f"argument --layers: {args.preset} has {PRESETS[args.preset].num_layers} decoder layers, got "
                 f"{args.layers}")
    impls = [x.strip() for x in args.impls.split(",") if x.strip()]
    unknown = [x for x in impls if x not in IMPLS]
    if unknown or not impls:
        ap.error(f"--impls: unknown {unknown}; choose from {list(IMPLS)}")
    if args.json:
        try:
            check_writable_file("--json", args.json)
        except ArgumentError as e:
            ap.error(f"argument {e}")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.child_update_peak:
        child_update_peak(args.child_update_peak, args)
        return 0
    if args.child_time:
        print(json.dumps(run_impl(args.child_time, args, args.micro_batch_tokens[0])))
        return 0
    results, failed = {}, []

    def write(complete):
        if args.json:
            payload = {"config": vars(args), "results": results, "complete": complete,
                       "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                       "torch": torch.__version__}
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(payload, f, indent=1)
            os.replace(tmp, args.json)

    rows = [(impl, mbt) for impl in impls for mbt in (args.micro_batch_tokens if impl == "fastbicot" else [0])]
    malloc = PINNED_MALLOC if args.malloc == "pinned" and args.device == "cpu" else {}
    rounds = {row_name(*row): [] for row in rows}
    for r in range(args.rounds):
        for impl, mbt in rows:
            name = row_name(impl, mbt)
            if name in failed:
                continue
            try:
                rounds[name].append(child("time", impl, args, mbt, malloc))
            except Exception as e:  # noqa: BLE001 - keep measuring the others; reported, exit status 1
                results[name] = {"error": f"{type(e).__name__}: {e}"}
                failed.append(name)
                continue
            runs = rounds[name]
            results[name] = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
            results[name].update(micro_batch_tokens=mbt, rounds=runs)
            write(False)
    for impl, mbt in rows:  # CPU: the update's peak memory, one more fresh process per row
        name = row_name(impl, mbt)
        if args.device == "cpu" and name not in failed:
            try:
                results[name]["update_peak_mib"] = child("update-peak", impl, args, mbt, TRACKING_MALLOC)[
                    "update_peak_mib"]
            except Exception as e:  # noqa: BLE001
                results[name] = {"error": f"{type(e).__name__}: {e}"}
                failed.append(name)
        write(False)
    a = results.get("seed_style")
    if a is not None and "error" not in a:
        results["ratios"] = {}
        for impl, mbt in rows:
            b = results[row_name(impl, mbt)]
            if impl == "fastbicot" and "error" not in b:
                # within each round (the machine's state is shared), then the median over rounds
                per_round = [{"images_per_s": y["images_per_s"] / x["images_per_s"], "update_time": x["update"] /
                              y["update"]} for x, y in zip(a["rounds"], b["rounds"])]
                results["ratios"][row_name(impl, mbt)] = {
                    "images_per_s": statistics.median(q["images_per_s"] for q in per_round),
                    "update_time": statistics.median(q["update_time"] for q in per_round),
                    "update_peak_memory": b["update_peak_mib"] / a["update_peak_mib"], "rounds": per_round}
    write(True)
    print(f"{preset_name(args)} on {args.device}: {args.prompts} prompts x {args.generations} samples, CoT <= "
          f"{args.cot_tokens} tokens, {args.threads} thread(s)")
    print(f"{'impl':19} {'img/s':>7} {'rollout s':>9} {'decode s':>8} {'reward s':>8} {'update s':>8} "
          f"{'upd peak MiB':>12}")
    for impl, mbt in rows:
        name = row_name(impl, mbt)
        r = results[name]
        if "error" in r:
            print(f"{name:19} FAILED: {r['error']}")
            continue
        print(f"{name:19} {r['images_per_s']:7.2f} {r['rollout']:9.3f} {r['decode']:8.3f} {r['reward']:8.4f} "
              f"{r['update']:8.3f} {r['update_peak_mib']:12.1f}")
    for name, q in results.get("ratios", {}).items():
        each = ", ".join(f"{x['images_per_s']:.2f}x" for x in q["rounds"])
        print(f"{name} / seed-style: {q['images_per_s']:.2f}x images/s (rounds: {each}), update "
              f"{q['update_time']:.2f}x faster, update peak memory {q['update_peak_memory']:.2f}x")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
