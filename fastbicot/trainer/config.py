"""TrainerConfig: nested settings sections, validated field by field, loadable from YAML.

Defaults are the T2I-R1 recipe (CaraJ7/T2I-R1 ``run_grpo.sh`` + ``grpo_trainer.py`` + the HF Trainer
defaults it inherits); every departure is an option named here and listed in docs/fidelity.md.

    config = TrainerConfig.from_yaml("configs/t2i_r1.yaml", ["--loss.beta=0", "optim.lr=2e-6"])

An override is ``section.key=value`` (a leading ``--`` is allowed); the value is parsed as YAML, so
``true``, ``3``, ``1e-6`` and ``[a, b]`` mean what they look like. An unknown key is an error naming it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..rollout.config import RolloutConfig, SamplingParams
from ..settings import ConfigError, Settings, check_choice, check_range
from .entropy import EntropyBonusConfig

DTYPES = ("auto", "bfloat16", "float16", "float32", "float64")
# transformers' Janus parameter names (JanusForConditionalGeneration.named_parameters()).
TRAINABLE = ["model.language_model.*", "lm_head.*"]
# LoRA (lora.target_modules): the language model's attention and MLP projections (LlamaDecoderLayer)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig(Settings):
    """Where the policy comes from: exactly one of ``path`` (a local transformers-format Janus
    directory), ``preset`` (random weights of a real shape: tiny, janus-pro-1b, janus-pro-7b) or
    ``builder`` ("module:callable" returning a JanusPolicy, e.g. the toy world's).

    trainable / frozen: fnmatch patterns over transformers' Janus parameter names; a parameter
    trains when it matches a ``trainable`` pattern and no ``frozen`` one. The seed trains the
    language model with its embeddings and text head and freezes the vision encoder, aligners,
    every generation module and the VQ model.
    """

    path: str | None = None
    preset: str | None = None
    builder: str | None = None
    tokenizer_path: str | None = None
    seed: int = 0  # weights of preset / builder models
    dtype: str = "auto"  # compute dtype; "auto": bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # "auto": cuda when available, else cpu
    trainable: list[str] = field(default_factory=lambda: list(TRAINABLE))
    frozen: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = True
    attn_implementation: str = "sdpa"
    # text tokens added to the tokenizer, embeddings resized when needed (GoT-R1's layout markers;
    # fastbicot/models/added_tokens.py); cot_end_token: the token that ends the CoT instead of EOS (GoT-R1:
    # "<begin_of_image>", so the image follows the plan in one sequence); None: the model's EOS;
    # cot_stop_tokens: other tokens that also end the CoT, recorded and trained as cot_end_token ("eos":
    # the model's EOS; ReasonGen-R1 stops on EOS or BOI and trains BOI there)
    add_tokens: list[str] = field(default_factory=list)
    cot_end_token: str | None = None
    cot_stop_tokens: list[str] = field(default_factory=list)

    def check(self, path):
        if any(not isinstance(t, str) or not t.strip() for t in self.add_tokens):
            self.fail(path, "add_tokens", f"must be non-empty strings, got {self.add_tokens}")
        if any(not isinstance(t, str) or not t.strip() for t in self.cot_stop_tokens):
            self.fail(path, "cot_stop_tokens", f"must be non-empty strings, got {self.cot_stop_tokens}")
        given = [k for k in ("path", "preset", "builder") if getattr(self, k) is not None]
        if len(given) > 1:
            self.fail(path, given[1], f"give one of model.path, model.preset, model.builder; got {given}")
        check_choice(self, path, "dtype", DTYPES)
        if self.builder is not None and ":" not in self.builder:
            self.fail(path, "builder", f"must be 'module:callable', got {self.builder!r}")
        if not self.trainable:
            self.fail(path, "trainable", "is empty: nothing would train")


@dataclass
class DataConfig(Settings):
    """Prompts (JSONL in the T2I-CompBench / T2I-R1 format, or plain text), drawn in shuffled
    epochs: step k takes prompts [k*P, (k+1)*P) of the endless shuffled stream, so the data
    position is a function of the step (exact resume) and of ``seed`` (the seed uses 42)."""

    prompts: str | None = None
    format: str | None = None  # "jsonl" | "text"; None: from the file
    prompts_per_step: int = 16
    shuffle: bool = True
    seed: int = 42

    def check(self, path):
        check_range(self, path, "prompts_per_step", low=1)
        if self.format is not None:
            check_choice(self, path, "format", ("jsonl", "text"))


@dataclass
class RewardSpec(Settings):
    """One reward: ``name`` is hps | git | gdino | orm | vlm_judge | remote_judge | clip | pickscore,
    or "module:callable" (called with ``options``; returns a Reward, a list of them, a
    RewardEnsemble, or a plain callable ``fn(images, prompts, metadata, cots) -> scores``)."""

    name: str = ""
    path: str | None = None  # local checkpoint directory of model rewards
    weight: float = 1.0
    device: str | None = None  # default: the policy's device
    options: dict = field(default_factory=dict)

    def check(self, path):
        if not self.name:
            self.fail(path, "name", "is empty: name a reward (hps, git, gdino, orm, ...) or module:callable")


@dataclass
class RewardsConfig(Settings):
    """The ensemble: ``mode`` sum (T2I-R1, unweighted) or product (GoT-R1); ``normalize`` group
    normalises each component before summing."""

    functions: list[RewardSpec] = field(default_factory=list)
    mode: str = "sum"
    normalize: str = "none"

    def check(self, path):
        check_choice(self, path, "mode", ("sum", "product"))
        check_choice(self, path, "normalize", ("none", "group"))


@dataclass
class AdvantageConfig(Settings):
    """A = (r - mean_g) / (std_g + eps), unbiased std (the seed). ``scale``: "group" (the seed),
    "batch" (the std of the whole batch), "none" (r - mean_g, Dr.GRPO). ``filter_zero_std``: DAPO's
    filter -- groups whose rewards are all equal carry no signal and are left out of the loss."""

    scale: str = "group"
    eps: float = 1e-4
    filter_zero_std: bool = False
    # DAPO dynamic sampling (trainer/dynamic_sampling.py): refill the filtered groups with new generations
    # ("new_prompts" as ReasonGen-R1, or "same_prompts") up to max_gen_batches generation batches per step
    refill: str = "none"
    refill_size: str = "missing"
    max_gen_batches: int = 8

    def check(self, path):
        check_choice(self, path, "scale", ("group", "batch", "none"))
        check_range(self, path, "eps", low=0.0)
        check_choice(self, path, "refill", ("none", "new_prompts", "same_prompts"))
        check_choice(self, path, "refill_size", ("missing", "pow2"))
        if self.refill != "none" and not self.filter_zero_std:
            self.fail(path, "refill", "needs advantage.filter_zero_std: true (it refills the filtered groups)")


AGGREGATIONS = ("group_token_mean", "token_mean", "seq_mean", "dr_grpo")


@dataclass
class LossConfig(Settings):
    """The GRPO objective (DESIGN.md §3).

    beta            k3 KL weight against a frozen reference (0: no reference model is loaded)
    num_iterations  mu: optimizer updates per rollout; > 1 uses stored old log-probs from the
                    first pass of the training forward and the clip [1 - eps_low, 1 + eps_high]
    aggregation     group_token_mean (the seed's effective loss: token mean over [CoT + image]
                    inside each prompt group, then the mean over groups), token_mean (one mean over
                    every token of the step), seq_mean (mean of per-sequence means), dr_grpo
                    (sum / (num_sequences * max_tokens))
    cfg_logprobs    none (conditional branch only, the seed), cfg (log-softmax of the guided
                    logits), cfg_scaled (guided logits / w); cfg_uncond_grad lets gradient flow into
                    the unconditional branch
    importance_sampling  token (GRPO) or sequence (GSPO: one ratio per sequence, the geometric
                    mean of its token ratios)
    kl_bias_correction   TRL's use_bias_correction_kl: the KL term times the importance ratio
    text_weight / image_weight   per-segment token weights (CoT tokens / image tokens)
    ref_text_embeddings  "policy" (the seed feeds the reference model the policy's own, trained
                    text embeddings) or "reference" (the reference's own embeddings)
    """

    beta: float = 0.01
    num_iterations: int = 1
    eps_low: float = 0.2
    eps_high: float = 0.2
    aggregation: str = "group_token_mean"
    max_tokens: int | None = None
    cfg_logprobs: str = "none"
    cfg_uncond_grad: bool = False
    importance_sampling: str = "token"
    kl_bias_correction: bool = False
    text_weight: float = 1.0
    image_weight: float = 1.0
    ref_text_embeddings: str = "policy"
    # entropy term of the loss (trainer/entropy.py): none (T2I-R1), fixed, or adaptive per token kind (ReasonGen-R1)
    entropy_bonus: EntropyBonusConfig = field(default_factory=EntropyBonusConfig)

    def check(self, path):
        check_range(self, path, "beta", low=0.0)
        check_range(self, path, "num_iterations", low=1)
        check_range(self, path, "eps_low", low=0.0, high=1.0, high_open=True)
        check_range(self, path, "eps_high", low=0.0)
        check_choice(self, path, "aggregation", AGGREGATIONS)
        check_range(self, path, "max_tokens", low=1)
        check_choice(self, path, "cfg_logprobs", ("none", "cfg", "cfg_scaled"))
        check_choice(self, path, "importance_sampling", ("token", "sequence"))
        check_range(self, path, "text_weight", low=0.0)
        check_range(self, path, "image_weight", low=0.0)
        if self.text_weight == 0 and self.image_weight == 0:
            self.fail(path, "text_weight", "and image_weight are both 0: no token would count")
        check_choice(self, path, "ref_text_embeddings", ("policy", "reference"))


@dataclass
class OptimConfig(Settings):
    """AdamW with fp32 master weights and optimizer states (bf16 compute on GPU), linear decay to 0
    over the run, no warmup, gradient clipping at 1.0: the seed's HF Trainer + ZeRO-3 setup.
    ``micro_batch_prompts``: prompt groups per forward/backward (gradient accumulation over the
    step's groups; the seed runs one prompt x 8 images per GPU). Any value works: the loss is a sum of
    per-token weights normalised over the whole step, so uneven micro-batches give the same gradient.
    ``micro_batch_tokens``: 0 (off) or a cap on the tokens one forward packs (shared prefixes counted
    once, trainer/batch.py ``TrainBatch.split``): the groups of a micro-batch are cut into row-sized
    pieces, which bounds the update's activation memory whatever the CoT and image lengths; the loss
    and gradient are the same (a row longer than the cap runs alone).
    ``mini_batches``: optimizer steps per rollout (verl's ``ppo_mini_batch_size`` = prompts / this):
    the step's prompt groups are dealt into this many mini-batches (group g to mini-batch g mod k), each
    normalised on its own and followed by its own optimizer step; the mini-batches after the first are
    off-policy, their ratios taken against the policy that generated the rollout."""

    lr: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0 disables clipping
    master_dtype: str = "float32"
    micro_batch_prompts: int = 1
    micro_batch_tokens: int = 0
    mini_batches: int = 1

    def check(self, path):
        check_range(self, path, "lr", low=0.0)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            self.fail(path, "betas", f"must be two numbers in [0, 1), got {self.betas}")
        check_range(self, path, "eps", low=0.0, low_open=True)
        check_range(self, path, "weight_decay", low=0.0)
        check_choice(self, path, "schedule", ("linear", "constant", "cosine"))
        check_range(self, path, "warmup_steps", low=0)
        check_range(self, path, "max_grad_norm", low=0.0)
        check_choice(self, path, "master_dtype", ("float32", "float64"))
        check_range(self, path, "micro_batch_prompts", low=1)
        check_range(self, path, "micro_batch_tokens", low=0)
        check_range(self, path, "mini_batches", low=1)


@dataclass
class SFTConfig(Settings):
    """Supervised warm start (trainer/sft.py): ``steps`` > 0 with ``data`` makes ``fastbicot train``
    (and ``Trainer(config)``) fine-tune the policy on the examples first -- cached under
    ``cache_dir`` by a hash of the model, rollout layout, these settings and the data, so a second
    run skips it -- and start GRPO (and its reference model) from the result. ``fastbicot sft`` runs
    this stage alone. Loss weights per segment as ReasonGen-R1: text 2, image 1, BOI 0;
    ``cond_dropout``: the rate of examples whose image row loses prompt and CoT (CFG's branch)."""

    data: str | None = None
    steps: int = 0
    batch_size: int = 16
    lr: float = 1e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    text_weight: float = 2.0
    image_weight: float = 1.0
    cond_dropout: float = 0.1
    seed: int = 0
    cache_dir: str = "runs/sft_cache"
    trainable: list[str] | None = None  # fnmatch patterns for this stage; None: model.trainable
    # ReasonGen-R1's SFT recipe (docs/recipes/reasongen_r1.md): its own CoT instruction (None: rollout.instruction),
    # AdamW betas / weight decay (None: optim's), the loss divided by the token count instead of the weight sum,
    # and a dropped example (cond_dropout) that trains only its image (dropout_text: false)
    instruction: str | None = None
    betas: list[float] | None = None
    weight_decay: float | None = None
    normalize: str = "weight_sum"
    dropout_text: bool = True

    def check(self, path):
        check_range(self, path, "steps", low=0)
        check_range(self, path, "batch_size", low=1)
        check_choice(self, path, "normalize", ("weight_sum", "token_count"))
        if self.instruction is not None and "{prompt}" not in self.instruction:
            self.fail(path, "instruction", f"needs the placeholder {{prompt}}, got {self.instruction[:80]!r}")
        if self.betas is not None and (len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas)):
            self.fail(path, "betas", f"must be two numbers in [0, 1), got {self.betas}")
        check_range(self, path, "weight_decay", low=0.0)
        check_range(self, path, "lr", low=0.0)
        check_choice(self, path, "schedule", ("linear", "constant", "cosine"))
        check_range(self, path, "warmup_steps", low=0)
        check_range(self, path, "text_weight", low=0.0)
        check_range(self, path, "image_weight", low=0.0)
        check_range(self, path, "cond_dropout", low=0.0, high=1.0)
        if self.steps > 0 and not self.data:
            self.fail(path, "data", "is required when sft.steps > 0 (a JSONL of prompt, cot, image_tokens)")


@dataclass
class LoRAConfig(Settings):
    """LoRA adapters on the policy's language model (trainer/lora.py; needs the optional peft:
    ``pip install 'fastbicot[lora]'``). With ``enabled`` only the adapters train -- model.trainable /
    model.frozen then select nothing -- the optimizer holds only them, the KL reference is the same
    weights with the adapters disabled (no second copy), and checkpoints and the final output are
    the adapter in peft's format (``fastbicot merge`` writes a merged transformers checkpoint).

    r / alpha: rank and scale (the update is alpha / r * B A; B starts at 0, so step 1 is the base
    model). dropout: on the adapters' input while training. target_modules: Linear modules of the
    language model (model.language_model.*) that get adapters; a pattern matches a module's last
    name (``q_proj``, ``*_proj``) or, fnmatch, its full transformers name
    (``model.language_model.layers.1?.mlp.*``). Default: every attention and MLP projection.
    """

    enabled: bool = False
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def check(self, path):
        check_range(self, path, "r", low=1)
        check_range(self, path, "alpha", low=0.0, low_open=True)
        check_range(self, path, "dropout", low=0.0, high=1.0, high_open=True)
        if not self.target_modules:
            self.fail(path, "target_modules", f"is empty: name the modules to adapt (default {LORA_TARGETS})")


@dataclass
class CheckpointConfig(Settings):
    """Every ``every`` steps and at the end (0: only at the end); the last ``keep`` are kept."""

    every: int = 400  # the seed's save_steps
    keep: int = 2

    def check(self, path):
        check_range(self, path, "every", low=0)
        check_range(self, path, "keep", low=1)


@dataclass
class DistributedConfig(Settings):
    """Multi-process training under torchrun (fastbicot/trainer/distributed.py); ignored in a single
    process. FSDP2 shards each decoder layer and then the rest of the policy (and the reference)."""

    backend: str = "auto"  # "auto": nccl on CUDA, gloo on CPU
    timeout_s: float = 1800.0  # a collective waiting longer (a dead or stuck rank) stops every rank
    mixed_precision: str = "auto"  # "auto": bf16 compute + fp32 gradient reduction on CUDA; "none": fp32
    reshard_after_forward: bool = True  # ZeRO-3 (True) or ZeRO-2-like (False) for the decoder layers
    reference: str = "shard"  # "shard" | "cpu_offload": the reference's shards in host memory (CUDA runs)

    def check(self, path):
        check_choice(self, path, "backend", ("auto", "nccl", "gloo"))
        check_range(self, path, "timeout_s", low=1.0)
        check_choice(self, path, "mixed_precision", ("auto", "none"))
        check_choice(self, path, "reference", ("shard", "cpu_offload"))


@dataclass
class LogConfig(Settings):
    """metrics.jsonl every step; sample grids every ``grid_every`` steps (0: first and last only);
    TensorBoard / wandb when installed and enabled (wandb offline unless WANDB_MODE says else)."""

    grid_every: int = 50
    grid_samples: int = 8
    progress: bool = True
    entropy: bool = True
    tensorboard: bool = True
    wandb: bool = False

    def check(self, path):
        check_range(self, path, "grid_every", low=0)
        check_range(self, path, "grid_samples", low=1)


@dataclass
class TrainerConfig(Settings):
    """The whole run. ``steps`` rollouts (each followed by ``loss.num_iterations`` updates)."""

    output_dir: str = "runs/fastbicot"
    steps: int = 1600
    seed: int = 0
    threads: int = 0  # CPU runs: torch intra-op threads (0: torch's default); 1 suits tiny models
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def check(self, path):
        check_range(self, path, "steps", low=1)
        check_range(self, path, "threads", low=0)
        if not self.output_dir:
            self.fail(path, "output_dir", "is empty")
        if self.data.prompts_per_step % self.optim.mini_batches:
            self.fail(path, "optim.mini_batches", f"={self.optim.mini_batches} does not divide "
                      f"data.prompts_per_step={self.data.prompts_per_step} (each mini-batch holds whole groups)")

    @classmethod
    def from_yaml(cls, path, overrides=()) -> TrainerConfig:
        """Load ``path`` (YAML) and apply ``overrides`` ("section.key=value" strings or a dict of
        dotted keys). Errors name the file or the dotted key."""
        import yaml

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path!r}")
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason})") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
        data = apply_dotted(data, parse_overrides(overrides))
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=110)


def cli_overrides(args: list) -> list:
    """Command-line ``--a.b=v`` / ``--a.b v`` arguments -> ["a.b=v", ...]; anything else is an error."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise ConfigError(f"unexpected argument {arg!r} (overrides look like --section.key=value)")
        if "=" in arg:
            out.append(arg[2:])
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.append(f"{arg[2:]}={args[i + 1]}")
            i += 2
        else:
            raise ConfigError(f"override {arg} needs a value (--section.key=value)")
    return out


def parse_overrides(overrides) -> dict:
    """["a.b=1", "--c.d=x"] or {"a.b": 1} -> {"a.b": value} with values parsed as YAML."""
    import yaml

    if isinstance(overrides, dict):
        return dict(overrides)
    out = {}
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, _, raw = item.lstrip("-").partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({e})") from None
    return out


def apply_dotted(data: dict, dotted: dict) -> dict:
    """Apply {"a.b.c": v} onto nested ``data`` (a copy); missing sections are created, and the
    section classes reject unknown keys when the config is built."""
    import copy

    data = copy.deepcopy(data)
    for key, value in dotted.items():
        parts = key.split(".")
        node = data
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section (override {key})")
            node = nxt
        node[parts[-1]] = value
    return data


__all__ = [
    "AdvantageConfig", "CheckpointConfig", "ConfigError", "DataConfig", "DistributedConfig", "LoRAConfig", "LogConfig", "LossConfig",
    "ModelConfig", "OptimConfig", "RewardSpec", "RewardsConfig", "RolloutConfig", "SFTConfig", "SamplingParams",
    "TrainerConfig", "parse_overrides",
]
