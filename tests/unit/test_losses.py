"""EGRSD loss family against independent float64 references (python loops over tokens, numpy).

References here re-derive each formula of docs/method.md token by token; the implementation is
vectorised torch, so a shared mistake would need the same bug written twice in different forms.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egrsd_megatron.config import load_config
from egrsd_megatron.config.schema import (
    ClipConfig,
    ConfigError,
    GateConfig,
    LookaheadConfig,
    LossConfig,
    OpsdConfig,
    RatioConfig,
)
from egrsd_megatron.losses import (
    FAMILY,
    LossSpec,
    TokenFactors,
    divergence_kind,
    entropy_gate,
    group_advantages,
    lookahead_entropy,
    loss_spec,
    masked_quantile,
    policy_loss,
    token_advantages,
)
from egrsd_megatron.losses.registry import always

F64 = torch.float64
REWARD_NAMES = ["grpo", "rlsd", "egrsd", "cl_egrsd"]
SECTIONS = {
    "ratio": RatioConfig,
    "gate": GateConfig,
    "lookahead": LookaheadConfig,
    "clip": ClipConfig,
    "opsd": OpsdConfig,
}


def cfg_of(name: str = "cl_egrsd", **kw) -> LossConfig:
    """LossConfig from nested keywords: cfg_of("egrsd", gate=dict(tau=2.0), kl_coef=0.1)."""
    return LossConfig(name=name, **{k: SECTIONS[k](**v) if k in SECTIONS else v for k, v in kw.items()})


def make_batch(seed: int, b: int = 6, t: int = 12, dtype=F64, ragged: bool = True):
    g = torch.Generator().manual_seed(seed)
    ls = -torch.rand(b, t, generator=g, dtype=dtype) * 3
    lt = -torch.rand(b, t, generator=g, dtype=dtype) * 3
    h = torch.rand(b, t, generator=g, dtype=dtype) * 4
    lengths = torch.randint(1, t + 1, (b,), generator=g) if ragged else torch.full((b,), t)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    adv = torch.randn(b, generator=g, dtype=dtype)
    return adv, ls, lt, h, mask


# ---------------------------------------------------------------- independent references
def ref_future(h, mask, k, stat, seg=None):
    """F_t by a python loop: walk forward from t until k steps, the row end, a masked token or a new segment."""
    b, t_len = h.shape
    out = np.zeros((b, t_len))
    for i in range(b):
        for t in range(t_len):
            if not mask[i, t]:
                continue
            vals = []
            for j in range(1, k + 1):
                s = t + j
                if s >= t_len or not mask[i, s] or (seg is not None and seg[i, s] != seg[i, t]):
                    break
                vals.append(float(h[i, s]))
            if not vals:
                out[i, t] = float(h[i, t])
            else:
                out[i, t] = sum(vals) / len(vals) if stat == "mean" else max(vals)
    return out


def ref_gate_scalar(hv, cfg, h_ref=None):
    hv = max(hv, 0.0)
    g = cfg.gate
    phi = math.exp(-hv / g.tau) if g.kind == "exp" else min(max(1 - hv / h_ref, 0.0), 1.0)
    return g.g_min + (1 - g.g_min) * phi


def ref_token_adv(adv, ls, lt, h, mask, cfg, vocab_size=None, seg=None):
    b, t_len = mask.shape
    out = np.zeros((b, t_len))
    spec = FAMILY[cfg.name]
    m = mask.numpy()
    hh = h.numpy() if h is not None else None
    if spec.lookahead:
        fut = ref_future(hh, m, cfg.lookahead.window, cfg.lookahead.stat, seg)
        hh = np.where(m, np.minimum(hh, fut), 0.0)
    h_ref = None
    if cfg.gate.kind == "linear" and spec.gate:
        h_ref = (
            math.log(vocab_size)
            if cfg.gate.h_ref == "log_vocab"
            else float(np.quantile(np.maximum(hh[m], 0), float(cfg.gate.h_ref.split(":")[1])))
        )
    for i in range(b):
        for t in range(t_len):
            if not m[i, t]:
                continue
            if cfg.name == "opsd":
                out[i, t] = float(lt[i, t] - ls[i, t]) if cfg.opsd.signal == "sampled" else 0.0
                continue
            a = float(adv[i])
            w = 1.0
            if spec.ratio:
                d = (a > 0) - (a < 0)
                eps_w, lam = cfg.ratio.eps_w, cfg.ratio.lam
                rho = min(max(math.exp(d * float(lt[i, t] - ls[i, t])), 1 - eps_w), 1 + eps_w)
                w *= (1 - lam) + lam * rho
            if spec.gate:
                w *= ref_gate_scalar(float(hh[i, t]), cfg, h_ref)
            out[i, t] = a * w
    return out


def ref_loss_and_grad(ls, old, adv_t, mask, cfg, denominator=None, ref=None):
    """Hand-derived loss and dL/dlS (module docstring of policy_loss.py), token by token."""
    b, t_len = mask.shape
    m = mask.numpy()
    lengths = m.sum(1)
    per_tok = np.zeros((b, t_len))
    grad = np.zeros((b, t_len))
    for i in range(b):
        for t in range(t_len):
            if not m[i, t]:
                continue
            r = math.exp(float(ls[i, t] - old[i, t]))
            a = float(adv_t[i, t])
            eps_lo, eps_hi = cfg.clip.eps_lo, cfg.clip.eps_hi
            clipped = (a > 0 and r > 1 + eps_hi) or (a < 0 and r < 1 - eps_lo)
            rc = min(max(r, 1 - eps_lo), 1 + eps_hi)
            per_tok[i, t] = -min(r * a, rc * a)
            grad[i, t] = 0.0 if clipped else -r * a
            if cfg.kl_coef > 0:
                x = float(ref[i, t] - ls[i, t])
                per_tok[i, t] += cfg.kl_coef * (math.exp(x) - x - 1)
                grad[i, t] += cfg.kl_coef * (1 - math.exp(x))
    if cfg.aggregation == "token_mean":
        d = denominator if denominator is not None else max(lengths.sum(), 1)
        return per_tok.sum() / d, grad / d
    d = denominator if denominator is not None else max((lengths > 0).sum(), 1)
    scale = 1.0 / np.maximum(lengths, 1)[:, None]
    return (per_tok * scale).sum() / d, grad * scale / d


# ---------------------------------------------------------------- config and registry
@pytest.mark.parametrize(
    "kw,key",
    [
        ({"gate": {"g_min": 0.0}}, "loss.gate.g_min"),
        ({"gate": {"g_min": 1.0}}, "loss.gate.g_min"),
        ({"gate": {"g_min": 1.5}}, "loss.gate.g_min"),
        ({"ratio": {"eps_w": -0.1}}, "loss.ratio.eps_w"),
        ({"ratio": {"eps_w": 1.0}}, "loss.ratio.eps_w"),
        ({"lookahead": {"window": 0}}, "loss.lookahead.window"),
        ({"name": "ppo"}, "loss.name"),
        ({"gate": {"kind": "cosine"}}, "loss.gate.kind"),
        ({"gate": {"h_ref": "quantile:2"}}, "loss.gate.h_ref"),
        ({"lookahead": {"stat": "median"}}, "loss.lookahead.stat"),
        ({"aggregation": "sum"}, "loss.aggregation"),
        ({"opsd": {"signal": "forward_kl"}}, "loss.opsd.signal"),
        ({"opsd": {"beta": 1.0}}, "loss.opsd.beta"),
        ({"clip": {"eps_hi": -0.1}}, "loss.clip.eps_hi"),
    ],
)
def test_invalid_config_names_the_key(kw, key):
    """Direct construction validates like the loader: the Literal fields and the ranges, naming the nested key."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + "'"):
        cfg_of(**kw)


METHOD_MD = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "method.md")


def _family_table():
    """Rows of docs/method.md's family table as {name: {column: cell}}."""
    section = open(METHOD_MD).read().split("## The family", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in section.splitlines() if ln.startswith("|")]
    return {r[0].split("`")[1]: dict(zip(rows[0], r)) for r in rows[2:]}  # rows[1] is the |---| line


def _cell_truth(cell: str, spec_fn, name: str):
    """A 'yes' / 'no' / 'signal=a, b' cell against the spec's function of the config, for every opsd signal."""
    for signal in ("sampled", "reverse_kl", "jsd"):
        cfg = cfg_of(name=name, opsd=dict(signal=signal))
        want = cell == "yes" or (cell.startswith("signal=") and signal in cell[len("signal=") :].split(", "))
        assert bool(spec_fn(cfg)) == want, f"{name}: '{cell}' vs signal={signal}"


def test_registry_matches_the_family_table_of_method_md():
    table = _family_table()
    assert list(table) == list(FAMILY), "the registry and docs/method.md list different losses"
    for name, row in table.items():
        spec = loss_spec(name)
        assert spec.name == name and spec.description
        assert spec.uses_reward == (row["direction"] == "A_i")
        assert spec.ratio == (row["ratio"] == "rho~")
        assert spec.gate == row["gate"].startswith("g(")
        assert spec.lookahead == (row["lookahead"] == "yes") == (row["gate"] == "g(H^CL)")
        assert spec.teacher_entropy == (row["teacher entropy"] == "yes")
        _cell_truth(row["teacher log-probs"], spec.teacher_logprob, name)
        _cell_truth(row["full teacher logits"], lambda c: spec.divergence(c) is not None, name)  # noqa: B023 - called inside this iteration
        # a ratio reads the log-probs; a lookahead only modifies a gate
        assert not spec.ratio or spec.teacher_logprob(cfg_of(name=name))
        assert not spec.lookahead or spec.gate


def test_add_a_loss_is_one_function_and_one_registry_entry(monkeypatch):
    """The worked example of docs/architecture.md ("Add a loss"): a new advantage function plus a FAMILY
    entry is all it takes; config validation, the input checks and policy_loss follow from the spec."""

    def tw_grpo_advantages(spec, x, cfg):  # Ahat = A_i * pT(y_t): trust tokens the teacher finds likely
        a = x.advantages.detach().to(x.dtype).unsqueeze(1).expand(x.valid.shape)
        ones = x.ones()
        return TokenFactors(a * torch.exp(x.teacher_logprob), a, ones, ones, ones)

    spec = LossSpec(
        "tw_grpo",
        "GRPO weighted by the teacher's token probability",
        tw_grpo_advantages,
        uses_reward=True,
        teacher_logprob=always,
    )
    monkeypatch.setitem(FAMILY, "tw_grpo", spec)
    cfg = load_config(None, ["loss.name=tw_grpo"]).loss
    adv, ls, lt, h, mask = make_batch(7)
    got = token_advantages(adv, ls, lt, None, mask, cfg)
    np.testing.assert_allclose(got.numpy(), np.where(mask, adv[:, None].numpy() * np.exp(lt.numpy()), 0), rtol=1e-12)
    with pytest.raises(ValueError, match="teacher_logprob is required for loss.name=tw_grpo"):
        token_advantages(adv, ls, None, None, mask, cfg)
    loss, _ = policy_loss(ls, None, got, mask, cfg)
    assert float(loss) == pytest.approx(float(-(got * mask).sum() / mask.sum()), rel=1e-12)


def test_unknown_loss_name_lists_the_registry():
    with pytest.raises(ConfigError, match="loss.name.*expected one of grpo, rlsd, egrsd, cl_egrsd, opsd"):
        loss_spec("dpo")


# ---------------------------------------------------------------- group advantages
@pytest.mark.parametrize("normalize_std", [True, False])
def test_group_advantages_match_numpy(normalize_std):
    rng = np.random.default_rng(0)
    r = rng.integers(0, 2, size=24).astype(np.float64) + rng.normal(size=24) * 0.3
    r[8:12] = 0.1  # an all-equal group: mean(0.1 x 4) != 0.1 in floating point
    a, met = group_advantages(torch.tensor(r), 4, normalize_std, return_metrics=True)
    g = r.reshape(-1, 4)
    ref = g - g.mean(1, keepdims=True)
    if normalize_std:
        ref = ref / (g.std(1, ddof=1, keepdims=True) + 1e-6)
    ref[2] = 0.0
    np.testing.assert_allclose(a.numpy(), ref.reshape(-1), rtol=1e-12, atol=1e-12)
    assert (a[8:12] == 0).all()
    assert met["zero_adv_group_frac"] == pytest.approx(1 / 6)
    assert met["reward_mean"] == pytest.approx(r.mean())


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="multiple of the group size"):
        group_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match=r"non-finite values at rows \[2\]"):
        group_advantages(torch.tensor([0.0, 1.0, float("nan"), 1.0]), 2)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 4), 4)


# ---------------------------------------------------------------- lookahead
@pytest.mark.parametrize("stat", ["mean", "max"])
@pytest.mark.parametrize("window", [1, 3, 8, 40])
def test_lookahead_matches_loop_reference_packed(stat, window):
    g = torch.Generator().manual_seed(window)
    h = torch.rand(5, 17, generator=g, dtype=F64) * 5
    mask = torch.rand(5, 17, generator=g) > 0.2  # holes inside rows too
    seg = torch.cumsum(torch.rand(5, 17, generator=g) > 0.8, dim=1)  # packed sequences
    fut = ref_future(h.numpy(), mask.numpy(), window, stat, seg.numpy())
    got_f = lookahead_entropy(h, mask, window, stat, segment_ids=seg, return_future=True)
    got = lookahead_entropy(h, mask, window, stat, segment_ids=seg)
    np.testing.assert_allclose(got_f.numpy(), np.where(mask, fut, 0), rtol=1e-12)
    np.testing.assert_allclose(got.numpy(), np.where(mask, np.minimum(h.numpy(), fut), 0), rtol=1e-12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), window=st.integers(1, 12), stat=st.sampled_from(["mean", "max"]))
def test_lookahead_never_reads_outside_its_response(seed, window, stat):
    """Overwrite everything outside one response (padding, other packed sequences) with huge or nan
    values: that response's H^CL must not change."""
    g = torch.Generator().manual_seed(seed)
    b, t_len = 3, 20
    h = torch.rand(b, t_len, generator=g, dtype=F64)
    seg = torch.cumsum(torch.rand(b, t_len, generator=g) > 0.75, dim=1)
    mask = torch.rand(b, t_len, generator=g) > 0.15
    base = lookahead_entropy(h, mask, window, stat, segment_ids=seg)
    row = int(torch.randint(0, b, (1,), generator=g))
    target = seg[row, int(torch.randint(0, t_len, (1,), generator=g))]
    # the response = first maximal valid run of the chosen segment in that row
    inside = torch.zeros(b, t_len, dtype=torch.bool)
    idx = [t for t in range(t_len) if seg[row, t] == target and mask[row, t]]
    if idx:
        start = idx[0]
        t = start
        while t < t_len and mask[row, t] and seg[row, t] == target:
            inside[row, t] = True
            t += 1
    noisy = torch.where(inside, h, torch.full_like(h, 1e6))
    noisy[~mask] = float("nan")
    got = lookahead_entropy(noisy, mask, window, stat, segment_ids=seg)
    assert torch.equal(got[inside], base[inside])
    # F itself too: min(H, F) alone could hide a leaked huge value whenever F >= H already
    fut = lookahead_entropy(noisy, mask, window, stat, segment_ids=seg, return_future=True)
    assert torch.equal(
        fut[inside], lookahead_entropy(h, mask, window, stat, segment_ids=seg, return_future=True)[inside]
    )
    assert (fut[inside] <= 1).all()


def test_lookahead_validates():
    with pytest.raises(ValueError, match="window"):
        lookahead_entropy(torch.zeros(2, 3), torch.ones(2, 3), window=0)
    with pytest.raises(ValueError, match=r"entropy: expected shape \(2, 3\)"):
        lookahead_entropy(torch.zeros(2, 4), torch.ones(2, 3))


def test_cl_gate_lifts_transient_spike_not_sustained_span():
    """A spike followed by low entropy gets a higher gate than the same spike inside a high span."""
    cfg = cfg_of(name="cl_egrsd", lookahead=dict(window=4))
    low, high = 0.05, 3.0
    transient = torch.tensor([[low] * 5 + [high] + [low] * 8], dtype=F64)
    sustained = torch.tensor([[low] * 3 + [high] * 9 + [low] * 2], dtype=F64)
    mask = torch.ones(1, 14, dtype=torch.bool)
    g_tr = entropy_gate(lookahead_entropy(transient, mask, cfg.lookahead.window), cfg.gate)
    g_su = entropy_gate(lookahead_entropy(sustained, mask, cfg.lookahead.window), cfg.gate)
    spike_t = 5
    assert transient[0, spike_t] == sustained[0, spike_t] == high
    assert g_tr[0, spike_t] > 0.9 and g_su[0, spike_t] < 0.3
    assert g_tr[0, spike_t] > g_su[0, spike_t] + 0.5
    # plain EGRSD gates both spikes identically; confident tokens stay confident under CL
    eg = cfg_of(name="egrsd")
    assert entropy_gate(transient, eg.gate)[0, spike_t] == entropy_gate(sustained, eg.gate)[0, spike_t]
    assert torch.equal(g_tr[0, :5], entropy_gate(transient, eg.gate)[0, :5])
    # the metric counts the lifted spike once, and none in the sustained span but its tail end
    _, m_tr = token_advantages(
        torch.ones(1, dtype=F64), transient * 0 - 1, transient * 0 - 1, transient, mask, cfg, return_metrics=True
    )
    assert m_tr["spike_count"] == 1.0


# ---------------------------------------------------------------- gate
@pytest.mark.parametrize(
    "kw",
    [
        dict(kind="exp", tau=0.7, g_min=0.3),
        dict(kind="linear", h_ref="log_vocab"),
        dict(kind="linear", h_ref="quantile:0.8", g_min=0.1),
    ],
)
def test_gate_matches_formula(kw):
    cfg = cfg_of(name="egrsd", gate=kw)
    _, _, _, h, mask = make_batch(3)
    h[0, 0] = -1e-7  # fp32-style tiny negative entropy must not push the gate above 1
    g = entropy_gate(h, cfg.gate, mask=mask, vocab_size=1000)
    hn, m = h.numpy(), mask.numpy()
    h_ref = (
        math.log(1000)
        if kw.get("h_ref") == "log_vocab"
        else (float(np.quantile(np.maximum(hn[m], 0), 0.8)) if cfg.gate.kind == "linear" else None)
    )
    ref = np.vectorize(lambda v: ref_gate_scalar(v, cfg, h_ref))(hn)
    np.testing.assert_allclose(g.numpy(), ref, rtol=1e-12)
    assert (g >= cfg.gate.g_min).all() and (g <= 1).all()


def test_masked_quantile_matches_numpy_and_gate_needs_vocab():
    v = torch.randn(7, 9, dtype=F64)
    m = torch.rand(7, 9) > 0.3
    for q in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert float(masked_quantile(v, m, q)) == pytest.approx(float(np.quantile(v.numpy()[m.numpy()], q)))
    with pytest.raises(ValueError, match="vocab_size"):
        entropy_gate(v.abs(), GateConfig(kind="linear"))


# ---------------------------------------------------------------- token advantages
CASES = [dict(name=n) for n in REWARD_NAMES] + [
    dict(name="egrsd", ratio=dict(lam=0.5, eps_w=0.3), gate=dict(g_min=0.1, tau=2.0)),
    dict(name="cl_egrsd", lookahead=dict(stat="max", window=3), gate=dict(kind="linear", h_ref="quantile:0.9")),
    dict(name="cl_egrsd", gate=dict(kind="linear", h_ref="log_vocab")),
    dict(name="opsd", opsd=dict(signal="sampled")),
    dict(name="opsd", opsd=dict(signal="reverse_kl")),
]


def _case_id(kw) -> str:
    return "-".join(f"{v}" if not isinstance(v, dict) else "-".join(map(str, v.values())) for v in kw.values())


@pytest.mark.parametrize("kw", CASES, ids=_case_id)
def test_token_advantages_match_reference(kw):
    cfg = cfg_of(**kw)
    adv, ls, lt, h, mask = make_batch(11)
    seg = torch.cumsum(torch.rand(mask.shape, generator=torch.Generator().manual_seed(2)) > 0.8, dim=1)
    got = token_advantages(adv, ls, lt, h, mask, cfg, vocab_size=500, segment_ids=seg)
    ref = ref_token_adv(adv, ls, lt, h, mask, cfg, vocab_size=500, seg=seg.numpy())
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-15)
    assert not got.requires_grad


def test_exact_reductions():
    """EGRSD with the gate off (tau = inf: phi = exp(-0) = 1) is RLSD bit for bit; with the ratio off too
    (eps_w = 0: rho clipped to exactly 1) it is GRPO."""
    adv, ls, lt, h, mask = make_batch(5, dtype=torch.float32)
    args = (adv, ls, lt, h, mask)
    rlsd = token_advantages(*args, cfg_of(name="rlsd"))
    no_gate = dict(tau=float("inf"))
    assert torch.equal(token_advantages(*args, cfg_of(name="egrsd", gate=no_gate)), rlsd)
    assert torch.equal(token_advantages(*args, cfg_of(name="cl_egrsd", gate=no_gate)), rlsd)
    grpo = token_advantages(adv, None, None, None, mask, cfg_of(name="grpo"))
    assert torch.equal(token_advantages(*args, cfg_of(name="egrsd", gate=no_gate, ratio=dict(eps_w=0.0))), grpo)
    assert torch.equal(token_advantages(*args, cfg_of(name="rlsd", ratio=dict(lam=0.0))), grpo)
    assert torch.equal(grpo, torch.where(mask, adv[:, None].expand_as(ls), torch.zeros_like(ls)))
    # and the losses (and their gradients) agree too
    losses = []
    for c in (cfg_of(name="egrsd", gate=no_gate, ratio=dict(eps_w=0.0)), cfg_of(name="grpo")):
        lsg = ls.clone().requires_grad_()
        ta = token_advantages(adv, lsg, lt, h, mask, c)
        loss, _ = policy_loss(lsg, ls - 0.1, ta, mask, c)
        loss.backward()
        losses.append((loss.detach(), lsg.grad))
    assert torch.equal(losses[0][0], losses[1][0]) and torch.equal(losses[0][1], losses[1][1])


def test_token_advantages_requires_inputs_by_name():
    adv, ls, lt, h, mask = make_batch(1)
    with pytest.raises(ValueError, match="teacher_entropy is required for loss.name=egrsd"):
        token_advantages(adv, ls, lt, None, mask, cfg_of(name="egrsd"))
    with pytest.raises(ValueError, match="teacher_logprob is required for loss.name=rlsd"):
        token_advantages(adv, ls, None, None, mask, cfg_of(name="rlsd"))
    with pytest.raises(ValueError, match=r"advantages: expected shape \(6,\)"):
        token_advantages(adv[:3], ls, lt, h, mask, cfg_of(name="grpo"))
    with pytest.raises(ValueError, match=r"student_logprob: expected shape \(6, 12\)"):
        token_advantages(adv, ls[:, :5], lt, h, mask, cfg_of(name="rlsd"))


def test_token_advantage_metrics_by_hand():
    cfg = cfg_of(name="egrsd", ratio=dict(eps_w=0.2), gate=dict(g_min=0.2))
    adv = torch.tensor([1.0, 0.0], dtype=F64)
    ls = torch.zeros(2, 4, dtype=F64)
    lt = torch.tensor([[0.5, -0.5, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=F64)  # rho: clip hi, clip lo, e^.1
    h = torch.tensor([[0.0, 10.0, 1.0, 9.0], [2.0, 2.0, 2.0, 2.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    _, m = token_advantages(adv, ls, lt, h, mask, cfg, return_metrics=True)
    gates = [0.2 + 0.8 * math.exp(-v) for v in (0.0, 10.0, 1.0, 2.0, 2.0)]
    assert m["gate_mean"] == pytest.approx(sum(gates) / 5)
    assert m["gate_floor_frac"] == pytest.approx(1 / 5)  # only H = 10 (phi = 4.5e-5)
    assert m["ratio_weight_mean"] == pytest.approx((1.2 + 0.8 + math.exp(0.1)) / 3)
    assert m["ratio_clip_frac"] == pytest.approx(2 / 3)
    assert m["live_tokens"] == 3.0  # the A != 0 rollout's valid tokens
    assert m["teacher_entropy_mean"] == pytest.approx(15 / 5)
    assert m["teacher_entropy_p90"] == pytest.approx(float(np.quantile([0, 10, 1, 2, 2], 0.9)))
    assert all(isinstance(v, float) for v in m.values())


# ---------------------------------------------------------------- hypothesis properties
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 100_000),
    name=st.sampled_from(REWARD_NAMES),
    eps_w=st.floats(0.0, 0.95),
    g_min=st.floats(0.01, 0.99),
    lam=st.floats(0.0, 1.0),
    kind=st.sampled_from(["exp", "linear"]),
    scale=st.sampled_from([0.1, 1.0, 30.0]),
)
def test_sign_and_weight_bounds(seed, name, eps_w, g_min, lam, kind, scale):
    cfg = cfg_of(name=name, ratio=dict(eps_w=eps_w, lam=lam), gate=dict(g_min=g_min, kind=kind, h_ref="quantile:0.5"))
    adv, ls, lt, h, mask = make_batch(seed, dtype=torch.float32)
    adv[0] = 0.0
    ls, lt, h = ls * scale, lt * scale, h * scale
    got = token_advantages(adv, ls, lt, h, mask, cfg)
    a = adv[:, None].expand_as(got)
    live = mask & (a != 0)
    assert torch.equal(torch.sign(got[mask]), torch.sign(a[mask]))
    w = (got / torch.where(a == 0, torch.ones_like(a), a))[live]
    lo = (g_min if FAMILY[name].gate else 1.0) * (1 - eps_w if FAMILY[name].ratio else 1.0)
    assert (w >= lo * (1 - 1e-6)).all() and (w <= (1 + eps_w) * (1 + 1e-6)).all()
    assert (got[~mask] == 0).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 100_000),
    name=st.sampled_from(REWARD_NAMES + ["opsd"]),
    agg=st.sampled_from(["token_mean", "seq_mean_token_mean"]),
    kl_coef=st.sampled_from([0.0, 0.1]),
)
def test_masked_positions_contribute_nothing(seed, name, agg, kl_coef):
    """Garbage (nan, +-inf) at masked positions changes neither the loss nor any gradient, and the
    gradient there is exactly 0."""
    cfg = cfg_of(name=name, aggregation=agg, kl_coef=kl_coef)
    adv, ls, lt, h, mask = make_batch(seed)
    old = ls - 0.05
    ref = ls + 0.1

    def run(fill):
        def dirty(x, v):
            return torch.where(mask, x, torch.full_like(x, v))

        lsg = dirty(ls, fill).requires_grad_()
        ta = token_advantages(adv, lsg, dirty(lt, fill), dirty(h, fill), mask, cfg, segment_ids=None)
        loss, _ = policy_loss(lsg, dirty(old, -fill), ta, mask, cfg, ref_logprob=dirty(ref, fill))
        loss.backward()
        return loss.detach(), lsg.grad

    clean_loss, clean_grad = run(0.0)
    for fill in (float("nan"), float("inf"), -float("inf"), 1e30):
        loss, grad = run(fill)
        assert torch.equal(loss, clean_loss)
        assert torch.equal(grad, clean_grad)
        assert (grad[~mask] == 0).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 100_000),
    name=st.sampled_from(REWARD_NAMES),
    group=st.sampled_from([2, 3, 4]),
    reward=st.sampled_from([0.0, 1.0, 0.1, 0.7]),
)
def test_all_equal_reward_group_gives_exactly_zero_gradient(seed, name, group, reward):
    adv_rand, ls, lt, h, mask = make_batch(seed, b=2 * group)
    rewards = torch.cat([torch.full((group,), reward, dtype=F64), (adv_rand[group:] > 0).to(F64)])
    adv = group_advantages(rewards, group)
    cfg = cfg_of(name=name)
    lsg = ls.clone().requires_grad_()
    ta = token_advantages(adv, lsg, lt, h, mask, cfg)
    loss, _ = policy_loss(lsg, ls + 0.3 * torch.randn_like(ls), ta, mask, cfg)
    loss.backward()
    assert (adv[:group] == 0).all()
    assert (lsg.grad[:group] == 0).all()


# ---------------------------------------------------------------- policy loss: values and gradients
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_policy_loss_gradient_equals_hand_formula(agg, kl_coef):
    cfg = cfg_of(name="egrsd", aggregation=agg, kl_coef=kl_coef, clip=dict(eps_lo=0.2, eps_hi=0.28))
    adv, ls, lt, h, mask = make_batch(21, b=8, t=16)
    old = ls + torch.randn(ls.shape, generator=torch.Generator().manual_seed(3), dtype=F64) * 0.4  # many clip
    ref = ls + 0.2
    ta = token_advantages(adv, ls, lt, h, mask, cfg)
    lsg = ls.clone().requires_grad_()
    loss, met = policy_loss(lsg, old, ta, mask, cfg, ref_logprob=ref)
    loss.backward()
    ref_loss, ref_grad = ref_loss_and_grad(ls, old, ta, mask, cfg, ref=ref)
    assert float(loss.detach()) == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(lsg.grad.numpy(), ref_grad, rtol=1e-10, atol=1e-15)
    r = torch.exp(ls - old)
    clipped = mask & (((ta > 0) & (r > 1.28)) | ((ta < 0) & (r < 0.8)))
    assert 0 < clipped.sum() < mask.sum()
    assert met["ppo_clip_frac"] == pytest.approx(float(clipped.sum() / (mask & (ta != 0)).sum()))
    assert met["loss"] == pytest.approx(ref_loss)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_global_denominator_sums_microbatches_and_ranks(agg):
    """Split a batch into 2 'data-parallel ranks' x 2 micro-batches, each normalised by the GLOBAL count:
    the summed losses and accumulated gradients equal the whole-batch loss."""
    cfg = cfg_of(name="cl_egrsd", aggregation=agg)
    adv, ls, lt, h, mask = make_batch(8, b=8, t=10)
    mask[3] = False  # an empty response must not count as a sequence
    old = ls - 0.1
    ta = token_advantages(adv, ls, lt, h, mask, cfg)
    full = ls.clone().requires_grad_()
    loss_full, _ = policy_loss(full, old, ta, mask, cfg)
    loss_full.backward()
    denom = float(mask.sum()) if agg == "token_mean" else float(mask.any(1).sum())
    part = ls.clone().requires_grad_()
    total = 0.0
    for sl in (slice(0, 3), slice(3, 4), slice(4, 6), slice(6, 8)):
        lm, _ = policy_loss(part[sl], old[sl], ta[sl], mask[sl], cfg, denominator=torch.tensor(denom))
        lm.backward()
        total = total + lm.detach()
    assert float(total) == pytest.approx(float(loss_full), rel=1e-12)
    torch.testing.assert_close(part.grad, full.grad, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="denominator"):
        policy_loss(ls, old, ta, mask, cfg, denominator=0.0)


def test_opsd_signals():
    adv, ls, lt, h, mask = make_batch(4)
    # sampled: Ahat = sg(lT - lS), on-policy gradient of -sum Ahat r / N is -Ahat / N
    cfg = cfg_of(name="opsd", opsd=dict(signal="sampled"))
    lsg = ls.clone().requires_grad_()
    ta = token_advantages(None, lsg, lt, None, mask, cfg)
    loss, _ = policy_loss(lsg, None, ta, mask, cfg)
    loss.backward()
    n = mask.sum()
    torch.testing.assert_close(lsg.grad, torch.where(mask, -(lt - ls) / n, torch.zeros_like(ls)))
    assert float(loss) == pytest.approx(float(-((lt - ls) * mask).sum() / n))
    # reverse_kl: the loss is the masked mean of the per-token divergence, gradient flows into it
    cfg = cfg_of(name="opsd", opsd=dict(signal="reverse_kl"))
    kl = torch.rand(ls.shape, dtype=F64, requires_grad=True)
    ta = token_advantages(None, ls, lt, None, mask, cfg)
    assert (ta == 0).all()
    loss, met = policy_loss(ls, None, ta, mask, cfg, kl=kl)
    loss.backward()
    torch.testing.assert_close(kl.grad, mask.to(F64) / n)
    assert met["opsd_div_mean"] == pytest.approx(float((kl * mask).sum() / n))
    with pytest.raises(
        ValueError,
        match=r"kl is required for loss.name=opsd, whose loss is the per-token "
        r"divergence \('jsd', 0.5\)",
    ):
        policy_loss(ls, None, ta, mask, cfg_of(name="opsd", opsd=dict(signal="jsd")))
    with pytest.raises(ValueError, match="ref_logprob is required when loss.kl_coef"):
        policy_loss(ls, None, ta, mask, cfg_of(name="grpo", kl_coef=0.1))


def test_bf16_inputs_are_upcast():
    adv, ls, lt, h, mask = make_batch(9, dtype=torch.float32)
    cfg = cfg_of(name="cl_egrsd")
    ta32 = token_advantages(adv, ls, lt, h, mask, cfg)
    ta16 = token_advantages(adv.bfloat16(), ls.bfloat16(), lt.bfloat16(), h.bfloat16(), mask, cfg)
    assert ta16.dtype == torch.float32
    torch.testing.assert_close(ta16, ta32, rtol=0.05, atol=0.02)
    loss, _ = policy_loss(ls.bfloat16(), None, ta16, mask, cfg)
    assert loss.dtype == torch.float32


def test_divergence_kind_maps_opsd_signals():
    assert divergence_kind(cfg_of(name="opsd", opsd=dict(signal="reverse_kl"))) == "reverse"
    assert divergence_kind(cfg_of(name="opsd", opsd=dict(signal="jsd", beta=0.3))) == ("jsd", 0.3)
    assert divergence_kind(cfg_of(name="opsd", opsd=dict(signal="sampled"))) is None
    for name in REWARD_NAMES:  # the opsd section is read by opsd only
        assert divergence_kind(cfg_of(name=name, opsd=dict(signal="jsd"))) is None
