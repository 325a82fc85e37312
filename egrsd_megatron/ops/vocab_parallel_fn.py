"""The autograd Function behind `token_stats`: fused, chunked, vocabulary-parallel token statistics.

Notation (per token, one rank holds the columns [v0, v0 + V_local) of the vocabulary; `valid` of them are
real ids, the rest Megatron padding and never read):
    m      = max_v z_v                        (global, ONE all-reduce MAX for student and teacher together)
    d_v    = (z_v - m) / T <= 0,  e_v = exp(d_v)   (temperature T > 0: max_v z_v / T = m / T, so m is
                                                 shared; T = 1 skips the multiply: bitwise the T-free math)
    Z      = sum_v e_v,     A = sum_v e_v d_v  (shifted sums: no cancellation for |z| ~ 1e4)
    log p(y) = d_y - log Z,                    H = log Z - A / Z
    reverse KL(pS||pT) = D / ZS - log ZS + log ZT,  D = sum_v eS_v (dS_v - dT_v)
    forward KL(pT||pS) = D'/ ZT - log ZT + log ZS,  D'= sum_v eT_v (dT_v - dS_v)
  ZS, ZT, AT, dS_y, dT_y (+ AS, D when asked) are stacked into one [k, n] tensor: ONE all-reduce SUM.
  D is summed directly rather than as AS - B: when pS ~ pT the difference of two large sums would cancel.
Generalized JSD (arXiv 2601.18734, GKD convention with the teacher weighted by beta):
    M = beta pT + (1 - beta) pS,   JSD_beta = beta KL(pT||M) + (1 - beta) KL(pS||M)
    KL(pT||M) = -HT - sum pT log M,  KL(pS||M) = -HS - sum pS log M
  log M needs the global normalizers, so sum pT log M and sum pS log M take a THIRD all-reduce SUM.

Teacher entropy at its own T_H (spec.entropy_inv_t, only when T_H != T): ZH = sum exp(d'/T_H),
AH = (1/T_H) sum exp(d'/T_H) d' with d' = zT - m, two more rows of the same all-reduce SUM; H = log ZH - AH/ZH.

Backward uses no collective: it recomputes log pS = (zS - m) / T - log Z (m, log Z saved per token) block by
block and applies, for upstream weights g,
    d log pS(y) / dz = onehot(y) - pS
    d HS / dz        = -pS (log pS + HS)
    d KL(S||T) / dz  = pS (log pS - log pT - KL(S||T))
    d KL(T||S) / dz  = pS - pT
    d JSD_beta / dz  = (1 - beta) pS (log pS - log M - KL(S||M))
written as  grad = pS * (a log pS + b X + c) [- g_fwd pT] [+ g_lp onehot]  with X = log pT or log M.
These are derivatives in u = z / T; d/dz = (1 / T) d/du, applied by scaling the upstream weights g by 1 / T.

Memory (`inplace_grad`, token_stats(inplace_backward=True)): the backward writes the gradient into the
saved student logits themselves, row block by row block, so the step never holds the logits and their
gradient at once. The caller must not read the logits after the backward (the trainer's student pass gathers
them into a fresh tensor that only this call holds).

Memory: fp32 work happens in row blocks of at most `block_rows` x `valid` elements: three such buffers
(student, teacher, one shared exp/scratch) are allocated once per call and reused; the inputs are
read in their own dtype (bf16 stays bf16) and upcast one block at a time. The backward saves only the input
logits (teacher only when a KL needs it) and a few fp32 numbers per token.

GPU: only plain torch ops and torch.distributed.all_reduce, so CUDA/NCCL should work unchanged, but this
has only been run on CPU/gloo: CUDA correctness, speed and the CUDA block size are unverified. On GPU,
check_finite costs one host sync per chunk (the only sync; the backward has none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

# -inf entries are clamped to this after the target gather: exp(_NEG) == 0 exactly and 0 * _NEG == 0,
# whereas 0 * -inf would turn the sums into NaN.
_NEG = torch.finfo(torch.float32).min


class NonFiniteLogitsError(ValueError):
    """A logit is NaN or +inf, or every logit of a token is -inf."""


@dataclass(frozen=True)
class FnSpec:
    group: Optional[dist.ProcessGroup]  # None: one process holds the whole vocabulary
    vocab_start: int  # global id of local column 0
    valid: int  # local columns that hold real ids (the rest is padding)
    chunk: int  # tokens per collective round
    block_rows: int  # rows per fp32 work block (<= chunk)
    student_entropy: bool
    kl: Optional[str]  # None | "reverse" | "forward" | "jsd"
    beta: float  # JSD weight of the teacher
    check_finite: bool
    inv_t: float = 1.0  # 1 / T: every statistic is of softmax(z / T)
    # 1 / T_H for the teacher entropy output; None: T_H = T (same sums, no extra work).
    entropy_inv_t: Optional[float] = None
    # One-distribution mode (`token_stats_one`): only the student input is read; outputs log p(y) (with
    # gradient) and, when `single_entropy`, H(p) at T_H (no gradient). No teacher half is computed.
    single: bool = False
    single_entropy: bool = False
    # The backward writes the gradient into the student logits' own storage (as Megatron's vocab-parallel
    # cross-entropy reuses its saved buffer): no second [N, V_local] tensor while the logits are saved.
    inplace_grad: bool = False


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: Optional[dist.ProcessGroup]) -> None:
    if group is not None:
        # Looked up on the module at call time so tests can count the calls.
        dist.all_reduce(t, op=op, group=group)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a[i, v] b[i, v] as a batched GEMV: no [rows, V] product temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _spans(n: int, size: int):
    for s in range(0, n, size):
        yield s, min(n, s + size)


def _target_index(y: torch.Tensor, spec: FnSpec) -> Tuple[torch.Tensor, torch.Tensor]:
    """Local column of each target (clamped into range) and whether this rank owns it."""
    local = y - spec.vocab_start
    owned = (local >= 0) & (local < spec.valid)
    return local.clamp(0, max(spec.valid - 1, 0)), owned


def _gather_owned(d: torch.Tensor, local: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    v = d.gather(1, local.unsqueeze(1)).squeeze(1)
    return torch.where(owned, v, torch.zeros_like(v))


def _check_max(mx: torch.Tensor, offset: int, names: Tuple[str, ...] = ("student_logits", "teacher_logits")) -> None:
    """mx: [k, n] global maxima of the inputs `names` (NaN was mapped to +inf before the MAX, so every rank
    sees it)."""
    bad = ~torch.isfinite(mx)
    if not bool(bad.any()):
        return
    which, col = (int(i) for i in bad.nonzero()[0])
    name = names[which]
    token = offset + col
    if mx[which, col] > 0:
        raise NonFiniteLogitsError(
            f"{name} holds a NaN or +inf logit at token index {token} (flattened over the leading dims; "
            f"first bad token): fix the model output (overflow? bad mask value?) or pass check_finite=False"
        )
    raise NonFiniteLogitsError(
        f"{name}: every logit of token index {token} (flattened) is -inf or a padded column, so its "
        f"distribution is undefined: mask such tokens out before token_stats or pass check_finite=False"
    )


class _Buffers:
    """Three fp32 [block_rows, valid] work buffers, allocated once per call and reused by every block."""

    def __init__(self, rows: int, cols: int, device: torch.device, need_teacher: bool = True) -> None:
        mk = lambda: torch.empty(rows, cols, dtype=torch.float32, device=device)  # noqa: E731
        self.s, self.e = mk(), mk()
        self.t = mk() if need_teacher else None


def _forward_chunk(
    zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, offset: int, spec: FnSpec, buf: _Buffers
) -> dict:
    """Statistics of one chunk of tokens. zs, zt: [n, valid] views of the inputs (any float dtype)."""
    n, valid, group = zs.shape[0], spec.valid, spec.group
    dev = zs.device
    # --- collective 1: the global max of student and teacher, stacked --------------------------------
    if valid > 0:
        mx = torch.stack([zs.amax(-1), zt.amax(-1)]).float()
    else:
        mx = torch.full((2, n), -math.inf, device=dev)
    if spec.check_finite:
        # amax propagates NaN; as +inf it survives the MAX on every rank, so all ranks raise together.
        mx = torch.where(torch.isnan(mx), torch.full_like(mx, math.inf), mx)
    _all_reduce(mx, dist.ReduceOp.MAX, group)
    if spec.check_finite:
        _check_max(mx, offset)
    m_s, m_t = mx[0], mx[1]

    # --- local shifted sums, one row block at a time ---------------------------------------------------
    need_as = spec.student_entropy or spec.kl == "jsd"
    need_d = spec.kl in ("reverse", "forward")
    inv_t = spec.inv_t
    scaled = inv_t != 1.0  # T = 1 runs exactly the T-free operations (bitwise the pre-temperature kernel)
    sep_h = spec.entropy_inv_t is not None
    inv_h = spec.entropy_inv_t if sep_h else inv_t
    names = (
        ["zs", "zt", "at", "ys", "yt"]
        + (["as"] if need_as else [])
        + (["d"] if need_d else [])
        + (["zh", "ah"] if sep_h else [])
    )
    row = {k: i for i, k in enumerate(names)}
    sums = torch.zeros(len(names), n, dtype=torch.float32, device=dev)
    local, owned = _target_index(y, spec)
    if valid > 0:
        for r0, r1 in _spans(n, spec.block_rows):
            r = r1 - r0
            ds = buf.s[:r].copy_(zs[r0:r1]).sub_(m_s[r0:r1, None])
            dt = buf.t[:r].copy_(zt[r0:r1]).sub_(m_t[r0:r1, None])
            if scaled:  # d = (z - m) / T in place: max(z / T) = m / T for T > 0, so m itself is reused
                ds.mul_(inv_t)
            sums[row["ys"], r0:r1] = _gather_owned(ds, local[r0:r1], owned[r0:r1])
            # Gathered before any clamp (a -inf target keeps log p = -inf), scaled like dt would be.
            yt = _gather_owned(dt, local[r0:r1], owned[r0:r1])
            sums[row["yt"], r0:r1] = yt.mul_(inv_t) if scaled else yt
            if sep_h:
                # Teacher entropy at T_H from the unscaled d (clamped: 0 * _NEG = 0), before dt is scaled:
                # A_H = sum e^{d / T_H} (d / T_H) = (1 / T_H) sum e^{d / T_H} d.
                dt.clamp_(min=_NEG)
                e = torch.mul(dt, inv_h, out=buf.e[:r]).exp_()
                sums[row["zh"], r0:r1] = e.sum(-1)
                sums[row["ah"], r0:r1] = _rowdot(e, dt).mul_(inv_h)
            if scaled:
                dt.mul_(inv_t)
            if need_as or need_d:  # ds enters a product with e below; alone it only feeds exp()
                ds.clamp_(min=_NEG)
            dt.clamp_(min=_NEG)  # also catches (_NEG / T) = -inf for T < 1
            e = buf.e[:r]
            if spec.kl == "forward":
                # Teacher first, then the teacher buffer becomes dT - dS (both in [_NEG, 0]: no overflow).
                torch.exp(dt, out=e)
                sums[row["zt"], r0:r1] = e.sum(-1)
                sums[row["at"], r0:r1] = _rowdot(e, dt)
                sums[row["d"], r0:r1] = _rowdot(e, dt.sub_(ds))
                torch.exp(ds, out=e)
                sums[row["zs"], r0:r1] = e.sum(-1)
                if need_as:
                    sums[row["as"], r0:r1] = _rowdot(e, ds)
            else:
                torch.exp(ds, out=e)
                sums[row["zs"], r0:r1] = e.sum(-1)
                if need_as:
                    sums[row["as"], r0:r1] = _rowdot(e, ds)
                if spec.kl == "reverse":
                    sums[row["d"], r0:r1] = _rowdot(e, ds.sub_(dt))
                torch.exp(dt, out=e)
                sums[row["zt"], r0:r1] = e.sum(-1)
                sums[row["at"], r0:r1] = _rowdot(e, dt)
    # --- collective 2: every sum at once -----------------------------------------------------------------
    _all_reduce(sums, dist.ReduceOp.SUM, group)
    g = {k: sums[i] for k, i in row.items()}
    log_zs, log_zt = g["zs"].log(), g["zt"].log()
    # m and log Z stay separate: m + log Z rounded to fp32 at |m| ~ 1e4 would lose ~1e-3 of log p in backward.
    out = {
        "ls": g["ys"] - log_zs,
        "lt": g["yt"] - log_zt,
        "ht": log_zt - g["at"] / g["zt"],  # at T: the JSD below needs this one
        "m_s": m_s,
        "logz_s": log_zs,
        "m_t": m_t,
        "logz_t": log_zt,
    }
    out["ht_out"] = g["zh"].log() - g["ah"] / g["zh"] if sep_h else out["ht"]
    if need_as:
        out["hs"] = log_zs - g["as"] / g["zs"]
    if spec.kl == "reverse":
        out["kl"] = g["d"] / g["zs"] - log_zs + log_zt
    elif spec.kl == "forward":
        out["kl"] = g["d"] / g["zt"] - log_zt + log_zs
    elif spec.kl == "jsd":
        out.update(_jsd_chunk(zs, zt, out, spec, buf))
    return out


def _forward_chunk_single(z: torch.Tensor, y: torch.Tensor, offset: int, spec: FnSpec, buf: _Buffers) -> dict:
    """One distribution: log p(y) and (if spec.single_entropy) H(p at T_H) of one chunk; z: [n, valid].

    The student half of `_forward_chunk` with the same operations in the same order (so log p(y) is bitwise
    what token_stats(z, z', y) returns for it), the teacher entropy's sums taken from the same d:
    collective 1 is a [1, n] MAX, collective 2 a [2-4, n] SUM (Z, d_y, and A or Z_H, A_H for the entropy).
    """
    n, valid, group = z.shape[0], spec.valid, spec.group
    dev = z.device
    mx = z.amax(-1).float()[None] if valid > 0 else torch.full((1, n), -math.inf, device=dev)
    if spec.check_finite:
        mx = torch.where(torch.isnan(mx), torch.full_like(mx, math.inf), mx)
    _all_reduce(mx, dist.ReduceOp.MAX, group)
    if spec.check_finite:
        _check_max(mx, offset, ("logits",))
    m = mx[0]
    inv_t = spec.inv_t
    scaled = inv_t != 1.0
    sep_h = spec.single_entropy and spec.entropy_inv_t is not None
    names = ["z", "y"] + (["zh", "ah"] if sep_h else ["a"] if spec.single_entropy else [])
    row = {k: i for i, k in enumerate(names)}
    sums = torch.zeros(len(names), n, dtype=torch.float32, device=dev)
    local, owned = _target_index(y, spec)
    if valid > 0:
        for r0, r1 in _spans(n, spec.block_rows):
            r = r1 - r0
            d = buf.s[:r].copy_(z[r0:r1]).sub_(m[r0:r1, None])
            e = buf.e[:r]
            if sep_h:  # H at T_H from the unscaled d, as _forward_chunk does for the teacher
                dh = buf.t[:r].copy_(d).clamp_(min=_NEG)
                torch.mul(dh, spec.entropy_inv_t, out=e).exp_()
                sums[row["zh"], r0:r1] = e.sum(-1)
                sums[row["ah"], r0:r1] = _rowdot(e, dh).mul_(spec.entropy_inv_t)
            if scaled:
                d.mul_(inv_t)
            sums[row["y"], r0:r1] = _gather_owned(d, local[r0:r1], owned[r0:r1])
            if spec.single_entropy and not sep_h:
                d.clamp_(min=_NEG)  # d enters a product with e below (0 * _NEG = 0)
            torch.exp(d, out=e)
            sums[row["z"], r0:r1] = e.sum(-1)
            if spec.single_entropy and not sep_h:
                sums[row["a"], r0:r1] = _rowdot(e, d)
    _all_reduce(sums, dist.ReduceOp.SUM, group)
    g = {k: sums[i] for k, i in row.items()}
    log_z = g["z"].log()
    out = {"ls": g["y"] - log_z, "m_s": m, "logz_s": log_z}
    if sep_h:
        out["h"] = g["zh"].log() - g["ah"] / g["zh"]
    elif spec.single_entropy:
        out["h"] = log_z - g["a"] / g["z"]
    return out


def _log_probs(
    out: torch.Tensor, z: torch.Tensor, m: torch.Tensor, log_z: torch.Tensor, inv_t: float = 1.0
) -> torch.Tensor:
    """out = (z - m) / T - log Z in fp32: z - m is exact near the max, and log Z is small."""
    out.copy_(z).sub_(m[:, None])
    if inv_t != 1.0:
        out.mul_(inv_t)
    return out.sub_(log_z[:, None])


def _log_mixture_(lt: torch.Tensor, ls: torch.Tensor, beta: float) -> torch.Tensor:
    """In place on lt: log(beta pT + (1 - beta) pS) from log pT (lt) and log pS (ls), both clamped.

    logaddexp(lt + log b, ls + log(1-b)) = logaddexp(lt + log b - log(1-b), ls) + log(1-b): no temporary.
    """
    lb, l1b = math.log(beta), math.log1p(-beta)
    lt.add_(lb - l1b)
    torch.logaddexp(lt, ls, out=lt)
    return lt.add_(l1b)


def _jsd_chunk(zs: torch.Tensor, zt: torch.Tensor, st: dict, spec: FnSpec, buf: _Buffers) -> dict:
    """Third pass for JSD_beta (needs log Z from the second collective): sum p log M; collective 3."""
    n, dev = zs.shape[0], zs.device
    plm = torch.zeros(2, n, dtype=torch.float32, device=dev)  # [sum pT log M, sum pS log M]
    if spec.valid > 0:
        for r0, r1 in _spans(n, spec.block_rows):
            r = r1 - r0
            ls = _log_probs(buf.s[:r], zs[r0:r1], st["m_s"][r0:r1], st["logz_s"][r0:r1], spec.inv_t).clamp_(min=_NEG)
            lt = _log_probs(buf.t[:r], zt[r0:r1], st["m_t"][r0:r1], st["logz_t"][r0:r1], spec.inv_t).clamp_(min=_NEG)
            lm = _log_mixture_(buf.e[:r].copy_(lt), ls, spec.beta)
            plm[0, r0:r1] = _rowdot(lt.exp_(), lm)
            plm[1, r0:r1] = _rowdot(ls.exp_(), lm)
    _all_reduce(plm, dist.ReduceOp.SUM, spec.group)
    kl_tm = -st["ht"] - plm[0]
    kl_sm = -st["hs"] - plm[1]
    return {"kl": spec.beta * kl_tm + (1.0 - spec.beta) * kl_sm, "kl_sm": kl_sm}


def _add_onehot(p: torch.Tensor, owned: torch.Tensor, local: torch.Tensor, g: torch.Tensor) -> None:
    """p[i, y_i] += g_i for the rows whose target lives on this rank (others add 0: no host sync)."""
    rows = torch.arange(p.shape[0], device=p.device)
    p.index_put_((rows, local), torch.where(owned, g, torch.zeros_like(g)), accumulate=True)


# Order of the per-token statistics saved for backward.
_SAVED = ("m_s", "logz_s", "m_t", "logz_t", "hs", "kl", "kl_sm")


def _forward_single(ctx, z: torch.Tensor, targets: torch.Tensor, spec: FnSpec, empty) -> Tuple[torch.Tensor, ...]:
    """TokenStatsFunction.forward in the one-distribution mode: (log p(y), empty, H or empty, empty, empty).

    Saves what the log-prob-only backward reads (the logits, m and log Z per token); the backward below is
    shared, and with no entropy or KL gradient it is the same arithmetic as the two-distribution call's."""
    buf = _Buffers(
        min(spec.block_rows, max(z.shape[0], 1)),
        spec.valid,
        z.device,
        need_teacher=spec.single_entropy and spec.entropy_inv_t is not None,
    )
    zv = z[:, : spec.valid]
    pieces = [
        _forward_chunk_single(zv[c0:c1], targets[c0:c1], c0, spec, buf) for c0, c1 in _spans(z.shape[0], spec.chunk)
    ]
    del buf
    cat = {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
    h = cat["h"] if spec.single_entropy else empty()
    saved = [cat[k] if k in cat else empty() for k in _SAVED]
    ctx.save_for_backward(z, None, targets, *saved)
    ctx.spec = spec
    rest = (empty(), h, empty(), empty())
    ctx.mark_non_differentiable(*rest)
    ctx.set_materialize_grads(False)
    return (cat["ls"],) + rest


class TokenStatsFunction(torch.autograd.Function):
    """Inputs are 2-D [N, V_local]; outputs five fp32 [N] tensors (unrequested ones are empty [0])."""

    @staticmethod
    def forward(
        ctx,
        student: torch.Tensor,
        teacher: torch.Tensor,
        targets: torch.Tensor,  # type: ignore[override]
        spec: FnSpec,
    ) -> Tuple[torch.Tensor, ...]:
        n_tok, dev = student.shape[0], student.device
        empty = lambda: torch.empty(0, dtype=torch.float32, device=dev)  # noqa: E731 - distinct objects
        if spec.single:
            return _forward_single(ctx, student, targets, spec, empty)
        zs_all, zt_all = student[:, : spec.valid], teacher[:, : spec.valid]
        buf = _Buffers(min(spec.block_rows, max(n_tok, 1)), spec.valid, dev)
        pieces: List[dict] = []
        for c0, c1 in _spans(n_tok, spec.chunk):
            pieces.append(_forward_chunk(zs_all[c0:c1], zt_all[c0:c1], targets[c0:c1], c0, spec, buf))
        del buf
        cat = {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
        hs = cat["hs"] if spec.student_entropy else empty()
        kl = cat["kl"] if spec.kl else empty()
        saved = [cat[k] if k in cat else empty() for k in _SAVED]
        ctx.save_for_backward(student, teacher if spec.kl else None, targets, *saved)
        ctx.spec = spec
        ctx.mark_non_differentiable(cat["lt"], cat["ht_out"])
        if not spec.student_entropy:
            ctx.mark_non_differentiable(hs)
        if not spec.kl:
            ctx.mark_non_differentiable(kl)
        ctx.set_materialize_grads(False)
        return cat["ls"], cat["lt"], cat["ht_out"], hs, kl

    @staticmethod
    def backward(ctx, g_ls, g_lt, g_ht, g_hs, g_kl):  # type: ignore[override]
        spec: FnSpec = ctx.spec
        student, teacher, targets, m_s, logz_s, m_t, logz_t, hs, kl, kl_sm = ctx.saved_tensors
        none = (None, None, None)
        if not ctx.needs_input_grad[0] or (g_ls is None and g_hs is None and g_kl is None):
            return (None,) + none
        n_tok, v_local = student.shape
        # In place: every row block below reads its student (and teacher) rows before it writes their
        # gradient, and no block reads another's rows, so the saved logits can take the gradient (the
        # padded columns, zeroed first, are never read).
        grad = student if spec.inplace_grad else torch.empty_like(student)
        if spec.valid < v_local:
            grad[:, spec.valid :].zero_()  # padded columns carry no probability, hence no gradient
        if spec.valid == 0:
            return (grad,) + none
        dev = student.device
        buf = _Buffers(min(spec.block_rows, n_tok), spec.valid, dev, need_teacher=spec.kl is not None)
        zeros = torch.zeros(n_tok, dtype=torch.float32, device=dev)
        g_ls = zeros if g_ls is None else g_ls.float()
        g_hs = zeros if g_hs is None else g_hs.float()
        g_kl = zeros if g_kl is None else g_kl.float()
        inv_t = spec.inv_t
        if inv_t != 1.0:
            # Every statistic is a function of u = z / T, so d/dz = (1 / T) d/du; the gradient below is
            # linear in (g_ls, g_hs, g_kl), so the 1 / T rides on them.
            g_ls, g_hs, g_kl = g_ls * inv_t, g_hs * inv_t, g_kl * inv_t
        if spec.kl == "jsd":
            g_kl = g_kl * (1.0 - spec.beta)
        # Per-token coefficients of grad = pS * (a log pS + b X + c): see the module docstring.
        a = -g_hs
        c = -g_ls - g_hs * (hs if spec.student_entropy else zeros)
        b = None
        if spec.kl in ("reverse", "jsd"):
            a = a + g_kl
            b = -g_kl
            c = c - g_kl * (kl if spec.kl == "reverse" else kl_sm)
        elif spec.kl == "forward":
            c = c + g_kl
        # Entropy / reverse KL / JSD need the full bracket a log pS + b X + c; otherwise a is 0.
        full = spec.student_entropy or spec.kl in ("reverse", "jsd")
        c_over_z = c * torch.exp(-logz_s)
        local, owned = _target_index(targets, spec)
        zs_all = student[:, : spec.valid]
        zt_all = teacher[:, : spec.valid] if teacher is not None else None
        # Blocks only bound the fp32 work memory here: nothing is communicated in backward.
        for r0, r1 in _spans(n_tok, spec.block_rows):
            r = r1 - r0
            x = None
            if not full:
                # log-prob (and forward KL) only: grad = pS * c [- g_fwd pT] + g_lp onehot, and
                # pS * c = exp(z - m) * (c / Z): the 1/Z rides on the per-token coefficient.
                d = buf.e[:r].copy_(zs_all[r0:r1]).sub_(m_s[r0:r1, None])
                p = torch.exp(d.mul_(inv_t) if inv_t != 1.0 else d, out=buf.e[:r])
                p.mul_(c_over_z[r0:r1, None])
                if spec.kl == "forward":
                    x = _log_probs(buf.t[:r], zt_all[r0:r1], m_t[r0:r1], logz_t[r0:r1], inv_t).exp_()
                    p.addcmul_(x, g_kl[r0:r1, None], value=-1.0)
                _add_onehot(p, owned[r0:r1], local[r0:r1], g_ls[r0:r1])
                grad[r0:r1, : spec.valid].copy_(p)
                continue
            lp = _log_probs(buf.s[:r], zs_all[r0:r1], m_s[r0:r1], logz_s[r0:r1], inv_t)
            p = torch.exp(lp, out=buf.e[:r])
            lp.clamp_(min=_NEG)  # where p == 0: keeps 0 * log p finite below
            if spec.kl is not None:
                x = _log_probs(buf.t[:r], zt_all[r0:r1], m_t[r0:r1], logz_t[r0:r1], inv_t)
                if spec.kl == "forward":
                    x.exp_()  # pT
                else:
                    x.clamp_(min=_NEG)
                    if spec.kl == "jsd":
                        _log_mixture_(x, lp, spec.beta)
            bracket = lp.mul_(a[r0:r1, None])
            if b is not None:
                bracket.addcmul_(x, b[r0:r1, None])
            bracket.add_(c[r0:r1, None])
            p.mul_(bracket)
            # 0 * inf where pS underflowed to 0: the true product is 0 (genuine infinities are kept).
            p.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
            if spec.kl == "forward":
                p.addcmul_(x, g_kl[r0:r1, None], value=-1.0)
            _add_onehot(p, owned[r0:r1], local[r0:r1], g_ls[r0:r1])
            grad[r0:r1, : spec.valid].copy_(p)
        return (grad,) + none
