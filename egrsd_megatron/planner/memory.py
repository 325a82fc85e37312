"""Per-GPU memory estimate of one EGRSD training step on the worst pipeline stage.

All numbers are bytes on ONE GPU. Notation: P_s = parameters held by the stage's GPU (TP-sharded matrices
/ TP + replicated norms; the embedding on the first stage, the output layer + final norm on the last; with
tied embeddings and PP > 1 the last stage keeps its own copy, as Megatron does), t = TP, V = vocabulary
padded to a multiple of 128 x t, S = sequence length (prompt + response), R = response length,
b = micro-batch size, n_mb = micro-batches per step per DP rank, L_s = layers per stage.

A micro-batch (`MicroBatchShape`) is Megatron's [b, s] input and the [n, R] response layout gathered from it:
  padded (parallel.micro_batch_size): b rows of s = S tokens, n = b sequences, n_mb = rollouts / b;
  packed (parallel.max_tokens_per_micro_batch = T, docs/packing.md): ONE row (b = 1) of at most s = T tokens,
    the sequences concatenated (THD), every pack its own length, so T bounds the positions of a forward;
    n = min(rollouts, floor(T / S)) sequences of the planned length S (shorter sequences pack more of them:
    the [n, R] response terms grow with n, the activation and logits terms stay bounded by T),
    n_mb = ceil(rollouts / n).
Below, "b x S" is the positions of one forward, b x s (= T packed), and "b x R" the response slots n x R.

static (resident the whole step):
  weights        P_s x 2 (bf16 params) or x 4 (fp32 params)
  fp8 copies     P_s x 2 when precision=fp8 (Transformer Engine caches an FP8 weight and its transpose)
  gradients      P_s x 4: fp32 `main_grad` accumulators for bf16 params (distributed/grads.py; each bf16
                 `.grad` is folded in and freed right after it is produced), or fp32 `.grad
  optimizer      P_s x 12 (fp32 master + Adam m + v) for bf16 params, P_s x 8 (m, v) for fp32 params;
                 / DP with the distributed optimizer
  teacher copy   P_s x 2 (bf16) when teacher.mode is frozen or sync and a teacher pass runs (a live teacher
                 IS the student; grpo runs none): losses.weight_copies
  reference copy P_s x 2 (bf16) when loss.kl_coef > 0 and there is no frozen teacher copy (one already
                 holds the initial weights, which are the reference)
  rollout engine weights
                 hf: the whole model unsharded, N_params x HF_WEIGHT_COPIES x bytes(engine dtype) = 1 x 2
                 (rollout.hf_dtype, unset: bf16 on a GPU, as rollout/hf_engine.py builds it; the refit streams
                 one tensor at a time); vllm without sleep mode: N_params x bytes(rollout.vllm_dtype, unset:
                 bf16) / rollout.vllm_tp. All from rollout/footprint.py.
  rollout engine KV cache
                 vllm without sleep mode: the rest of its pre-allocated share, rollout_gpu_fraction x GPU
                 memory - its weights (vLLM sizes its KV cache to fill the share)
  overhead       CUDA context, NCCL buffers, allocator fragmentation (a flat allowance)
training transient (during the student pass):
  activations    per layer and token, bf16, with flash attention (no S x S scores):
                   recompute none / selective: 2 x (4h + 3 (q + kv + ffn) / t)
                     = the two RMSNorm inputs and the two GEMM inputs they feed (4h, replicated over TP
                       without sequence parallelism), the q/k-norm inputs (q + kv), the attention inputs
                       Q, K, V (q + 2kv) and output (q), the SwiGLU input (2 ffn) and output (ffn);
                   without flash attention add the softmax probabilities 2 x (heads / t) x S, which
                   selective recompute drops (it recomputes core attention);
                   full recompute: 2h per layer (the checkpointed layer input) + one layer's activations.
                 x b x S x L_s x in-flight micro-batches (1F1B: PP on the first stage, 1 on the last).
  logits         last stage: the student's output logits for one micro-batch and their gradient,
                 2 x b x S x V/t x 4 (fp32); the teacher's output as the trainer keeps it: one micro-batch's
                 response logits b x R x V/t x 2 (bf16; x 4 for fp32 compute) with PP=1 and one PPO epoch,
                 else for every micro-batch either its per-token log-prob + entropy (n_mb x b x R x 8) or,
                 for OPSD's reverse_kl/jsd signals, its logits (n_mb x b x R x V/t x 2); the token_stats working set,
                 4 fp32 [chunk, V/t] buffers (both sides' upcast chunk and their exponentials).
rollout transient (during generation; never at the same time as the student pass):
  rollout engine KV cache
                 hf: rows x S x L x 2 (K and V) x kv x bytes(engine dtype) (the cache has the model's dtype),
                 rows = min(rollout.max_batch, rollouts this GPU generates = rollouts per DP rank / (TP x PP))
  rollout engine weights + KV cache
                 vllm WITH sleep mode (rollout.vllm_sleep): the two vllm terms above move here: asleep
                 while the trainer runs, the engine holds none of its share (level 1 offloads the weights to
                 host memory, level 2 discards them), so they are not added to the training phase.
peak = static + max(training transient, rollout transient) = max(training phase, generation phase).
GPU-only, unverified: how much of its share a sleeping vLLM really gives back (CUDA graph pools and its
allocator context stay; counted inside the flat overhead); bench/gpu_check.py measures it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..config.schema import ConfigError, ExperimentConfig
from ..losses.registry import divergence_kind, teacher_pass_needed, weight_copies
from ..models.arch import ModelArch
from ..rollout.footprint import (
    engine_dtype_name,
    engine_weight_bytes,
    engine_weight_dtype,
    releases_memory_while_training,
)
from .layout import Layout, make_layout

GB = 1e9  # decimal GB, as GPU memory is sold ("80 GB" H100)


@dataclass(frozen=True)
class PlanSettings:
    gpu_mem_gb: float = 80.0  # per-GPU budget (H100 / H800 SXM: 80 GB)
    seq_len: Optional[int] = None  # prompt + response; None: data.max_prompt_tokens + rollout.max_new_tokens
    stats_chunk: int = 1024  # token_stats chunk (tokens per fp32 upcast)
    flash_attention: bool = True  # TE / flash attention on GPUs: no S x S score matrix
    rollout_gpu_fraction: float = 0.3  # vllm engine: its pre-allocated share of GPU memory
    overhead_gb: float = 4.0


@dataclass(frozen=True)
class MicroBatchShape:
    """One micro-batch of the student pass (see the module docstring): Megatron's [rows, tokens / rows] input,
    the sequences of its [n, R] response layout, and how many micro-batches a DP rank runs."""

    packed: bool
    rows: int  # Megatron's micro_batch_size b (1 when packed)
    tokens: int  # positions of one forward, b x s: what activations and logits scale with
    sequences: int  # n: rows of the gathered [n, R] response logits
    count: int  # micro-batches per DP rank and step

    def describe(self) -> str:
        if self.packed:
            return (
                f"packed: 1 row of <= {self.tokens:,} tokens (parallel.max_tokens_per_micro_batch), "
                f"{self.sequences} sequence(s) of the planned length each, {self.count} micro-batch(es) per DP rank"
            )
        return (
            f"padded: {self.rows} row(s) x {self.tokens // self.rows:,} tokens (parallel.micro_batch_size), "
            f"{self.count} micro-batch(es) per DP rank"
        )


@dataclass
class Plan:
    layout: Layout
    arch: ModelArch
    seq_len: int
    response_len: int
    stage: str  # which pipeline stage is the worst (its terms are reported)
    params_per_gpu: int
    static: Dict[str, float] = field(default_factory=dict)
    train_transient: Dict[str, float] = field(default_factory=dict)
    rollout_transient: Dict[str, float] = field(default_factory=dict)
    budget: float = 80e9
    tokens_per_step: int = 0  # sequences x padded length, over all DP ranks
    response_tokens_per_step: int = 0
    notes: List[str] = field(default_factory=list)  # how the rollout engine was counted (printed, in the JSON)
    micro_batch: Optional[MicroBatchShape] = None  # what one micro-batch holds

    @property
    def training_phase(self) -> float:
        return sum(self.static.values()) + sum(self.train_transient.values())

    @property
    def generation_phase(self) -> float:
        return sum(self.static.values()) + sum(self.rollout_transient.values())

    @property
    def total(self) -> float:
        return sum(self.static.values()) + max(sum(self.train_transient.values()), sum(self.rollout_transient.values()))

    @property
    def fits(self) -> bool:
        return self.total <= self.budget


def micro_batch_shape(cfg: ExperimentConfig, lay: Layout, seq_len: int) -> MicroBatchShape:
    """The micro-batch of `cfg` for sequences of `seq_len` tokens; packed, a ConfigError when one sequence
    does not fit the token budget (the trainer refuses it at its first step: data/balance.py)."""
    rollouts = lay.rollouts_per_dp_rank
    if not cfg.parallel.packing:
        b = lay.micro_batch_size
        return MicroBatchShape(False, b, b * seq_len, b, lay.num_microbatches)
    budget = cfg.parallel.max_tokens_per_micro_batch
    if budget < seq_len:
        raise ConfigError(
            f"config key 'parallel.max_tokens_per_micro_batch': {budget} tokens cannot hold one sequence of "
            f"{seq_len} (data.max_prompt_tokens + rollout.max_new_tokens, or --seq-len): raise it to at least {seq_len}"
        )
    n = min(rollouts, budget // seq_len)
    return MicroBatchShape(True, 1, budget, n, math.ceil(rollouts / n))


def layer_params(arch: ModelArch, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank (matrices / TP, norms replicated). Heads and KV
    groups as Megatron holds them at this TP: zero groups appended when TP does not divide them."""
    h = arch.hidden_size
    q, kv = arch.megatron_heads(tp) * arch.head_dim, arch.megatron_groups(tp) * arch.head_dim
    sharded = h * (q + 2 * kv) + q * h + 3 * h * arch.ffn_hidden_size
    replicated = 2 * h + (2 * arch.head_dim if arch.qk_norm else 0)
    return sharded // tp + replicated


def stage_params(arch: ModelArch, tp: int, pp: int, stage: int) -> int:
    """Parameters on one GPU of pipeline stage `stage` (0-based)."""
    n = arch.num_layers // pp * layer_params(arch, tp)
    emb = arch.padded_vocab_size(tp) * arch.hidden_size // tp
    if stage == 0:
        n += emb
    if stage == pp - 1:
        # Output layer (its own, or the tied embedding's copy on the last stage when PP > 1) + final norm.
        if not arch.tie_word_embeddings or pp > 1:
            n += emb
        n += arch.hidden_size
    return n


def activation_bytes_per_token_layer(
    arch: ModelArch, tp: int, seq_len: int, recompute: str, flash_attention: bool
) -> float:
    """Bytes of saved activations per token per layer (see the module docstring)."""
    h, q, kv = arch.hidden_size, arch.num_attention_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    full_layer = 2 * (4 * h + 3 * (q + kv + arch.ffn_hidden_size) / tp)
    scores = 0.0 if flash_attention else 2 * arch.num_attention_heads / tp * seq_len
    if recompute == "none":
        return full_layer + scores
    if recompute == "selective":
        return full_layer
    if recompute == "full":
        return 2 * h
    raise ConfigError(f"config key 'model.recompute': got {recompute!r}; expected none, selective or full")


def _bytes_per(dtype: str) -> int:
    return 2 if dtype == "bf16" else 4


def plan(
    cfg: ExperimentConfig, arch: ModelArch, nodes: int, gpus_per_node: int, settings: PlanSettings = PlanSettings()
) -> Plan:
    """The layout and per-GPU memory of `cfg` on nodes x gpus_per_node; ConfigError when a size does not divide."""
    lay = make_layout(cfg, arch, nodes, gpus_per_node)
    R = cfg.rollout.max_new_tokens
    S = settings.seq_len if settings.seq_len is not None else cfg.data.max_prompt_tokens + R
    if S <= R:
        raise ConfigError(f"--seq-len={S} must exceed rollout.max_new_tokens={R} (it is prompt + response)")
    if S > arch.max_position_embeddings:
        raise ConfigError(
            f"sequence length {S} exceeds the model's max_position_embeddings="
            f"{arch.max_position_embeddings}: lower data.max_prompt_tokens / rollout.max_new_tokens"
        )
    tp, pp, dp = lay.tp, lay.pp, lay.dp
    mb = micro_batch_shape(cfg, lay, S)
    V = arch.padded_vocab_size(tp)
    # FP8 runs force bf16 params (models/precision.py); otherwise model.params_dtype decides.
    wbytes = 2 if cfg.model.precision == "fp8" else _bytes_per(cfg.model.params_dtype)
    compute_bytes = 4 if cfg.model.precision == "fp32" else 2
    act_tok_layer = activation_bytes_per_token_layer(arch, tp, S, cfg.model.recompute, settings.flash_attention)
    L_s = arch.num_layers // pp
    ro = cfg.rollout
    engine_bytes = engine_weight_dtype(ro, device="cuda").itemsize  # the engine's dtype on a GPU (footprint.py)
    engine_weights = engine_weight_bytes(ro, arch.num_params(), device="cuda")
    engine_static: Dict[str, float] = {}  # held the whole step
    engine_rollout: Dict[str, float] = {}  # held only while generating
    if ro.engine == "hf":
        engine_static["rollout engine weights"] = engine_weights
        rows = min(ro.max_batch, math.ceil(lay.rollouts_per_dp_rank / (tp * pp)))
        engine_rollout["rollout engine KV cache"] = float(
            rows * S * arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * engine_bytes
        )
        notes = [
            f"rollout engine: hf, {engine_dtype_name(ro)} weights unsharded on every GPU (held the whole step), "
            f"KV cache for {rows} rows while generating"
        ]
    else:
        share = settings.rollout_gpu_fraction * settings.gpu_mem_gb * GB
        if engine_weights >= share:
            raise ConfigError(
                f"config key 'rollout.gpu_memory_utilization': vLLM's share {share / GB:.1f} GB "
                f"({settings.rollout_gpu_fraction} x {settings.gpu_mem_gb:g} GB) cannot hold its weights "
                f"{engine_weights / GB:.1f} GB ({engine_dtype_name(ro)} / rollout.vllm_tp={ro.vllm_tp}) and a KV "
                f"cache: raise it or rollout.vllm_tp"
            )
        terms = {"rollout engine weights": engine_weights, "rollout engine KV cache": share - engine_weights}
        # What the rows it generates at once need (the KV heads sharded over vllm_tp): vLLM runs fewer rows
        # at a time when its cache is smaller, so this is a speed hint, not a memory term.
        rows = math.ceil(lay.rollouts_per_dp_rank / (tp * pp)) * ro.vllm_tp
        need = rows * S * arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * engine_bytes / ro.vllm_tp
        sleeps = releases_memory_while_training(ro)
        (engine_rollout if sleeps else engine_static).update(terms)
        notes = [
            f"rollout engine: vllm, {engine_dtype_name(ro)} weights / vllm_tp={ro.vllm_tp}, its share "
            f"{settings.rollout_gpu_fraction} x {settings.gpu_mem_gb:g} GB = weights + KV cache; its {rows} rows "
            f"of {S} tokens need {need / GB:.2f} GB of KV cache at once"
            + ("" if need <= terms["rollout engine KV cache"] else " (more than it has: vLLM queues rows)"),
            (
                f"vllm sleep mode (level {ro.vllm_sleep_level}): the engine's share is released while the trainer "
                f"runs, so peak = max(training phase, generation phase), not their sum (GPU-only, unverified: "
                f"what vLLM keeps while asleep, CUDA graph pools, is inside the overhead allowance)"
                if sleeps
                else "no vllm sleep mode: the engine's share is held the whole step (static); "
                "rollout.vllm_sleep=true releases it while the trainer runs"
            ),
        ]

    teacher_copy, reference_copy = weight_copies(cfg.loss, cfg.teacher.mode, cfg.teacher.log_entropy)
    if mb.packed:
        notes.append(
            f"packed micro-batches: activations and logits counted for the budget's {mb.tokens:,} positions "
            f"(one pack per forward, at any PP size); the response terms for {mb.sequences} sequence(s) of {S} "
            f"tokens per pack (shorter sequences put more rows of R = {R} slots in one pack)"
        )
    best: Optional[Plan] = None
    for stage in sorted({0, pp - 1}):
        P = stage_params(arch, tp, pp, stage)
        static = {
            "weights": P * wbytes,
            "fp8 weight copies": P * 2.0 if cfg.model.precision == "fp8" else 0.0,
            "gradients (fp32)": P * 4.0,
            "optimizer states": P * (12.0 if wbytes == 2 else 8.0) / (dp if cfg.parallel.distributed_optimizer else 1),
            "teacher copy": P * 2.0 if teacher_copy else 0.0,
            "reference copy": P * 2.0 if reference_copy else 0.0,
            **engine_static,
            "overhead": settings.overhead_gb * GB,
        }
        inflight = min(pp - stage, mb.count)  # 1F1B warm-up depth of this stage
        act = inflight * mb.tokens * L_s * act_tok_layer
        if cfg.model.recompute == "full":
            act += mb.tokens * activation_bytes_per_token_layer(arch, tp, S, "none", settings.flash_attention)
        train = {"activations": act}
        if stage == pp - 1:
            train["student logits + grad (fp32)"] = 2.0 * mb.tokens * V / tp * 4
            # What trainer/loop.py keeps of the teacher: one micro-batch's response logits when each teacher
            # pass runs right before its student pass (PP=1, one PPO epoch); else every micro-batch's
            # per-token log-prob and entropy (fp32), or their full logits for a divergence loss (OPSD KL/JSD).
            if not teacher_pass_needed(cfg.loss, cfg.teacher.log_entropy):
                pass  # grpo: no teacher pass, nothing of it kept
            elif pp == 1 and cfg.train.ppo_epochs == 1:
                train["teacher logits (one micro-batch)"] = float(mb.sequences * R * V / tp * compute_bytes)
            elif divergence_kind(cfg.loss):
                train["teacher logits (all micro-batches)"] = float(
                    lay.rollouts_per_dp_rank * R * V / tp * compute_bytes
                )
            else:
                train["teacher token stats (all micro-batches)"] = float(lay.rollouts_per_dp_rank * R * 2 * 4)
            train["token_stats chunk"] = 4.0 * settings.stats_chunk * V / tp * 4
        p = Plan(
            layout=lay,
            arch=arch,
            seq_len=S,
            response_len=R,
            stage=f"{stage} of {pp}",
            params_per_gpu=P,
            static=static,
            train_transient=train,
            rollout_transient=dict(engine_rollout),
            budget=settings.gpu_mem_gb * GB,
            tokens_per_step=cfg.train.prompts_per_step * cfg.rollout.group_size * S,
            response_tokens_per_step=cfg.train.prompts_per_step * cfg.rollout.group_size * R,
            notes=list(notes),
            micro_batch=mb,
        )
        if best is None or p.total > best.total:
            best = p
    assert best is not None
    return best


def format_plan(p: Plan) -> str:
    """A human-readable table of the layout, the memory terms and the totals (GB = 1e9 bytes)."""
    lay, mb = p.layout, p.micro_batch
    lines = [
        f"layout: {lay.nodes} node(s) x {lay.gpus_per_node} GPU(s) = {lay.world_size}: TP={lay.tp} PP={lay.pp} "
        f"DP={lay.dp}; {lay.rollouts_per_dp_rank} rollouts per DP rank",
        f"micro-batch: {mb.describe()}" if mb is not None else "micro-batch: not planned",
        f"sequence: {p.seq_len} tokens (response {p.response_len}); tokens per step {p.tokens_per_step:,} "
        f"(response tokens {p.response_tokens_per_step:,})",
        f"model: {p.arch.num_params() / 1e9:.2f} B parameters; {p.params_per_gpu / 1e9:.3f} B on the worst GPU "
        f"(pipeline stage {p.stage})",
        "",
        f"{'per-GPU memory':<40}{'GB':>10}",
    ]
    for title, terms in (
        ("static", p.static),
        ("training transient", p.train_transient),
        ("rollout transient", p.rollout_transient),
    ):
        lines.append(f"  {title}")
        for k, v in terms.items():
            if v:
                lines.append(f"    {k:<36}{v / GB:>10.2f}")
    lines.append(f"{'training phase (static + training)':<40}{p.training_phase / GB:>10.2f}")
    lines.append(f"{'generation phase (static + rollout)':<40}{p.generation_phase / GB:>10.2f}")
    lines.append(f"{'peak = max(the two phases)':<40}{p.total / GB:>10.2f}")
    lines.append(f"{'budget':<40}{p.budget / GB:>10.2f}")
    lines.append("fits" if p.fits else "DOES NOT FIT")
    lines.extend(f"note: {n}" for n in p.notes)
    return "\n".join(lines)


def check_fits(p: Plan) -> None:
    """Raise ConfigError naming the largest terms when the plan exceeds the GPU budget."""
    if p.fits:
        return
    terms = {
        **p.static,
        **(
            p.train_transient
            if sum(p.train_transient.values()) >= sum(p.rollout_transient.values())
            else p.rollout_transient
        ),
    }
    top = sorted(terms.items(), key=lambda kv: -kv[1])[:3]
    # An engine held through the training phase: vLLM's sleep mode takes it out of that phase.
    sleep = "rollout.engine=vllm with rollout.vllm_sleep=true, " if "rollout engine weights" in p.static else ""
    packed = p.micro_batch is not None and p.micro_batch.packed
    size_key = "parallel.max_tokens_per_micro_batch" if packed else "parallel.micro_batch_size"
    raise ConfigError(
        f"needs {p.total / GB:.1f} GB per GPU, over the {p.budget / GB:.0f} GB budget; largest terms: "
        + ", ".join(f"{k} {v / GB:.1f} GB" for k, v in top)
        + f". Try {sleep}a larger parallel.tp / parallel.pp, parallel.distributed_optimizer=true, "
        f"model.recompute=full, a smaller {size_key}, fewer train.prompts_per_step, or more nodes"
    )
