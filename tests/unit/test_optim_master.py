"""MasterWeightAdamW (trainer/optim.py): AdamW for bf16 parameters with fp32 master weights.

Reference: torch.optim.AdamW on fp32 parameters fed the same gradients (values exactly representable in
bf16, so both optimizers see identical inputs). The masters must follow it bitwise; the bf16 parameters
must be the masters rounded; a checkpoint round trip must keep the fp32 state.
"""

import copy

import pytest
import torch

from egrsd_megatron.config.schema import OptimConfig
from egrsd_megatron.testing.tolerance import FP32_U, sum_bound
from egrsd_megatron.trainer.optim import MasterWeightAdamW, build_optimizer

KW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)


def _grads(steps: int, shapes, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g).to(torch.bfloat16) for s in shapes] for _ in range(steps)]


def _pair():
    torch.manual_seed(0)
    ref = [
        torch.nn.Parameter(torch.randn(7, 5).to(torch.bfloat16).float()),
        torch.nn.Parameter(torch.randn(5).to(torch.bfloat16).float()),
    ]
    low = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in ref]
    return ref, low


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.to(p.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_masters_follow_fp32_adamw_bitwise_and_params_are_their_rounding():
    ref, low = _pair()
    grads = _grads(5, [p.shape for p in ref])
    _run(torch.optim.AdamW(ref, **KW), ref, grads)
    opt = MasterWeightAdamW(low, **KW)
    _run(opt, low, grads)
    for r, p in zip(ref, low):
        st = opt.state[p]
        assert st["master"].dtype == st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32
        # Bitwise: the masters take torch AdamW's own per-element update (foreach=False on both sides) on the
        # same fp32 values and gradients, in one process: element-wise arithmetic with no reduction to reorder.
        assert torch.equal(st["master"], r.detach())
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), r.detach().to(torch.bfloat16))


def test_small_updates_accumulate_instead_of_rounding_away():
    """lr 1e-5 on weights of order 1: each step is far below bf16's resolution (2^-8 relative)."""
    _, low = _pair()
    plain = [torch.nn.Parameter(p.detach().clone()) for p in low]
    grads = [[torch.ones(p.shape, dtype=torch.bfloat16) for p in low]] * 300  # a steady direction
    kw = {**KW, "lr": 1e-5, "weight_decay": 0.0}
    before = [p.detach().clone() for p in low]
    _run(torch.optim.AdamW(plain, **kw), plain, grads)
    opt = MasterWeightAdamW(low, **kw)
    _run(opt, low, grads)
    # AdamW on bf16 parameters: every update rounded away, the weights never move.
    assert all(torch.equal(p.detach(), b) for p, b in zip(plain, before))
    # With masters the 300 steps of ~1e-5 add up to ~3e-3, and most bf16 weights move. Each step's
    # update is lr * mhat / (sqrt(vhat) + eps) = lr (1 - 1e-8) for a constant gradient; adding it to an fp32
    # master of size <= |w| rounds by <= u |w|, so after n steps |drift + n lr| <= n u max|w| (worst case,
    # rounding errors all of one sign, as they are here: the same increment on similar values): relative to
    # n lr, u max|w| / lr (1.4e-2 for max|w| = 2.3).
    w_max = max(float(b.float().abs().max()) for b in before) + 300 * 1e-5
    rtol = FP32_U * w_max / 1e-5 + 1e-6  # + 1e-6: the eps / sqrt(vhat) term and the update's own rounding
    for p, b in zip(low, before):
        drift = opt.state[p]["master"] - b.float()
        assert torch.allclose(drift, torch.full_like(drift, -300 * 1e-5), rtol=rtol, atol=0), rtol
    moved = sum(int((p.detach() != b).sum()) for p, b in zip(low, before))
    assert moved > 0.5 * sum(p.numel() for p in low)


def test_state_dict_round_trip_keeps_fp32_state_and_continues_bitwise():
    _, low = _pair()
    grads = _grads(6, [p.shape for p in low], seed=2)
    straight = [torch.nn.Parameter(p.detach().clone()) for p in low]
    opt_a = MasterWeightAdamW(straight, **KW)
    _run(opt_a, straight, grads)

    opt_b = MasterWeightAdamW(low, **KW)
    _run(opt_b, low, grads[:3])
    saved = copy.deepcopy(opt_b.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in low]  # the bf16 weights, as a checkpoint has
    opt_c = MasterWeightAdamW(resumed, **KW)
    opt_c.load_state_dict(saved)
    for p in resumed:
        assert all(opt_c.state[p][k].dtype == torch.float32 for k in ("master", "exp_avg", "exp_avg_sq"))
    _run(opt_c, resumed, grads[3:])
    for a, c in zip(straight, resumed):  # bitwise: the same element-wise updates on the same fp32 state
        assert torch.equal(a.detach(), c.detach())
        assert torch.equal(opt_a.state[a]["master"], opt_c.state[c]["master"])


def test_build_optimizer_picks_masters_for_bf16_only():
    cfg = OptimConfig()
    fp32 = torch.nn.Linear(4, 4)
    assert type(build_optimizer([fp32], cfg)) is torch.optim.AdamW
    assert type(build_optimizer([torch.nn.Linear(4, 4).to(torch.bfloat16)], cfg)) is MasterWeightAdamW
    with pytest.raises(ValueError, match="amsgrad"):
        MasterWeightAdamW(fp32.parameters(), amsgrad=True)


def test_bf16_gradients_accumulate_in_fp32_main_grad():
    """32 micro-batches into one bf16 weight: the fp32 accumulator equals the float64 sum of the per-micro-batch
    bf16 gradients to fp32 rounding; plain `.grad` accumulation in bf16 is far off."""
    from egrsd_megatron.distributed.grads import attach_fp32_grad_accumulators, grad_of, zero_grads

    torch.manual_seed(0)
    hooked = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    plain, single = copy.deepcopy(hooked), copy.deepcopy(hooked)
    assert attach_fp32_grad_accumulators([hooked]) == 1 and attach_fp32_grad_accumulators([hooked]) == 0
    ref = torch.zeros(64, 64, dtype=torch.float64)
    ref_abs = torch.zeros(64, 64, dtype=torch.float64)  # sum of |per-micro-batch gradient|: bounds the partial sums
    for _ in range(32):
        x = torch.randn(8, 64).to(torch.bfloat16)
        hooked(x).float().pow(2).mean().backward()
        plain(x).float().pow(2).mean().backward()
        g = torch.autograd.grad(single(x).float().pow(2).mean(), single.weight)[0].double()
        ref += g
        ref_abs += g.abs()
        assert hooked.weight.grad is None  # folded into main_grad and freed
    acc = grad_of(hooked.weight)
    assert acc is hooked.weight.main_grad and acc.dtype == torch.float32
    scale = float(ref.abs().max())
    err_fp32 = float((acc.double() - ref).abs().max())
    err_bf16 = float((plain.weight.grad.double() - ref).abs().max())
    # The accumulator adds 32 exact (bf16) values in fp32; against the float64 sum only its own 31 roundings
    # count, each <= u |partial sum| <= u sum|g_i|: worst case 31 u max(sum|g_i|), half sum_bound's two-sided
    # value (the worst case is not loose at n = 32). bf16 accumulation rounds 2^16 times coarser.
    tol = sum_bound(32, float(ref_abs.max())) / 2
    assert err_fp32 <= tol and err_bf16 > 100 * err_fp32, (err_fp32, tol, err_bf16, scale)
    zero_grads([hooked])
    assert float(hooked.weight.main_grad.abs().max()) == 0.0


def test_master_weight_adamw_steps_on_the_fp32_accumulator():
    from egrsd_megatron.distributed.grads import attach_fp32_grad_accumulators

    _, low = _pair()
    model = torch.nn.Module()
    model.w, model.b = low
    attach_fp32_grad_accumulators([model])
    ref = [torch.nn.Parameter(p.detach().float()) for p in low]
    grads = [torch.randn(p.shape, dtype=torch.float64) * 1e-3 for p in low]  # not bf16-representable
    for p, q, g in zip(low, ref, grads):
        p.main_grad.copy_(g)
        q.grad = g.float()
    MasterWeightAdamW(low, **KW).step()
    torch.optim.AdamW(ref, **KW).step()
    # Bitwise: main_grad holds g rounded to fp32, exactly q.grad; the same element-wise AdamW update follows.
    assert all(torch.equal(p.detach(), q.detach().to(torch.bfloat16)) for p, q in zip(low, ref))


def _zero_vs_single(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from egrsd_megatron.checkpoint.optimizer_state import is_sharded, shard_state
    from egrsd_megatron.distributed.grads import attach_fp32_grad_accumulators

    cfg = OptimConfig(lr=1e-3, weight_decay=0.1)
    out = {}
    for zero in (False, True):
        torch.manual_seed(0)  # the same bf16 model and data on every rank and for both kinds
        model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 32)).to(torch.bfloat16)
        attach_fp32_grad_accumulators([model])
        opt = build_optimizer([model], cfg, dp_group=dist.group.WORLD if zero else None)
        assert is_sharded(opt) == zero
        for _ in range(3):
            for p in model.parameters():
                p.main_grad.zero_()
            model(torch.randn(4, 32).to(torch.bfloat16)).float().pow(2).mean().backward()
            opt.step()
        out[zero] = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        if zero:
            out["master_dtypes"] = sorted({str(st["master"].dtype) for st in shard_state(opt).values()})
            out["n_local"] = len(shard_state(opt))
    return out


def test_zero1_over_master_weight_adamw_matches_unsharded():
    """ZeroRedundancyOptimizer wrapping MasterWeightAdamW (bf16 params, fp32 accumulators) at DP=2: the same
    weights as the unsharded optimizer, each rank holding the fp32 masters of its own share."""
    from egrsd_megatron.testing import run_distributed

    res = run_distributed(_zero_vs_single, 2, timeout=300)
    for r in res:
        assert r["master_dtypes"] == ["torch.float32"]
        for name, w in r[False].items():
            # Bitwise: no gradient all-reduce (each rank computes the same gradients itself), and the owner's
            # update is the same element-wise arithmetic as the unsharded one; the broadcast copies bits.
            assert (w == r[True][name]).all(), name
    assert sorted(r["n_local"] for r in res) != [4, 4] and sum(r["n_local"] for r in res) == 4
