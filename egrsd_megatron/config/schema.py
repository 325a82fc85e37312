"""Typed configuration schema: one dataclass per concern, composed into `ExperimentConfig`.

Every CHOSEN knob of ../docs/method.md is a field here with the documented default. YAML files in
`conf/` and `key=value` overrides are validated against these classes by `config.loader`.
Section-specific validation (value ranges) lives in `validate()` methods so it runs once, at load time,
before any work starts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Literal, Optional, Tuple, get_args, get_origin, get_type_hints

# The loss registry is the one list of loss names; it imports config only for type hints (no cycle).
from ..losses.registry import LossSpec, loss_spec
from ..rollout.footprint import DTYPES
from ..utils.errors import ConfigError


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


@functools.cache
def literal_choices(cls: type) -> Dict[str, Tuple[Any, ...]]:
    """{field: allowed values} for the `Literal[...]` fields of the dataclass `cls`."""
    hints = get_type_hints(cls)
    return {f.name: get_args(hints[f.name]) for f in fields(cls) if get_origin(hints[f.name]) is Literal}


def check_literals(obj: Any, prefix: str) -> None:
    """ConfigError naming `prefix.field` for a value outside its Literal type (the loader checks these while
    merging; this covers direct construction, e.g. GateConfig(kind="cosine"))."""
    for name, choices in literal_choices(type(obj)).items():
        value = getattr(obj, name)
        _check(value in choices, f"{prefix}.{name}", f"got {value!r}; expected one of {', '.join(map(str, choices))}")


def knob(default: Any, help: str) -> Any:
    """A config field with its one-line help (kept in the field's metadata, so tools and tests can read it)."""
    return field(default=default, metadata={"help": help})


def section(cls: type, help: str) -> Any:
    """A nested config section (a dataclass field built by `cls()`), with its one-line help."""
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class ModelConfig:
    # A preset name (qwen3_0.6b ... qwen3_32b, qwen3_tiny, llama_tiny) or "hf" (read `hf_path`/config.json).
    preset: str = "qwen3_tiny"
    hf_path: Optional[str] = None  # Hugging Face folder: config.json (+ weights when init_from=hf)
    init_from: str = "random"  # random | hf | megatron
    load: Optional[str] = None  # Megatron checkpoint folder when init_from=megatron
    params_dtype: str = "fp32"  # fp32 | bf16
    # precision of the transformer compute: fp32 | bf16 | fp8 (fp8 needs Transformer Engine + Hopper)
    precision: str = "fp32"
    fp8_format: str = "hybrid"  # hybrid | e4m3
    fp8_recipe: str = "delayed"  # delayed | tensorwise | blockwise
    recompute: str = "none"  # none | selective | full

    def validate(self) -> None:
        _check(
            self.init_from in ("random", "hf", "megatron"),
            "model.init_from",
            f"got {self.init_from!r}; expected one of random, hf, megatron",
        )
        _check(
            self.params_dtype in ("fp32", "bf16"),
            "model.params_dtype",
            f"got {self.params_dtype!r}; expected fp32 or bf16",
        )
        _check(
            self.precision in ("fp32", "bf16", "fp8"),
            "model.precision",
            f"got {self.precision!r}; expected fp32, bf16 or fp8",
        )
        _check(
            self.fp8_format in ("hybrid", "e4m3"),
            "model.fp8_format",
            f"got {self.fp8_format!r}; expected hybrid or e4m3",
        )
        _check(
            self.fp8_recipe in ("delayed", "tensorwise", "blockwise"),
            "model.fp8_recipe",
            f"got {self.fp8_recipe!r}; expected delayed, tensorwise or blockwise",
        )
        _check(
            self.recompute in ("none", "selective", "full"),
            "model.recompute",
            f"got {self.recompute!r}; expected none, selective or full",
        )
        _check(
            self.init_from != "megatron" or bool(self.load),
            "model.load",
            "init_from=megatron needs model.load=<checkpoint folder>",
        )
        _check(
            self.init_from != "hf" or bool(self.hf_path),
            "model.hf_path",
            "init_from=hf needs model.hf_path=<Hugging Face folder>",
        )


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel size
    pp: int = 1  # pipeline parallel size (data parallel = world / (tp * pp))
    micro_batch_size: int = 4  # sequences per micro-batch in the training forward/backward (padded path)
    distributed_optimizer: bool = False  # ZeRO-1: AdamW states sharded over the data-parallel group
    max_tokens_per_micro_batch: Optional[int] = knob(
        None,
        "sequence packing (docs/packing.md): pack whole sequences into micro-batches of at most this many tokens, "
        "balanced over DP ranks (micro_batch_size is then unused); >= the longest prompt + response; 0/null: off",
    )

    def validate(self) -> None:
        for k in ("tp", "pp", "micro_batch_size"):
            _check(getattr(self, k) >= 1, f"parallel.{k}", f"must be >= 1, got {getattr(self, k)}")
        budget = self.max_tokens_per_micro_batch
        _check(
            budget is None or budget >= 0,
            "parallel.max_tokens_per_micro_batch",
            f"must be >= 1 (or 0/null: no packing), got {budget}",
        )

    @property
    def packing(self) -> bool:
        """Whether the trainer packs sequences into token-budget micro-batches."""
        return bool(self.max_tokens_per_micro_batch)


@dataclass
class TokenizerConfig:
    # "qwen3" builds the exact Qwen3 tokenizer offline; otherwise a Hugging Face tokenizer folder.
    # None: use model.hf_path's tokenizer.
    path: Optional[str] = None


@dataclass
class DataConfig:
    train_path: Optional[str] = None  # jsonl | parquet | datasets folder (load_from_disk)
    eval_path: Optional[str] = None
    problem_field: str = "problem"
    solution_field: str = "solution"  # the privileged context the teacher sees
    answer_field: str = "answer"
    max_prompt_tokens: int = 1024
    on_overlong: str = "skip"  # skip (and count) | fail
    shuffle: bool = True
    seed: int = 1234

    def validate(self) -> None:
        _check(
            self.on_overlong in ("skip", "fail"), "data.on_overlong", f"got {self.on_overlong!r}; expected skip or fail"
        )
        _check(self.max_prompt_tokens >= 1, "data.max_prompt_tokens", "must be >= 1")


@dataclass
class PromptConfig:
    thinking: bool = True  # Qwen3 thinking mode on/off in the chat template
    chat_format: str = "qwen3"  # qwen3 | tokenizer (use the tokenizer's own chat template)
    system: Optional[str] = None
    student_template: str = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
    teacher_template: str = (
        "{problem}\n\nHere is a reference solution:\n{solution}\n\n"
        "After understanding the reference solution, please try to solve this problem using your own "
        "approach below. Please reason step by step, and put your final answer within \\boxed{{}}."
    )

    def validate(self) -> None:
        _check(
            self.chat_format in ("qwen3", "tokenizer"),
            "prompt.chat_format",
            f"got {self.chat_format!r}; expected qwen3 or tokenizer",
        )
        _check("{problem}" in self.student_template, "prompt.student_template", "must contain {problem}")
        _check(
            "{problem}" in self.teacher_template and "{solution}" in self.teacher_template,
            "prompt.teacher_template",
            "must contain {problem} and {solution}",
        )


@dataclass
class RewardConfig:
    name: str = "math"  # a registered reward: math | final_number | ...
    timeout_s: float = 5.0  # per-call bound, enforced from any thread or process
    num_workers: int = 0  # 0: all cores
    # Reward of a rollout cut at rollout.max_new_tokens (no stop token), overriding the verifier; None:
    # score its text like any other (DAPO-style overlong punishment when set, e.g. 0.0).
    truncated_reward: Optional[float] = None


@dataclass
class RolloutConfig:
    engine: str = "hf"  # hf | vllm
    group_size: int = 8  # G rollouts per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 256
    # Strings, each encoded alone to a token sequence: a row stops when its ids end with one; the sequence
    # stays in the response (and in the loss mask), like a stop token.
    stop: List[str] = field(default_factory=list)
    # Mean |engine - trainer| log-prob of the sampled tokens above which a step warns; at the first step of a
    # run it aborts (a stale refit, a wrong temperature or a low-precision engine: docs/method.md).
    max_logprob_diff: float = 0.05
    max_batch: int = 16  # hf engine: rows per generation sub-batch (bounds memory)
    # hf engine's weights and KV cache; None: float32 on CPU, bfloat16 on a GPU (rollout/footprint.py, which
    # the planner reads too)
    hf_dtype: Optional[str] = None
    # vllm engine only (rollout/vllm_engine.py); None: the engine's default for the device.
    gpu_memory_utilization: float = 0.3  # vLLM's share of GPU memory (weights + KV cache); `egrsd plan` counts it
    vllm_dtype: Optional[str] = None  # bfloat16 on GPU, float32 on CPU
    # vLLM tensor parallel size: a vLLM TP group is vllm_tp consecutive ranks generating the same rows; it
    # must divide parallel.tp, so the group lies inside one trainer TP group (one node). > 1: GPU-only.
    vllm_tp: int = 1
    # vLLM sleep mode (GPU-only): the engine releases its memory while the trainer runs (level 1: weights
    # offloaded to host memory, KV cache discarded; level 2: both discarded, the refit restores the weights)
    # and wakes for the refit and generation. vLLM's CPU backend has none: the engine refuses it there.
    vllm_sleep: bool = False
    vllm_sleep_level: int = 1
    vllm_kv_cache_gb: Optional[float] = None  # fixed KV cache size (CPU default 1 GiB)
    vllm_enforce_eager: Optional[bool] = None  # no CUDA graphs / torch.compile (CPU default True)
    vllm_max_model_len: Optional[int] = None

    def validate(self) -> None:
        _check(self.engine in ("hf", "vllm"), "rollout.engine", f"got {self.engine!r}; expected hf or vllm")
        _check(self.group_size >= 1, "rollout.group_size", "must be >= 1")
        _check(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        _check(self.temperature >= 0, "rollout.temperature", "must be >= 0")
        _check(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        _check(self.max_logprob_diff > 0, "rollout.max_logprob_diff", f"must be > 0, got {self.max_logprob_diff}")
        _check(0 < self.gpu_memory_utilization < 1, "rollout.gpu_memory_utilization", "must be in (0, 1)")
        for key in ("hf_dtype", "vllm_dtype"):
            value = getattr(self, key)
            _check(
                value is None or value in DTYPES,
                f"rollout.{key}",
                f"got {value!r}; expected one of {', '.join(DTYPES)} (or unset: the device's default)",
            )
        _check(self.vllm_tp >= 1, "rollout.vllm_tp", f"must be >= 1, got {self.vllm_tp}")
        _check(
            self.vllm_sleep_level in (1, 2), "rollout.vllm_sleep_level", f"got {self.vllm_sleep_level}; expected 1 or 2"
        )


@dataclass
class RatioConfig:
    """Ratio magnitude rho~ = (1 - lam) + lam clip(exp(sign(A) (lT - lS)), 1 - eps_w, 1 + eps_w)  (method.md 2)."""

    eps_w: float = knob(0.2, "clip half-width of the ratio weight, in [0, 1): the weight stays >= 1 - eps_w > 0")
    lam: float = knob(1.0, "mix of the clipped ratio with 1, in [0, 1] (0: no ratio; RLSD's own code: 0.5)")
    lam_end: Optional[float] = knob(
        None,
        "lam at step lam_steps of a linear schedule from lam (None: constant "
        "lam; RLSD's reference script: lam=0.5, lam_end=0, lam_steps=50)",
    )
    lam_steps: int = knob(0, "optimizer steps over which lam moves linearly to lam_end (then stays), >= 1 with lam_end")

    def validate(self, prefix: str = "loss.ratio") -> None:
        # eps_w < 1 keeps the ratio weight's floor 1 - eps_w > 0: the FIXED nonzero lower bound on weights.
        _check(0.0 <= self.eps_w < 1.0, f"{prefix}.eps_w", f"must be in [0, 1), got {self.eps_w}")
        _check(0.0 <= self.lam <= 1.0, f"{prefix}.lam", f"must be in [0, 1], got {self.lam}")
        if self.lam_end is not None:
            _check(0.0 <= self.lam_end <= 1.0, f"{prefix}.lam_end", f"must be in [0, 1], got {self.lam_end}")
            _check(
                self.lam_steps >= 1,
                f"{prefix}.lam_steps",
                f"must be >= 1 when {prefix}.lam_end is set, got {self.lam_steps}",
            )

    def lam_at(self, step: int) -> float:
        """lam at 0-based optimizer step `step`: linear from lam to lam_end over lam_steps, then lam_end."""
        if self.lam_end is None:
            return self.lam
        frac = min(step / self.lam_steps, 1.0)
        return self.lam + (self.lam_end - self.lam) * frac


@dataclass
class GateConfig:
    """Teacher-entropy gate g = g_min + (1 - g_min) phi(H)  (method.md 3)."""

    kind: Literal["exp", "linear"] = knob("exp", "phi(H) = exp(-H / tau) (exp) or clamp(1 - H / H_ref, 0, 1) (linear)")
    g_min: float = knob(0.2, "the gate's floor, in (0, 1): no token weight is ever gated to zero")
    tau: float = knob(1.0, "temperature of the exp gate in nats, > 0 (inf: the gate is 1 everywhere)")
    h_ref: str = knob("log_vocab", "H_ref of the linear gate: log_vocab (log |V|) or quantile:<q>, q in (0, 1]")
    entropy_at: Literal["sampling", "one"] = knob(
        "sampling",
        "the teacher entropy H the gate reads: of softmax(z / rollout.temperature) (sampling, CHOSEN) "
        "or of softmax(z) (one: H_ref and tau on the untempered scale)",
    )

    def validate(self, prefix: str = "loss.gate") -> None:
        _check(0.0 < self.g_min < 1.0, f"{prefix}.g_min", f"must be in (0, 1), got {self.g_min}")
        _check(self.tau > 0, f"{prefix}.tau", f"must be > 0, got {self.tau}")
        ok_ref = self.h_ref == "log_vocab"
        if self.h_ref.startswith("quantile:"):
            try:
                q = float(self.h_ref.split(":", 1)[1])
                ok_ref = 0.0 < q <= 1.0
            except ValueError:
                ok_ref = False
        _check(ok_ref, f"{prefix}.h_ref", f"got {self.h_ref!r}; expected log_vocab or quantile:<q> with q in (0, 1]")


@dataclass
class LookaheadConfig:
    """CL-EGRSD causal lookahead F_t = stat of H over the next `window` positions  (method.md 4)."""

    window: int = knob(8, "k: how many following positions of the same response F_t reads, >= 1")
    stat: Literal["mean", "max"] = knob("mean", "F_t = the mean or the max of those entropies")

    def validate(self, prefix: str = "loss.lookahead") -> None:
        _check(self.window >= 1, f"{prefix}.window", f"must be >= 1, got {self.window}")


@dataclass
class ClipConfig:
    """PPO-style clip of the policy ratio r in the surrogate, [1 - eps_lo, 1 + eps_hi]  (method.md 6)."""

    eps_lo: float = knob(0.2, "lower clip: r >= 1 - eps_lo, >= 0")
    eps_hi: float = knob(0.28, "upper clip: r <= 1 + eps_hi, >= 0 (DAPO-style clip-higher)")

    def validate(self, prefix: str = "loss.clip") -> None:
        _check(self.eps_lo >= 0, f"{prefix}.eps_lo", f"must be >= 0, got {self.eps_lo}")
        _check(self.eps_hi >= 0, f"{prefix}.eps_hi", f"must be >= 0, got {self.eps_hi}")


@dataclass
class OpsdConfig:
    """OPSD's per-token signal (loss.name=opsd only)  (method.md 7)."""

    signal: Literal["sampled", "reverse_kl", "jsd"] = knob(
        "sampled", "sampled: Ahat = lT - lS; reverse_kl: KL(pS||pT); jsd: JSD_beta over the full vocabulary"
    )
    beta: float = knob(0.5, "teacher weight of JSD_beta, in (0, 1)")

    def validate(self, prefix: str = "loss.opsd") -> None:
        _check(0.0 < self.beta < 1.0, f"{prefix}.beta", f"must be in (0, 1), got {self.beta}")


@dataclass
class LossConfig:
    """EGRSD family knobs (docs/method.md), one section per part of the loss; defaults are the CHOSEN values.

    A section is read only by the losses that use that part (`losses/registry.py:LossSpec`)."""

    name: str = knob("cl_egrsd", "which loss of the family: a name in losses/registry.py:FAMILY")
    ratio: RatioConfig = section(RatioConfig, "teacher/student likelihood-ratio magnitude (specs with ratio)")
    gate: GateConfig = section(GateConfig, "teacher-entropy confidence gate (losses whose spec has gate)")
    lookahead: LookaheadConfig = section(LookaheadConfig, "causal lookahead of the gate's entropy (spec.lookahead)")
    clip: ClipConfig = section(ClipConfig, "PPO-style clip of the policy ratio (every clipped surrogate)")
    opsd: OpsdConfig = section(OpsdConfig, "OPSD's per-token signal (loss.name=opsd)")
    aggregation: Literal["token_mean", "seq_mean_token_mean"] = knob(
        "token_mean", "normalizer of the loss: global token count or global count of non-empty sequences"
    )
    normalize_std: bool = knob(True, "the group advantage divides by the group's reward std")
    kl_coef: float = knob(0.0, "weight of the optional k3 KL to the initial policy, >= 0 (0: off)")

    def validate(self) -> None:
        loss_spec(self.name)  # an unknown name raises ConfigError listing the registry's names
        for f in fields(self):
            sec = getattr(self, f.name)
            if hasattr(sec, "validate"):  # a section: ratio, gate, lookahead, clip, opsd
                check_literals(sec, f"loss.{f.name}")
                sec.validate(f"loss.{f.name}")
        check_literals(self, "loss")
        _check(self.kl_coef >= 0, "loss.kl_coef", f"must be >= 0, got {self.kl_coef}")

    @property
    def spec(self) -> LossSpec:
        """Everything that depends on `name` (uses reward, teacher inputs, factors): the registry's entry."""
        return loss_spec(self.name)

    def __post_init__(self) -> None:
        # Direct construction (LossConfig(name=...)) validates too; the loader validates again after merge.
        self.validate()


@dataclass
class TeacherConfig:
    mode: str = "frozen"  # frozen | live | sync
    sync_every: int = 10  # steps between copies in sync mode
    # A loss that reads no teacher input (grpo) runs no teacher pass. True: run it anyway, only to log the
    # teacher-entropy metrics (teacher_entropy_mean / _p90, spike_count); the loss does not change.
    log_entropy: bool = False

    def validate(self) -> None:
        _check(
            self.mode in ("frozen", "live", "sync"), "teacher.mode", f"got {self.mode!r}; expected frozen, live or sync"
        )
        _check(self.sync_every >= 1, "teacher.sync_every", "must be >= 1")


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad: float = 1.0  # global grad-norm clip (0: off)


@dataclass
class TrainConfig:
    steps: int = 100
    prompts_per_step: int = 8  # prompts per step (x group_size rollouts), across data-parallel ranks
    ppo_epochs: int = 1  # optimizer passes over each rollout batch
    seed: int = 1234
    out_dir: str = "runs/default"
    save_every: int = 50
    keep_last: int = 2
    resume: str = "auto"  # auto | none | <checkpoint folder>
    # Training checkpoint layout (checkpoint/train_state.py): torch = Megatron-LM's per-rank files (one
    # process can read them; resume at the same TP/PP); torch_dist = Megatron-Core dist_checkpointing
    # (sharded; resumes at another TP/PP/DP, model and Adam states resharded). Resume reads either.
    ckpt_format: Literal["torch", "torch_dist"] = "torch"
    log_every: int = 1
    sample_every: int = 10  # write sampled rollouts to jsonl every N steps (0: never)
    eval_every: int = 0  # validation on data.eval_path every N steps (0: never)
    eval_samples: int = 32
    max_nonfinite_in_row: int = 3
    # Asynchronous checkpoint save (torch_dist only; checkpoint/async_save.py): the save call returns once the
    # state is staged, the write goes on in a forked process; the next save and the end of the run wait for it.
    async_save: bool = False

    def validate(self) -> None:
        _check(self.steps >= 0, "train.steps", "must be >= 0")
        _check(self.prompts_per_step >= 1, "train.prompts_per_step", "must be >= 1")
        _check(self.keep_last >= 1, "train.keep_last", "must be >= 1")
        _check(self.save_every >= 0, "train.save_every", "must be >= 0")
        check_literals(self, "train")
        _check(
            not self.async_save or self.ckpt_format == "torch_dist",
            "train.async_save",
            f"true needs train.ckpt_format=torch_dist (got {self.ckpt_format!r}: the torch format is written "
            "synchronously); set train.ckpt_format=torch_dist or train.async_save=false",
        )


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb_project: Optional[str] = None  # W&B when set (needs the `wandb` extra)
    wandb_run: Optional[str] = None


@dataclass
class EvalConfig:
    benchmarks: List[str] = field(default_factory=list)
    k: int = 1
    temperature: float = 0.6  # Qwen3 thinking-mode sampling (method.md)
    top_p: float = 0.95
    top_k: int = 20
    max_new_tokens: int = 1024
    batch_size: int = 16


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        for name in self.__dataclass_fields__:
            section = getattr(self, name)
            if hasattr(section, "validate"):
                section.validate()
        # A batch quantile of the gate is taken over each micro-batch's tokens, so it would depend on how the
        # sequences are packed; packing promises a loss independent of the assignment.
        _check(
            not (
                self.parallel.packing
                and self.loss.spec.gate
                and self.loss.gate.kind == "linear"
                and self.loss.gate.h_ref.startswith("quantile")
            ),
            "parallel.max_tokens_per_micro_batch",
            f"packing is not supported with loss.gate.h_ref={self.loss.gate.h_ref} (a per-micro-batch quantile "
            f"would depend on the packing): use loss.gate.h_ref=log_vocab, loss.gate.kind=exp, or no packing",
        )
        if self.rollout.engine == "vllm" and self.parallel.tp % self.rollout.vllm_tp:
            # vLLM's TP groups are blocks of vllm_tp consecutive ranks; Megatron's TP ranks are consecutive, so
            # a block inside one trainer TP group generates for one model-parallel group (trainer/rollouts.py).
            raise ConfigError(
                f"config key 'rollout.vllm_tp': {self.rollout.vllm_tp} must divide parallel.tp={self.parallel.tp} "
                f"(a vLLM tensor-parallel group must lie inside one trainer tensor-parallel group, one node)"
            )
        if self.loss.spec.uses_reward:
            _check(
                self.rollout.group_size >= 2,
                "rollout.group_size",
                f"loss.name={self.loss.name} uses group-relative advantages and needs >= 2 rollouts "
                f"per prompt, got {self.rollout.group_size}",
            )
