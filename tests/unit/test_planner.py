"""`egrsd plan`: layout rules and per-GPU memory of Qwen3-8B against numbers worked out by hand below.

Qwen3-8B (published config): 36 layers, hidden h=4096, 32 heads x 128 = q 4096, 8 KV heads x 128 = kv 1024,
ffn 12288, vocab 151936, untied embeddings, QK-norm.
Per layer: h(q + 2kv) = 4096 x 6144 = 25,165,824 (QKV); q h = 16,777,216 (O); 3 h ffn = 150,994,944
(gate, up, down); matrices 192,937,984; norms 2h + 2 x 128 = 8,448 (replicated over TP).
"""

from __future__ import annotations

import json

import pytest

from egrsd_megatron.cli import main
from egrsd_megatron.config.loader import load_config
from egrsd_megatron.config.schema import ConfigError
from egrsd_megatron.models import resolve_arch
from egrsd_megatron.planner import (
    GB,
    MicroBatchShape,
    PlanSettings,
    check_fits,
    format_plan,
    make_layout,
    plan,
    stage_params,
)

LAYER_MATRICES = 192_937_984
LAYER_NORMS = 8_448
# 36 x (192,937,984 + 8,448) + 2 x 151,936 x 4096 (untied embedding and output layer) + 4096 (final norm)
NUM_PARAMS = 8_190_735_360

BASE_8B = [
    "model.preset=qwen3_8b",
    "model.params_dtype=bf16",
    "model.precision=bf16",
    "model.recompute=selective",
    "parallel.tp=4",
    "parallel.pp=1",
    "parallel.micro_batch_size=2",
    "data.max_prompt_tokens=1024",
    "rollout.group_size=8",
    "rollout.max_new_tokens=4096",
    "rollout.max_batch=16",
    "train.prompts_per_step=32",
    "teacher.mode=frozen",
]


def cfg8b(*extra: str):
    return load_config("base", BASE_8B + list(extra))


def test_qwen3_8b_tp4_dp8_by_hand():
    cfg = cfg8b()
    arch = resolve_arch(cfg.model)
    p = plan(cfg, arch, nodes=4, gpus_per_node=8, settings=PlanSettings(overhead_gb=4.0))
    lay = p.layout
    # 32 GPUs / (TP 4 x PP 1) = DP 8; 32 prompts / 8 x 8 rollouts = 32 per DP rank = 16 micro-batches of 2.
    assert (lay.tp, lay.pp, lay.dp, lay.rollouts_per_dp_rank, lay.num_microbatches) == (4, 1, 8, 32, 16)
    # Vocab padded to a multiple of 128 x 4 = 512: ceil(151936 / 512) = 297 -> 152,064; / TP 4 = 38,016.
    V = 152_064
    # One GPU: 36 x (192,937,984 / 4 + 8,448) = 36 x 48,242,944 = 1,736,745,984
    #   + embedding and output layer 2 x 152,064 x 4096 / 4 = 311,427,072 + final norm 4096.
    P = 2_048_177_152
    assert 36 * (LAYER_MATRICES // 4 + LAYER_NORMS) + 2 * V * 4096 // 4 + 4096 == P
    assert p.params_per_gpu == P
    s = p.static
    assert s["weights"] == P * 2 == 4_096_354_304
    assert s["gradients (fp32)"] == P * 4 == 8_192_708_608  # fp32 main_grad accumulators
    assert s["optimizer states"] == P * 12 == 24_578_125_824
    assert s["teacher copy"] == P * 2
    assert s["fp8 weight copies"] == 0
    # hf rollout engine: the whole model in bf16 (rollout.hf_dtype unset: bf16 on a GPU, as
    # rollout/hf_engine.py builds it there; rollout/footprint.py):
    #   36 x (192,937,984 + 8,448) + 2 x 151,936 x 4096 + 4096 = 8,190,735,360 parameters x 2 bytes.
    assert s["rollout engine weights"] == NUM_PARAMS * 2 == 16_381_470_720
    assert s["overhead"] == 4e9
    t = p.train_transient
    # Sequence 1024 + 4096 = 5120. Per token per layer: 2 x (4 x 4096 + 3 x (4096 + 1024 + 12288) / 4)
    #   = 2 x (16,384 + 13,056) = 58,880 bytes; x b 2 x 5120 x 36 layers = 21,705,523,200.
    assert p.seq_len == 5120
    assert t["activations"] == 58_880 * 2 * 5120 * 36 == 21_705_523_200
    # Student logits and grad: 2 x 2 x 5120 x 38,016 x 4 bytes = 3,114,270,720.
    assert t["student logits + grad (fp32)"] == 3_114_270_720
    # PP=1, one PPO epoch: each teacher pass runs right before its student pass, so one micro-batch of
    # teacher logits is alive: 2 x 4096 x 38,016 x 2 bytes = 622,854,144.
    assert t["teacher logits (one micro-batch)"] == 622_854_144
    # token_stats: 4 x 1024 x 38,016 x 4 = 622,854,144.
    assert t["token_stats chunk"] == 622_854_144
    # KV cache in the engine's bf16: rows = min(16, 32 / 4) = 8; 8 x 5120 x 36 x 2 x 8 x 128 x 2 bytes.
    assert p.rollout_transient["rollout engine KV cache"] == 6_039_797_760
    static = 4_096_354_304 + 8_192_708_608 + 24_578_125_824 + 4_096_354_304 + 16_381_470_720 + 4_000_000_000
    train = 21_705_523_200 + 3_114_270_720 + 622_854_144 + 622_854_144
    assert p.total == pytest.approx(static + train)  # training transient > KV cache
    assert p.training_phase == pytest.approx(static + train)
    assert p.generation_phase == pytest.approx(static + 6_039_797_760)
    # The same total in GB, written to 6 decimals (87,410,515,968 bytes): half a unit of the last digit.
    assert p.total / GB == pytest.approx(87.410516, abs=5e-7)
    assert not p.fits
    with pytest.raises(
        ConfigError,
        match=r"87\.4 GB per GPU, over the 80 GB budget; largest terms: optimizer states 24\.6 GB, activations "
        r"21\.7 GB, rollout engine weights 16\.4 GB",
    ):
        check_fits(p)
    # Tokens per step: 32 prompts x 8 rollouts x 5120 = 1,310,720 (response 1,048,576).
    assert (p.tokens_per_step, p.response_tokens_per_step) == (1_310_720, 1_048_576)


def test_qwen3_8b_distributed_optimizer_full_recompute_fp8_fits():
    cfg = cfg8b("parallel.distributed_optimizer=true", "model.recompute=full", "model.precision=fp8")
    p = plan(cfg, resolve_arch(cfg.model), nodes=4, gpus_per_node=8)
    P = 2_048_177_152
    assert p.static["optimizer states"] == P * 12 / 8 == 3_072_265_728  # sharded over DP 8
    assert p.static["fp8 weight copies"] == P * 2
    # Full recompute: 2h = 8192 bytes per token per layer, x 2 x 5120 x 36, + one layer's 58,880 x 2 x 5120.
    assert p.train_transient["activations"] == 8192 * 2 * 5120 * 36 + 58_880 * 2 * 5120 == 3_622_830_080
    assert p.fits
    check_fits(p)
    # FP8 forces bf16 params even when model.params_dtype says fp32: 2-byte weights, 12-byte Adam states.
    p32 = plan(cfg8b("model.precision=fp8", "model.params_dtype=fp32"), resolve_arch(cfg.model), 4, 8)
    assert p32.static["weights"] == P * 2 and p32.static["optimizer states"] == P * 12


def test_pipeline_stages_and_in_flight_micro_batches():
    cfg = cfg8b("parallel.tp=2", "parallel.pp=2")
    arch = resolve_arch(cfg.model)
    # Vocab padded to 128 x 2 = 256: 152,064; embedding shard 152,064 x 4096 / 2 = 311,427,072.
    # 18 layers x (192,937,984 / 2 + 8,448) = 18 x 96,477,440 = 1,736,593,920.
    assert stage_params(arch, 2, 2, 0) == 1_736_593_920 + 311_427_072
    assert stage_params(arch, 2, 2, 1) == 1_736_593_920 + 311_427_072 + 4096
    p = plan(cfg, arch, nodes=4, gpus_per_node=8)
    assert (p.layout.dp, p.layout.num_microbatches) == (8, 16)
    # Per token per layer at TP 2: 2 x (16,384 + 3 x 17,408 / 2) = 84,992 bytes; the first stage holds PP=2
    # micro-batches in flight, the last one; the worst is the last (logits) or the first (2x activations).
    first = 2 * 2 * 5120 * 18 * 84_992
    assert p.stage in ("0 of 2", "1 of 2")
    if p.stage == "0 of 2":
        assert p.train_transient["activations"] == first
    else:
        assert p.train_transient["activations"] == first / 2


def test_packed_micro_batches_are_bounded_by_the_token_budget():
    """parallel.max_tokens_per_micro_batch=T: one pack of <= T positions per forward (Megatron's b = 1), so the
    activation and logits terms scale with T, not with micro_batch_size x S (micro_batch_size is unused)."""
    packed = ["parallel.max_tokens_per_micro_batch=16384"]
    cfg = cfg8b(*packed, "parallel.micro_batch_size=3")  # 3 divides no 32 rollouts: unused when packing
    p = plan(cfg, resolve_arch(cfg.model), nodes=4, gpus_per_node=8)
    # S = 5120: a pack of 16384 holds floor(16384 / 5120) = 3 sequences; 32 rollouts per DP rank -> 11 packs.
    assert p.micro_batch == MicroBatchShape(packed=True, rows=1, tokens=16384, sequences=3, count=11)
    t = p.train_transient
    # 58,880 bytes per token per layer (test_qwen3_8b_tp4_dp8_by_hand) x 16384 positions x 36 layers, 1 in flight.
    assert t["activations"] == 58_880 * 16384 * 36 == 34_728_837_120
    # Logits and their gradient of the whole pack: 2 x 16384 x 38,016 x 4 bytes.
    assert t["student logits + grad (fp32)"] == 2 * 16384 * 38_016 * 4 == 4_982_833_152
    # The pack's gathered response logits [n = 3, R = 4096, V/TP = 38,016] in bf16.
    assert t["teacher logits (one micro-batch)"] == 3 * 4096 * 38_016 * 2 == 934_281_216
    assert t["token_stats chunk"] == 622_854_144  # unchanged
    text = format_plan(p)
    assert "micro-batch: packed: 1 row of <= 16,384 tokens" in text and "11 micro-batch(es)" in text
    assert "3 sequence(s) of 5120 tokens per pack" in text
    # PP=2 at TP=2: the first stage holds min(PP = 2, 11 packs) in flight, 84,992 bytes per token per layer.
    cfg = cfg8b(*packed, "parallel.tp=2", "parallel.pp=2")
    p = plan(cfg, resolve_arch(cfg.model), nodes=4, gpus_per_node=8)
    first = 2 * 16384 * 18 * 84_992
    assert p.train_transient["activations"] == (first if p.stage == "0 of 2" else first / 2)
    # A budget below one planned sequence: the error names the key (the trainer would refuse its first step).
    with pytest.raises(ConfigError, match=r"'parallel.max_tokens_per_micro_batch': 4096 tokens cannot hold .* 5120"):
        plan(cfg8b("parallel.max_tokens_per_micro_batch=4096"), resolve_arch(cfg.model), nodes=4, gpus_per_node=8)
    # The padded plan reports its own shape: 2 rows x 5120, 16 micro-batches.
    padded = plan(cfg8b(), resolve_arch(cfg.model), nodes=4, gpus_per_node=8)
    assert padded.micro_batch == MicroBatchShape(packed=False, rows=2, tokens=10240, sequences=2, count=16)


@pytest.mark.parametrize(
    "extra, key, per_rollout_token",
    [
        # PP=2: every micro-batch's teacher output is held; only its log-prob + entropy (2 fp32) per token ...
        # (full recompute makes the last stage, the one with the logits, the worst: the one the plan reports)
        (["parallel.pp=2", "model.recompute=full"], "teacher token stats (all micro-batches)", 8),
        (["train.ppo_epochs=2"], "teacher token stats (all micro-batches)", 8),
        # ... unless the loss compares full distributions: V/TP = 152,064 / 4 columns x 2 bytes.
        (
            ["parallel.pp=2", "model.recompute=full", "loss.name=opsd", "loss.opsd.signal=jsd"],
            "teacher logits (all micro-batches)",
            38_016 * 2,
        ),
    ],
)
def test_teacher_memory_follows_what_the_trainer_keeps(extra, key, per_rollout_token):
    cfg = cfg8b(*extra)
    p = plan(cfg, resolve_arch(cfg.model), nodes=4, gpus_per_node=8)
    rollouts = p.layout.rollouts_per_dp_rank
    assert p.stage in ("0 of 1", "1 of 2")
    assert p.train_transient[key] == rollouts * 4096 * per_rollout_token
    assert not any(k.startswith("teacher") and k != key for k in p.train_transient)


@pytest.mark.parametrize(
    "extra,teacher_copy,reference_copy,teacher_kept",
    [
        ([], True, False, True),  # cl_egrsd (the config's loss), frozen teacher
        (["loss.name=grpo"], False, False, False),  # no teacher pass: no copy, nothing of it kept
        (["loss.name=grpo", "teacher.log_entropy=true"], True, False, True),
        (["loss.name=grpo", "loss.kl_coef=0.01"], False, True, False),  # the reference needs its own copy
        (["loss.kl_coef=0.01"], True, False, True),  # the frozen teacher's copy is the reference
        (["loss.kl_coef=0.01", "teacher.mode=live"], False, True, True),
    ],
)
def test_weight_copies_follow_what_the_trainer_builds(extra, teacher_copy, reference_copy, teacher_kept):
    cfg = cfg8b(*extra)
    p = plan(cfg, resolve_arch(cfg.model), nodes=4, gpus_per_node=8)
    P = p.params_per_gpu
    assert p.static["teacher copy"] == (P * 2 if teacher_copy else 0)
    assert p.static["reference copy"] == (P * 2 if reference_copy else 0)
    assert any(k.startswith("teacher") for k in p.train_transient) == teacher_kept


def test_padded_kv_groups_are_counted():
    """SmolLM2-135M (9 heads in 3 KV groups of 64) at TP=2: Megatron holds 4 groups = 12 heads."""
    from egrsd_megatron.planner.memory import layer_params

    arch = resolve_arch(load_config("demo_cpu").model)
    assert (arch.num_attention_heads, arch.num_kv_heads, arch.head_dim, arch.hidden_size) == (9, 3, 64, 576)
    # q = 12 x 64 = 768, kv = 4 x 64 = 256: 576 x (768 + 512) + 768 x 576 + 3 x 576 x 1536 = 3,833,856 / 2
    # + norms 2 x 576 (SmolLM2 has no QK-norm).
    assert layer_params(arch, 2) == 3_833_856 // 2 + 1152
    assert layer_params(arch, 1) == (576 * (576 + 384) + 576 * 576 + 3 * 576 * 1536) + 1152


def test_qwen3_4b_tied_embedding_counted_once():
    arch = resolve_arch(load_config("base", ["model.preset=qwen3_4b"]).model)
    # Per layer: 2560 x 6144 + 4096 x 2560 + 3 x 2560 x 9728 = 100,925,440, + norms 2 x 2560 + 256 = 5,376;
    # x 36 = 3,633,509,376; one embedding 151,936 x 2560 = 388,956,160; final norm 2560.
    assert stage_params(arch, 1, 1, 0) == 3_633_509_376 + 388_956_160 + 2560 == 4_022_468_096
    # PP=2: the last stage keeps its own copy of the tied embedding as the output layer.
    assert stage_params(arch, 1, 2, 1) == 3_633_509_376 // 2 + 388_956_160 + 2560


@pytest.mark.parametrize(
    "extra, nodes, gpn, match",
    [
        (["parallel.tp=5"], 1, 5, "does not divide ffn_hidden_size=12288"),
        (["parallel.tp=1", "parallel.pp=5"], 5, 1, "does not divide num_layers=36"),
        ([], 3, 5, r"world size 3 nodes x 5 GPUs = 15 is not divisible by parallel.tp=4 x parallel.pp=1"),
        (["train.prompts_per_step=30"], 4, 8, r"prompts_per_step=30 must be divisible by the data-parallel size DP=8"),
        (["parallel.micro_batch_size=3"], 4, 8, r"micro_batch_size=3 does not divide the 32 rollouts"),
        (["parallel.tp=16"], 4, 8, "larger than --gpus-per-node=8"),
    ],
)
def test_sizes_that_do_not_divide(extra, nodes, gpn, match):
    cfg = cfg8b(*extra)
    with pytest.raises(ConfigError, match=match):
        make_layout(cfg, resolve_arch(cfg.model), nodes, gpn)


def test_cli_prints_table_and_fails_when_over_budget(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(["plan", "base", *BASE_8B, "--nodes", "4", "--gpus-per-node", "8", "--json", str(out)])
    assert rc == 2
    text = capsys.readouterr()
    assert "TP=4 PP=1 DP=8" in text.out and "DOES NOT FIT" in text.out
    assert "over the 80 GB budget" in text.err
    d = json.loads(out.read_text())
    assert d["layout"]["dp"] == 8 and d["fits"] is False
    assert d["micro_batch"] == {"packed": False, "rows": 2, "tokens": 10240, "sequences": 2, "count": 16}
    assert "micro-batch: padded: 2 row(s) x 5,120 tokens (parallel.micro_batch_size), 16 micro-batch(es)" in text.out
    # A byte count: a sum of integer-valued terms below 2^53, exact in float64 and in JSON.
    assert d["peak_bytes"] == 87_410_515_968
    assert d["training_phase_bytes"] == 87_410_515_968 and d["notes"][0].startswith("rollout engine: hf, bfloat16")
    # A budget above the peak passes.
    assert main(["plan", "base", *BASE_8B, "--nodes", "4", "--gpu-mem-gb", "110"]) == 0


@pytest.mark.parametrize("conf, nodes", [("qwen3_8b", 4), ("qwen3_4b", 2)])
def test_shipped_cluster_configs_fit(conf, nodes, capsys):
    assert main(["plan", conf, "--nodes", str(nodes), "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "vllm sleep mode (level 1)" in out and "not their sum" in out
    ro = load_config(conf).rollout
    assert (ro.engine, ro.vllm_dtype, ro.vllm_tp, ro.vllm_sleep) == ("vllm", "bfloat16", 1, True)
    # The transformers engine is one override away (the vllm_* keys are then unused), and still fits.
    assert main(["plan", conf, "rollout.engine=hf", "--nodes", str(nodes)]) == 0


# The 8B at TP=4 as in test_qwen3_8b_tp4_dp8_by_hand, with the vllm engine and a 0.4 share:
#   trainer static (no engine) = 4,096,354,304 (weights) + 8,192,708,608 (grads) + 24,578,125,824 (Adam)
#                                + 4,096,354,304 (teacher) + 4,000,000,000 (overhead) = 44,963,543,040
#   training transient = 21,705,523,200 + 3,114,270,720 + 622,854,144 + 622,854,144 = 26,065,502,208
#   share = 0.4 x 80e9 = 32,000,000,000 (0.4 x 80 rounds to exactly 32.0 in float64)
TRAINER_STATIC = 44_963_543_040
TRAIN = 26_065_502_208
SHARE = 32_000_000_000


def test_vllm_without_sleep_holds_its_share_the_whole_step():
    cfg = cfg8b("rollout.engine=vllm", "rollout.gpu_memory_utilization=0.4")
    p = plan(cfg, resolve_arch(cfg.model), 4, 8, PlanSettings(rollout_gpu_fraction=0.4))
    # weights: 8,190,735,360 x 2 bytes (bf16) / vllm_tp 1; the KV cache fills the rest of the share:
    #   32,000,000,000 - 16,381,470,720 = 15,618,529,280.
    assert p.static["rollout engine weights"] == 16_381_470_720
    assert p.static["rollout engine KV cache"] == pytest.approx(15_618_529_280, abs=1)
    assert p.rollout_transient == {}
    # peak = static (trainer + the whole share) + training = 44,963,543,040 + 32e9 + 26,065,502,208
    assert p.total == pytest.approx(TRAINER_STATIC + SHARE + TRAIN, abs=1) == 103_029_045_248
    assert not p.fits
    assert "no vllm sleep mode" in p.notes[1]


@pytest.mark.parametrize("vtp", [1, 2])
def test_vllm_sleep_counts_the_larger_phase_not_the_sum(vtp):
    cfg = cfg8b(
        "rollout.engine=vllm", "rollout.gpu_memory_utilization=0.4", "rollout.vllm_sleep=true", f"rollout.vllm_tp={vtp}"
    )
    p = plan(cfg, resolve_arch(cfg.model), 4, 8, PlanSettings(rollout_gpu_fraction=0.4))
    assert "rollout engine weights" not in p.static and "rollout engine KV cache" not in p.static
    # weights 16,381,470,720 / vllm_tp (8,190,735,360 at 2); KV cache = the share's rest.
    w = 16_381_470_720 // vtp
    assert p.rollout_transient["rollout engine weights"] == w
    assert p.rollout_transient["rollout engine KV cache"] == pytest.approx(SHARE - w, abs=1)
    # training phase 44,963,543,040 + 26,065,502,208 = 71,029,045,248;
    # generation phase 44,963,543,040 + 32,000,000,000 = 76,963,543,040 (the larger: the peak, fits 80 GB).
    assert p.training_phase == pytest.approx(TRAINER_STATIC + TRAIN, abs=1) == 71_029_045_248
    assert p.generation_phase == pytest.approx(TRAINER_STATIC + SHARE, abs=1) == 76_963_543_040
    assert p.total == pytest.approx(76_963_543_040, abs=1) and p.fits
    assert "not their sum" in p.notes[1]
    # Each GPU's engine generates 32 / 4 = 8 rows (x vtp for a vLLM TP group); its KV need per GPU:
    #   8 x vtp rows x 5120 x 36 x 2 x 8 x 128 x 2 bytes / vtp = 6,039,797,760 = 6.04 GB.
    assert f"its {8 * vtp} rows of 5120 tokens need 6.04 GB" in p.notes[0]


def test_vllm_share_must_hold_the_weights_and_vllm_tp_stays_in_a_node():
    cfg = cfg8b("rollout.engine=vllm", "rollout.gpu_memory_utilization=0.2")
    # 0.2 x 80 = 16 GB < 16.4 GB of bf16 weights.
    with pytest.raises(ConfigError, match=r"'rollout.gpu_memory_utilization': vLLM's share 16\.0 GB .* 16\.4 GB"):
        plan(cfg, resolve_arch(cfg.model), 4, 8, PlanSettings(rollout_gpu_fraction=0.2))
    # vllm_tp=4 divides parallel.tp=4, but not 6 GPUs per node: a group would straddle two nodes.
    cfg = cfg8b("rollout.engine=vllm", "rollout.vllm_tp=4")
    with pytest.raises(ConfigError, match=r"rollout.vllm_tp=4 does not divide --gpus-per-node=6"):
        make_layout(cfg, resolve_arch(cfg.model), 4, 6)
