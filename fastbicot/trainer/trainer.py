"""Trainer: BiCoT-GRPO (T2I-R1) on a Janus policy. ``Trainer.step()`` is DESIGN.md §2:

    records = this step's prompt groups
    batch   = rollout(records)                      CoT, then image tokens, then pixels
    scores  = rewards(**batch.reward_inputs())      total + components
    adv     = group advantages (+ DAPO filter)
    train   = pack(batch, adv)                      rows, per-token groups / segments / weights
    loss    = GRPO over teacher-forced log-probs of both heads ; backward ; optimizer step
    metrics = one dict -> metrics.jsonl, progress bar, grids

Single process here; the distributed layer and durable checkpoints wrap this class from outside.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import math
import os
import shutil
import time

import torch

from ..data import load_prompts
from ..rewards import Reward, RewardEnsemble, RewardError
from ..rollout import RolloutEngine
from .advantage import group_advantages
from .batch import IMAGE, TEXT, MicroBatch, mini_batches, pack
from .config import ConfigError, TrainerConfig
from .distributed import Parallel
from .entropy import EntropyBonus
from .optim import MasterOptimizer
from .rewards import build_rewards, load_callable
from .step import grpo_objective


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient, a failed reward); names step and cause."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {name!r} but CUDA is not available on this machine")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def build_policy(model, device=None):
    """The policy a ModelConfig names (local directory, preset or builder), on its device/dtype, with
    its token settings (model.add_tokens, model.cot_end_token) applied."""
    from ..models.added_tokens import apply_model_tokens

    return apply_model_tokens(_load_policy(model, device), model.add_tokens, model.cot_end_token,
                              model.cot_stop_tokens)


def _load_policy(model, device=None):
    from ..models import JanusPolicy

    device = device or resolve_device(model.device)
    dtype = resolve_dtype(model.dtype, device)
    if model.path is not None:
        return JanusPolicy.from_pretrained(model.path, dtype=dtype, device=device, tokenizer_dir=model.tokenizer_path,
                                           attn_implementation=model.attn_implementation)
    if model.preset is not None:
        return JanusPolicy.from_preset(model.preset, seed=model.seed, device=device, dtype=dtype,
                                       attn_implementation=model.attn_implementation)
    if model.builder is not None:
        policy = load_callable(model.builder, "model.builder")(seed=model.seed)
        policy.hf_model.to(device=device, dtype=dtype)
        return policy
    raise ConfigError("model: give model.path (a local Janus checkpoint), model.preset or model.builder")


def set_trainable(policy, trainable, frozen) -> list:
    """requires_grad by fnmatch patterns over transformers' Janus names; returns the trainable names."""
    names = [n for n, _ in policy.hf_model.named_parameters()]
    for pat in trainable:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise ConfigError(f"model.trainable: pattern {pat!r} matches no parameter (names look like "
                              f"{names[0]!r}, {names[-1]!r})")
    out = []
    for n, p in policy.hf_model.named_parameters():
        on = any(fnmatch.fnmatchcase(n, t) for t in trainable) and not any(fnmatch.fnmatchcase(n, f) for f in frozen)
        p.requires_grad_(on)
        if on:
            out.append(n)
    if not out:
        raise ConfigError("model.trainable / model.frozen: no parameter is left trainable")
    return out


def enable_checkpointing(model) -> None:
    """Activation checkpointing of every decoder layer (transformers >= 5.23 renamed the method)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def step_seed(seed: int, step: int) -> int:
    """The rollout's random stream of a step: a function of (seed, step) only."""
    h = hashlib.blake2b(f"fastbicot/{seed}/{step}".encode(), digest_size=7).digest()
    return int.from_bytes(h, "little")


class Trainer:
    """``Trainer(config, policy=None, rewards=None, ref_policy=None)``.

    policy: a JanusPolicy (default: built from ``config.model``). rewards: a RewardEnsemble, a
    Reward, a list of Rewards (default: built from ``config.rewards``). ref_policy: the frozen
    reference for the KL term (default: a copy of the policy when ``loss.beta > 0``; none at 0;
    none with ``lora.enabled``: the reference is the policy with its adapters disabled).
    """

    def __init__(self, config: TrainerConfig, policy=None, rewards=None, ref_policy=None):
        if not isinstance(config, TrainerConfig):
            raise TypeError(f"config must be a TrainerConfig, got {type(config).__name__}")
        self.config = c = config
        if c.threads:
            torch.set_num_threads(c.threads)
        torch.manual_seed(c.seed)
        # torchrun: join the process group; one process: every collective is the identity
        self.world = world = Parallel.from_env(c.distributed)
        own = world.local_slice(c.data.prompts_per_step)  # a world size that does not divide the groups: stop now
        if len(own) % c.optim.mini_batches:
            raise ConfigError(f"optim.mini_batches={c.optim.mini_batches} does not divide the {len(own)} prompt groups "
                              f"of each of the {world.world_size} ranks (data.prompts_per_step="
                              f"{c.data.prompts_per_step}): every rank deals its groups into the mini-batches")
        model = c.model
        if world.enabled:  # FSDP keeps fp32 parameters (the master weights) and computes in model.dtype
            device = world.device(c.model.device)
            self.compute_dtype = world.compute_dtype(resolve_dtype(c.model.dtype, device), device)
            # built in host memory; fully_shard moves each rank's shards (a layer at a time) to its device
            model = model.replace(dtype="float32", device="cpu")
        self.policy = policy if policy is not None else build_policy(model)
        if policy is None and c.sft.steps > 0:  # the supervised warm start (cached), then GRPO from it
            from .sft import warm_start

            if world.is_main:  # one rank trains (or finds the cached) warm start; the others wait for it
                path = warm_start(c)
            world.barrier()
            load_policy_weights(self.policy, path if world.is_main else warm_start(c))
        self.device = self.policy.device
        self.lora = None  # lora.enabled: the peft handle (trainer/lora.py); only the adapters train
        if c.lora.enabled:
            from .lora import setup

            self.lora, self.trainable = setup(self, ref_policy, built=policy is None)
        else:
            self.trainable = set_trainable(self.policy, c.model.trainable, c.model.frozen)
        if c.model.gradient_checkpointing:
            enable_checkpointing(self.policy.language_model)
        self.ref_policy = None
        if c.loss.beta > 0 and self.lora is None:  # LoRA: the reference is the adapters disabled
            self.ref_policy = ref_policy if ref_policy is not None else copy.deepcopy(self.policy)
            self.ref_policy.eval()
            for p in self.ref_policy.parameters():
                p.requires_grad_(False)
        if world.enabled:
            world.shard(self.policy, compute_dtype=self.compute_dtype, trainable=True, device=device)
            if self.ref_policy is not None:
                world.shard(self.ref_policy, compute_dtype=self.compute_dtype, trainable=False, device=device,
                            offload=c.distributed.reference == "cpu_offload" and device.type != "cpu")
            self.device = self.policy.device  # the shards' device (the policy was built in host memory)
        self.entropy_bonus = None if c.loss.entropy_bonus.mode == "none" else EntropyBonus(c.loss.entropy_bonus)
        self.rewards = self._as_ensemble(rewards) if rewards is not None else build_rewards(c.rewards, self.device)
        self.prompts = load_prompts(c.data.prompts, c.data.format) if c.data.prompts else None
        self.engine = RolloutEngine(self.policy, c.rollout, progress=False)
        self.optim = MasterOptimizer(self.policy.parameters(), c.optim,
                                     c.steps * c.optim.mini_batches * c.loss.num_iterations)
        if world.enabled:
            self.optim.grad_norm = lambda: world.grad_norm(self.optim.params)
        self.step_idx = 0  # completed steps
        self.last_batch = self.last_scores = None

    @staticmethod
    def _as_ensemble(rewards) -> RewardEnsemble:
        if isinstance(rewards, RewardEnsemble):
            return rewards
        if isinstance(rewards, Reward):
            return RewardEnsemble([rewards])
        if isinstance(rewards, (list, tuple)) and rewards and all(isinstance(r, Reward) for r in rewards):
            return RewardEnsemble(list(rewards))
        raise TypeError(f"rewards must be a RewardEnsemble, a Reward or a list of Rewards, got {type(rewards).__name__}")

    # ---- data ------------------------------------------------------------------------------------
    def records(self, step: int | None = None) -> list:
        """The prompt groups of ``step`` (default: the next one): positions [k*P, (k+1)*P) of an endless
        stream of shuffled epochs, so the data position is a function of the step."""
        if self.prompts is None:
            raise ValueError("no prompts: set data.prompts to a JSONL / text file")
        step = self.step_idx if step is None else step
        P, n, d = self.config.data.prompts_per_step, len(self.prompts), self.config.data
        out = []
        for pos in range(step * P, (step + 1) * P):
            epoch, i = divmod(pos, n)
            if d.shuffle:
                g = torch.Generator().manual_seed(d.seed * 1_000_003 + epoch)
                i = int(torch.randperm(n, generator=g)[i])
            out.append(self.prompts[i])
        return out

    # ---- the four stages -------------------------------------------------------------------------
    def rollout(self, records=None):
        """This step's prompts (or ``records``) generated by the current policy -> RolloutBatch.
        Under torchrun each rank generates its own slice of the step's prompt groups."""
        records = self.records() if records is None else records
        own = self.world.local_slice(len(records), "the step's prompt count")
        self.policy.eval()
        with self.world.unsharded(self.policy):
            return self.engine.generate([records[i] for i in own], seed=step_seed(self.config.seed, self.step_idx),
                                        group_index=list(own))

    def score(self, batch):
        """The reward ensemble on a RolloutBatch -> RewardOutput(total, components); a reward that
        fails or returns a non-finite total stops with its name and prompt."""
        try:
            out = self.rewards(**batch.reward_inputs())
        except RewardError as e:
            raise TrainingError(f"step {self.step_idx + 1}: {e}") from e
        bad = (~torch.isfinite(out.total)).nonzero().flatten().tolist()
        if bad:
            raise TrainingError(f"step {self.step_idx + 1}: the total reward is not finite for prompt "
                                f"{batch.samples[bad[0]].prompt!r} ({len(bad)} samples)")
        return out

    def advantages(self, batch, scores):
        a = self.config.advantage
        return group_advantages(scores.total, batch.group_ids, scale=a.scale, eps=a.eps,
                                filter_zero_std=a.filter_zero_std)

    def compute_loss(self, batch, advantages, keep=None):
        """The step's loss over the whole batch in one forward (no micro-batching, no backward):
        -> (loss 0-dim with graph, stats). The reference runs without grad."""
        train = pack(batch, advantages, self.config.loss, keep, world=self.world)
        idx = list(range(len(train.samples)))
        loss, sums, _ = self._micro(train, idx, ref=self._ref_logprobs(train, idx), old=None, entropy=False)
        w = sums.pop("weight")
        return loss, {k: v / w for k, v in sums.items()}

    # ---- the update --------------------------------------------------------------------------------
    def _ref_logprobs(self, train, idx):
        mb = _as_micro(train, idx)
        if self.lora is not None and self.config.loss.beta > 0:
            from .lora import reference_logprobs

            return reference_logprobs(self.lora, self.world.logprobs, self.policy, mb.samples, self.config.loss,
                                      self.config.rollout.guidance_scale, reuse=mb.reuse)
        if self.ref_policy is None:
            return None
        emb = self.policy if self.config.loss.ref_text_embeddings == "policy" else None
        with torch.no_grad(), self.world.root_unsharded(emb):
            return self.world.logprobs(self.ref_policy, mb.samples, loss=self.config.loss,
                                       guidance_scale=self.config.rollout.guidance_scale, embeds_from=emb,
                                       reuse=mb.reuse).logprobs

    def _micro(self, train, idx, *, ref, old, entropy):
        """Forward + objective of one micro-batch (a MicroBatch, or a list of whole-sample positions)."""
        L = self.config.loss
        mb = _as_micro(train, idx)
        tok = mb.tokens
        bonus = self.entropy_bonus
        fwd = self.world.logprobs(self.policy, mb.samples, loss=L, guidance_scale=self.config.rollout.guidance_scale,
                                  entropy="grad" if bonus is not None else entropy, reuse=mb.reuse)
        loss, sums = grpo_objective(fwd.logprobs, train.advantages[mb.positions], mb.seq_ids, train.weights[tok],
                                    old=old, ref=ref,
                                    beta=L.beta, eps_low=L.eps_low, eps_high=L.eps_high,
                                    importance_sampling=L.importance_sampling,
                                    kl_bias_correction=L.kl_bias_correction)
        if bonus is not None:  # + this micro-batch's share of the step's entropy term (trainer/entropy.py)
            live = train.weights > 0
            n_text, n_image = (self.world.sum(int(((train.segments == k) & live).sum())) for k in (TEXT, IMAGE))
            term = bonus.term(fwd.entropy_text, fwd.entropy_image, n_text, n_image)
            if term is not None:
                loss = loss + term.to(loss.dtype)
        return loss, sums, fwd

    def _micros(self, train) -> tuple:
        """The micro-batches of ``train`` -> (micro-batches, how many are real). Under torchrun every rank
        must run as many forwards and backwards as the others (each is a collective): a token budget can
        cut one rank's share into more pieces, so the others repeat their last piece with weight 0."""
        c = self.config
        micros = train.split(c.optim.micro_batch_prompts, c.optim.micro_batch_tokens,
                             whole_samples=c.loss.importance_sampling == "sequence")
        n = self.world.max(len(micros))
        return micros + [micros[-1]] * (n - len(micros)), len(micros)

    def update(self, batch, advantages, keep=None) -> dict:
        """GRPO update(s) on a scored batch: ``optim.mini_batches`` mini-batches of whole prompt groups,
        each ``loss.num_iterations`` optimizer steps over its micro-batches. Returns the update's metrics
        (loss, kl, grad_norm: means over the mini-batches' first iterations)."""
        c, L = self.config, self.config.loss
        step = self.step_idx + 1
        parts = []
        for part, adv, kp in mini_batches(batch, advantages, keep, c.optim.mini_batches):
            train = pack(part, adv, L, kp, world=self.world)
            if self.world.sum(float(train.weights.sum())) > 0:  # a mini-batch of filtered groups only: skipped
                parts.append((part, train, *self._micros(train)))
        if not parts:  # every group filtered: nothing to learn
            self.optim.zero_grad()
            return {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "ratio_mean": 1.0, "grad_norm": 0.0,
                    "lr": self.optim.lr, "update/skipped": 1.0}
        refs = [[self._ref_logprobs(train, m) for m in micros] for _, train, micros, _ in parts]
        # the mini-batches after the first are trained after an optimizer step: their ratios are taken
        # against the policy that generated the rollout, computed now (the first's come from its forward)
        olds = [[None] * len(micros) for _, _, micros, _ in parts]
        self.policy.train()
        if len(parts) > 1:
            with torch.no_grad():
                for j, (_, train, micros, _) in enumerate(parts[1:], 1):
                    olds[j] = [self.world.logprobs(self.policy, m.samples, loss=L, guidance_scale=c.rollout.guidance_scale,
                                                   reuse=m.reuse).logprobs for m in micros]
        out = {"lr": self.optim.lr}
        ent = {TEXT: [], IMAGE: []}
        clip, ratio, first = [], [], []
        try:
            for j, (part, train, micros, n_real) in enumerate(parts):
                for it in range(L.num_iterations):
                    total = {}
                    for m, idx in enumerate(micros):
                        real = m < n_real
                        loss, sums, fwd = self._micro(train, idx, ref=refs[j][m], old=olds[j][m],
                                                      entropy=it == 0 and c.log.entropy and real)
                        bad = ~torch.isfinite(fwd.logprobs.detach())
                        if bool(bad.any()):  # at mu = 1 the loss value does not depend on them: check here
                            k = int(train.seq_ids[idx.tokens][bad.cpu()][0])
                            raise TrainingError(
                                f"step {step}: {int(bad.sum())} log-probs are not finite (first in the sample of "
                                f"prompt {part.samples[train.samples[k].index].prompt!r}); the policy's weights or "
                                "activations hold NaN/inf; no optimizer step was taken")
                        if not bool(torch.isfinite(loss)):
                            raise TrainingError(f"step {step}: the loss is {float(loss)} (mini-batch {j + 1}, update "
                                                f"{it + 1}, micro-batch {m + 1}/{n_real}); no optimizer step was taken")
                        if not real:  # a repeat that keeps the ranks' collectives in step: no contribution
                            loss = loss * 0
                        # FSDP averages gradients over ranks; each rank's loss is its share of the sum
                        (loss * self.world.world_size if self.world.enabled else loss).backward()
                        if not real:
                            continue
                        if L.num_iterations > 1 and it == 0 and olds[j][m] is None:
                            olds[j][m] = fwd.logprobs.detach()
                        for k, v in sums.items():
                            total[k] = total.get(k, 0.0) + float(v)
                        total["loss"] = total.get("loss", 0.0) + float(loss.detach())
                        if fwd.entropy_text is not None:
                            ent[TEXT].append(fwd.entropy_text)
                        if fwd.entropy_image is not None:
                            ent[IMAGE].append(fwd.entropy_image)
                    total = {k: self.world.sum(v) for k, v in sorted(total.items())}
                    gn = self.optim.grad_norm()
                    if not bool(torch.isfinite(gn)):
                        bad = next(n for n, p in self.policy.hf_model.named_parameters()
                                   if p.grad is not None and not bool(torch.isfinite(p.grad).all()))
                        self.optim.zero_grad()
                        raise TrainingError(f"step {step}: the gradient is not finite (first in {bad}; mini-batch "
                                            f"{j + 1}, update {it + 1}); no optimizer step was taken")
                    self.optim.step(gn)
                    w = total["weight"] or 1.0
                    if it == 0:
                        first.append((total["loss"], total["kl"] / w, float(gn)))
                    clip.append(total["clip_fraction"] / w)
                    ratio.append(total["ratio_mean"] / w)
        finally:
            self.policy.eval()
        out.update(loss=sum(x[0] for x in first) / len(first), kl=sum(x[1] for x in first) / len(first),
                   grad_norm=sum(x[2] for x in first) / len(first))
        out["clip_fraction"] = sum(clip) / len(clip)
        out["ratio_mean"] = sum(ratio) / len(ratio)
        for key, seg in (("entropy/text", TEXT), ("entropy/image", IMAGE)):
            e = torch.cat(ent[seg]) if ent[seg] else torch.zeros(0)
            n = self.world.sum(float(e.numel()))
            if n > 0:
                out[key] = self.world.sum(float(e.detach().double().sum())) / n
        if self.entropy_bonus is not None:  # one controller step with this step's mean entropies
            out.update(self.entropy_bonus.update(out.get("entropy/text"), out.get("entropy/image")))
        return out

    def step(self) -> dict:
        """One BiCoT-GRPO step; returns its metrics."""
        t0 = time.perf_counter()
        batch = self.rollout()
        t1 = time.perf_counter()
        scores = self.score(batch)
        refill_stats = {}
        if self.config.advantage.refill != "none":  # DAPO dynamic sampling (trainer/dynamic_sampling.py)
            from .dynamic_sampling import refill

            batch, scores, refill_stats = refill(self, batch, scores, self.records())
        t2 = time.perf_counter()
        adv, keep, adv_stats = self.advantages(batch, scores)
        metrics = self.update(batch, adv, keep if self.config.advantage.filter_zero_std else None)
        t3 = time.perf_counter()
        self.step_idx += 1
        self.last_batch, self.last_scores = batch, scores
        W = self.world  # metrics over the global batch (every rank's samples)
        total = W.gather(scores.total.detach().cpu())
        n = len(total)
        if W.enabled:
            adv_stats = {k: W.sum(v) / (W.world_size if k == "reward/group_std" else 1) for k, v in adv_stats.items()}
        metrics = {
            "step": self.step_idx,
            "reward/mean": float(total.mean()),
            "reward/std": float(total.std()) if total.numel() > 1 else 0.0,
            **{f"reward/{k}": float(W.gather(v.detach().cpu()).mean()) for k, v in scores.components.items()},
            **adv_stats,
            **refill_stats,
            **metrics,
            "cot_len": W.sum(float(sum(len(s.cot_ids) for s in batch.samples))) / n,
            "images_per_s": n / W.max(t3 - t0),
            "time/rollout": t1 - t0,
            "time/cot": batch.timing.get("cot", math.nan),
            "time/image": batch.timing.get("image", math.nan),
            "time/decode": batch.timing.get("decode", math.nan),
            "time/reward": t2 - t1,
            "time/update": t3 - t2,
        }
        return metrics

    # ---- the loop ----------------------------------------------------------------------------------
    def train(self, *, overwrite: bool = False) -> str:
        """Run ``config.steps`` steps, writing metrics, grids, the reward curve and the final policy
        into ``output_dir``; returns ``output_dir``. Under torchrun rank 0 writes the files (grids show
        its own samples) and every rank takes part in the checkpoints."""
        from .metrics import MetricsLogger, save_reward_curve, save_sample_grid

        c, main = self.config, self.world.is_main
        out = c.output_dir
        logger = None
        if main:
            prepare_output_dir(out, overwrite=overwrite, resume=self.step_idx > 0)
            with open(os.path.join(out, "config.yaml"), "w", encoding="utf-8") as f:
                f.write(c.to_yaml())
            logger = MetricsLogger(out, c.log, total_steps=c.steps, start_step=self.step_idx, config_dict=c.to_dict())
        self.world.barrier()  # nobody writes into output_dir before rank 0 has prepared it
        grids = os.path.join(out, "grids")
        try:
            while self.step_idx < c.steps:
                m = self.step()
                s = self.step_idx
                if main:
                    logger.log(m)
                    if s == 1 or s == c.steps or (c.log.grid_every and s % c.log.grid_every == 0):
                        os.makedirs(grids, exist_ok=True)
                        save_sample_grid(self.last_batch, self.last_scores, os.path.join(grids, f"step_{s:06d}.png"),
                                         max_samples=c.log.grid_samples, title=f"step {s}")
                if c.checkpoint.every and s % c.checkpoint.every == 0 and s < c.steps:
                    self.save_checkpoint()
        finally:
            if logger is not None:
                logger.close()
        self.save_checkpoint(final=True)
        if main:
            save_reward_curve(logger.path, os.path.join(out, "reward_curve.png"))
        return out

    def save_checkpoint(self, final: bool = False) -> str:
        """The policy in transformers' format (with LoRA: the adapter) plus the exact training state
        (trainer/checkpoint.py), written under a temporary name and renamed; keeps the last
        ``checkpoint.keep``."""
        from . import checkpoint

        return checkpoint.save(self, final)

    def load_checkpoint(self, path: str) -> None:
        """Continue from a checkpoint (any world size): weights, fp32 masters, optimizer, scheduler,
        the step (hence the data position and the rollout's random stream), RNG."""
        from . import checkpoint

        checkpoint.load(self, path)

    @property
    def optim_names(self) -> list:
        """Names of the optimizer's parameters (its checkpoint keys), in its order."""
        ids = {id(p): n for n, p in self.policy.named_parameters()}
        return [ids[id(p)] for p in self.optim.params]


def _as_micro(train, idx):
    return idx if isinstance(idx, MicroBatch) else train.part(idx)


def find_checkpoint(output_dir: str, which: str = "latest") -> str:
    """``output_dir``'s latest checkpoint (``which="latest"``) or the one of step ``which``."""
    from .checkpoint import find

    return find(output_dir, which)


def load_policy_weights(policy, path: str, world=None) -> None:
    """Load every ``*.safetensors`` file of a transformers-format directory into ``policy`` (FSDP-
    sharded when ``world`` sharded it: each rank keeps its shard); a missing or unexpected tensor is
    an error naming it."""
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path!r} holds no *.safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
    if world is not None and world.sharded(policy):
        world.load_full_state_dict(policy, state, path)
        return
    missing, unexpected = policy.hf_model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path!r} does not match the policy: missing {missing[:4]}, unexpected {unexpected[:4]}")


def save_policy(policy, path: str, state_dict=None, dtype=None) -> None:
    """transformers' format (loadable by JanusForConditionalGeneration / JanusPolicy.from_pretrained),
    with the tokenizer and the BOI id (generation_config.json's generation_kwargs). ``state_dict``:
    the weights to write (a gathered FSDP state dict) instead of the module's, cast to ``dtype``."""
    os.makedirs(path, exist_ok=True)
    if state_dict is not None and dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    policy.hf_model.save_pretrained(path, state_dict=state_dict)
    if policy.tokenizer is not None:
        policy.tokenizer.save_pretrained(path)


def check_output_dir(path: str, *, overwrite: bool, resume: bool) -> None:
    """Refuse (without touching anything) an output dir that already holds another run, unless
    resuming or overwriting; called before any work so a refusal costs nothing."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"output_dir {path!r} exists and is not a directory")
    if os.path.exists(os.path.join(path, "metrics.jsonl")) and not resume and not overwrite:
        raise ConfigError(f"output_dir {path!r} already holds a run (metrics.jsonl); pass --overwrite to "
                          "replace it or --resume to continue it, or choose another output_dir")


def prepare_output_dir(path: str, *, overwrite: bool, resume: bool) -> None:
    """check_output_dir, then empty it for --overwrite and check it is writable."""
    check_output_dir(path, overwrite=overwrite, resume=resume)
    if os.path.exists(os.path.join(path, "metrics.jsonl")) and not resume:
        for name in os.listdir(path):
            p = os.path.join(path, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, ".write-test")
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"output_dir {path!r} is not writable ({e.strerror})") from None


__all__ = ["Trainer", "TrainingError", "build_policy", "find_checkpoint", "load_policy_weights", "save_policy",
           "step_seed"]
