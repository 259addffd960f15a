"""Many processes: torchrun, FSDP2 and the collectives the Trainer needs -- all of it in this module.

``Parallel`` is the Trainer's view of the world. In one process (no torchrun) every method is the
identity and nothing here touches the model. Under torchrun (``WORLD_SIZE > 1``):

* each rank owns whole prompt groups: a step's P prompts are cut into ``world_size`` equal,
  contiguous slices; the rollout draws every sample's tokens from a stream keyed by the sample's
  *global* index (``RolloutEngine.generate(group_index=...)``), so 1 rank and N ranks generate the
  same samples from the same global batch;
* the policy is sharded with FSDP2 (``fully_shard``): each decoder layer, then the root -- a
  ``LogprobModule`` around the policy, whose forward is the teacher-forced log-prob computation, so
  FSDP's hooks gather the root's parameters (embeddings, heads) for it. Modules the update never
  runs (vision encoder, understanding aligner, VQ model) are left out of FSDP (``ignored_params``):
  every rank keeps a full copy, in the compute dtype, and they never see a gradient;
* parameters are stored in fp32 (they are the master weights) and computed in bf16 on CUDA
  (``MixedPrecisionPolicy``, fp32 gradient reduction);
* the rollout runs inside an explicit unshard of every FSDP unit (``unsharded``): the rollout
  engine calls submodules and reads weights directly, which would bypass FSDP's hooks. It reads the
  very tensors FSDP all-gathered, so there is no second (inference) copy to keep in sync; the cost is
  the whole bf16 policy resident during the rollout (DESIGN.md §11);
* the loss of a rank is its share of the step's loss (aggregation weights are normalised by totals
  summed over ranks, trainer/batch.py) and gradients are summed over ranks, so the update equals the
  single-process one on the same global batch;
* every collective has a timeout (``distributed.timeout_s``): a rank that died or hangs stops the
  others with an error instead of a silent wait.

The same code runs on CPU with the gloo backend (the CI test: 2 ranks vs 1 rank, equal rollouts,
losses and updated weights).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os

import torch
from torch import nn


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer (set by torchrun)") from None


class LogprobModule(nn.Module):
    """The FSDP root: ``forward`` is ``sample_logprobs(policy, ...)``, returned as a tuple of tensors
    (FSDP's hooks find tensors in tuples, not in dataclasses)."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy
        self.anchors: list = []  # names of the trainable root parameters; see forward

    def forward(self, samples, kwargs):
        from .logprobs import sample_logprobs

        out = sample_logprobs(self.policy, samples, **kwargs)
        lp = out.logprobs
        if self.anchors and torch.is_grad_enabled():
            # Every rank must reduce-scatter the same set of gradients: a parameter no token of this
            # rank reached (a head with no targets here) gets an exact-zero gradient instead of None.
            # Looked up by name: inside forward FSDP has swapped in the unsharded tensors.
            lp = lp + sum(self.get_parameter(n).reshape(-1)[:1].sum() for n in self.anchors) * 0.0
        return lp, out.entropy_text, out.entropy_image


class Parallel:
    """The world as the Trainer sees it. ``Parallel()`` is one process; ``Parallel.from_env(cfg)``
    joins torchrun's process group when ``WORLD_SIZE > 1``."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, config=None):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.config = config
        self.backend = None
        self._roots: dict = {}  # id(policy) -> its FSDP root LogprobModule

    # ---- set-up ----------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, config) -> Parallel:
        """One process unless torchrun set ``WORLD_SIZE > 1``; then join (or reuse) the process group."""
        world = _env_int("WORLD_SIZE", 1)
        if world <= 1:
            return cls(config=config)
        import torch.distributed as dist

        rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        self = cls(rank, world, local, config)
        backend = config.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            if not torch.cuda.is_available():
                raise RuntimeError("distributed.backend: nccl needs CUDA; use gloo on CPU")
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=config.timeout_s))
        if dist.get_world_size() != world:
            raise RuntimeError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} ranks")
        self.backend = dist.get_backend()
        return self

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> torch.device:
        """This rank's device: cuda:LOCAL_RANK under nccl; the configured device otherwise."""
        if self.enabled and self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        from .trainer import resolve_device

        return resolve_device(requested)

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    # ---- the data a rank owns --------------------------------------------------------------------
    def local_slice(self, n: int, what: str = "data.prompts_per_step") -> range:
        """This rank's contiguous share of ``n`` items (whole prompt groups)."""
        if n % self.world_size:
            raise ValueError(f"{what}={n} is not divisible by the world size {self.world_size}: every rank must "
                             f"own the same number of whole prompt groups (use a multiple of {self.world_size})")
        k = n // self.world_size
        return range(self.rank * k, (self.rank + 1) * k)

    # ---- collectives (identity in one process) ---------------------------------------------------
    def _buf(self, x) -> torch.Tensor:
        t = torch.as_tensor(x, dtype=torch.float64).clone()
        return t.cuda(self.local_rank) if self.backend == "nccl" else t

    def sum(self, x):
        """Sum over ranks of a number or a float tensor (float64 on the wire); same type back."""
        if not self.enabled:
            return x
        import torch.distributed as dist

        t = self._buf(x)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu() if torch.is_tensor(x) else (float(t) if isinstance(x, float) else type(x)(t.item()))

    def max(self, x):
        if not self.enabled:
            return x
        import torch.distributed as dist

        t = self._buf(x)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.cpu() if torch.is_tensor(x) else type(x)(t.item())

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenation over ranks (rank order) of equally-shaped tensors."""
        if not self.enabled:
            return x
        import torch.distributed as dist

        t = self._buf(x)
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t)
        return torch.cat([p.cpu() for p in parts]).to(x.dtype)

    def gather_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def check(self, ok: bool, message: str) -> None:
        """Raise on every rank when any rank's ``ok`` is False (the message of the first such rank)."""
        msgs = self.gather_objects(None if ok else message)
        bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
        if bad:
            r, m = bad[0]
            raise RuntimeError(m if not self.enabled else f"rank {r}: {m}")

    # ---- FSDP2 -----------------------------------------------------------------------------------
    def compute_dtype(self, requested: torch.dtype, device: torch.device) -> torch.dtype:
        if self.config is not None and self.config.mixed_precision == "none":
            return torch.float32
        return requested if device.type == "cuda" else torch.float32

    def shard(self, policy, *, compute_dtype: torch.dtype, trainable: bool, device: torch.device,
              offload: bool = False) -> None:
        """FSDP2 over ``policy`` (fp32 parameters, in host memory or on ``device``): each decoder layer,
        then a LogprobModule root; the shards end on ``device``. No-op in one process."""
        if not self.enabled:
            return
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        mp = MixedPrecisionPolicy()
        if compute_dtype != torch.float32:
            mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        off = CPUOffloadPolicy() if offload else OffloadPolicy()
        reshard = self.config.reshard_after_forward if self.config is not None else True
        hf = policy.hf_model
        # never run by the update: outside FSDP, full copies in the compute dtype, no gradients
        unused = [m for m in (getattr(hf.model, "vision_model", None), getattr(hf.model, "aligner", None),
                              getattr(hf.model, "vqmodel", None)) if m is not None]
        ignored = set()
        for m in unused:
            m.to(device=device, dtype=compute_dtype)
            for p in m.parameters():
                p.requires_grad_(False)
                ignored.add(p)
        for layer in policy.language_model.layers:
            fully_shard(layer, mp_policy=mp, offload_policy=off, reshard_after_forward=reshard)
        root = LogprobModule(policy)
        # the root's own parameters are gathered once per forward; resharding after a no-grad
        # forward (the reference) frees them at once
        fully_shard(root, mp_policy=mp, offload_policy=off, ignored_params=ignored,
                    reshard_after_forward=not trainable)
        if trainable:
            in_layers = {id(p) for layer in policy.language_model.layers for p in layer.parameters()}
            root.anchors = [n for n, p in root.named_parameters() if p.requires_grad and id(p) not in in_layers]
        self._roots[id(policy)] = root
        for mod in policy.modules():  # buffers (RoPE's inv_freq) compute on the device whatever the offload
            for name, buf in list(mod.named_buffers(recurse=False)):
                if buf is not None and buf.device != device:
                    setattr(mod, name, buf.to(device))

    def sharded(self, policy) -> bool:
        return id(policy) in self._roots

    def _units(self, policy) -> list:
        from torch.distributed.fsdp import FSDPModule

        root = self._roots[id(policy)]
        return [m for m in root.modules() if isinstance(m, FSDPModule)]

    @contextlib.contextmanager
    def unsharded(self, policy):
        """Every FSDP unit of ``policy`` all-gathered (plain tensors in the compute dtype) inside the
        block: the rollout engine reads weights directly. Identity when not sharded."""
        if not self.sharded(policy):
            yield
            return
        units = self._units(policy)
        for u in units:
            u.unshard()
        try:
            yield
        finally:
            for u in units:
                u.reshard()

    @contextlib.contextmanager
    def root_unsharded(self, policy):
        """Only the root unit of ``policy`` gathered (its embeddings and heads): the reference reads
        the policy's text embeddings (loss.ref_text_embeddings="policy")."""
        if not self.sharded(policy):
            yield
            return
        root = self._roots[id(policy)]
        root.unshard()
        try:
            yield
        finally:
            root.reshard()

    def logprobs(self, policy, samples, **kwargs):
        """``sample_logprobs(policy, samples, **kwargs)``, through the FSDP root when sharded (one
        trunk forward per row set on every rank, so each layer gathers the same number of times)."""
        from .logprobs import Forward, sample_logprobs

        if not self.sharded(policy):
            return sample_logprobs(policy, samples, **kwargs)
        kwargs = dict(kwargs, max_waste=math.inf)
        lp, ent_t, ent_i = self._roots[id(policy)](samples, kwargs)
        return Forward(lp, ent_t, ent_i)

    # ---- gradients -------------------------------------------------------------------------------
    def grad_norm(self, params) -> torch.Tensor:
        """Global L2 norm of the gradients of (possibly sharded) ``params``: float32 0-dim."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        sq = torch.stack([torch.linalg.vector_norm(g.float()) for g in local]).double().pow(2).sum().cpu()
        return self.sum(sq).sqrt().float()

    # ---- state dicts -----------------------------------------------------------------------------
    def full_state_dict(self, policy) -> dict:
        """The whole policy's state dict as plain CPU tensors (gathered; meaningful on rank 0)."""
        if not self.sharded(policy):
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(policy.hf_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_full_state_dict(self, policy, state: dict, source: str) -> None:
        """A full (unsharded) state dict into the sharded policy: each rank keeps its shard."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        names = set(policy.hf_model.state_dict())
        missing, unexpected = sorted(names - set(state)), sorted(set(state) - names)
        if missing or unexpected:
            raise ValueError(f"{source!r} does not match the policy: missing {missing[:4]}, unexpected {unexpected[:4]}")
        set_model_state_dict(policy.hf_model, state, options=StateDictOptions(full_state_dict=True, strict=True))


__all__ = ["LogprobModule", "Parallel"]
