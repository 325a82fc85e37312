"""`egrsd inspect`: one sampled rollout's tokens coloured by teacher entropy, gate weight and lookahead lift.

Reads the per-token fields of a samples.jsonl record (trainer/sample_fields.py owns them; the trainer writes
them every train.sample_every steps; R = number of response tokens, t = 0..R-1 indexes the response):

    tokens             [str]    R  token t's text, decoded on its own (their concatenation is the response)
    teacher_entropy    [float]  R  H_t, the teacher's entropy (nats) of its distribution over token t
    gate               [float]  R  g(H_t): EGRSD's gate weight at t (in [g_min, 1]), the run's gate settings
    lookahead_entropy  [float]  R  H^CL_t = min(H_t, F_t), F_t = the lookahead statistic of H over t+1..t+k
    gate_lookahead     [float]  R  g(H^CL_t): CL-EGRSD's gate weight at t

The last two are optional (without them the lift view is left out). lift_t = g(H^CL_t) - g(H_t) >= 0 is
what the lookahead gives back: large where a transient spike of teacher uncertainty is resolved within
the next k tokens (CL-EGRSD forgives it), ~0 where the uncertainty is sustained (both gates agree).
Record-level fields used when present: step, reward, advantage, truncated, prompt, answer.

Output: a PNG (three coloured token panels + the per-position curves) and an HTML page (the same colours,
values on hover).
"""

from __future__ import annotations

import html
import json
import math
import os
from typing import Any, Dict, List, Optional, Tuple

from ..trainer.sample_fields import OPTIONAL_FIELDS as OPTIONAL
from ..trainer.sample_fields import REQUIRED_FIELDS as REQUIRED
from ..utils import atomic_write_text

CHARS_PER_LINE = 110
FONT_PT = 8.5
# DejaVu Sans Mono (shipped with matplotlib): every glyph advances 0.602 em.
MONO_ADVANCE = 0.602


class SamplesError(ValueError):
    pass


def read_samples_file(path: str) -> List[Dict[str, Any]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no samples file (the trainer writes samples.jsonl every train.sample_every steps)"
        )
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise SamplesError(f"{path} line {n}: not JSON ({e})") from e
                rec["_line"] = n
                out.append(rec)
    return out


def check_record(rec: Dict[str, Any], where: str) -> Dict[str, List[Any]]:
    """The per-token arrays of a record, checked: same length, numbers finite."""
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        raise SamplesError(
            f"{where}: no per-token field(s) {', '.join(missing)}; inspect needs {', '.join(REQUIRED)} "
            f"(+ {', '.join(OPTIONAL)}) in samples.jsonl, written by the trainer"
        )
    arrays = {k: rec[k] for k in REQUIRED + OPTIONAL if k in rec}
    n = len(arrays["tokens"])
    for k, v in arrays.items():
        if not isinstance(v, list) or len(v) != n:
            raise SamplesError(
                f"{where}: field '{k}' must be a list of {n} values (one per token), "
                f"got {len(v) if isinstance(v, list) else type(v).__name__}"
            )
        if k != "tokens" and not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v):
            raise SamplesError(f"{where}: field '{k}' holds a non-finite or non-numeric value")
    if n == 0:
        raise SamplesError(f"{where}: the rollout has no tokens")
    return arrays


def lift(arrays: Dict[str, List[Any]]) -> Optional[List[float]]:
    if "gate_lookahead" not in arrays:
        return None
    return [float(c) - float(g) for c, g in zip(arrays["gate_lookahead"], arrays["gate"])]


def select(records: List[Dict[str, Any]], path: str, step: Optional[int], rollout: Optional[int]) -> Dict[str, Any]:
    """The record to draw: of `step` (all when None), the `rollout`-th; by default the one with the most lift."""
    recs = records
    if step is not None:
        recs = [r for r in records if r.get("step") == step]
        if not recs:
            steps = sorted({r.get("step") for r in records if isinstance(r.get("step"), int)})
            raise SamplesError(
                f"{path}: no rollouts of step {step}; steps with samples: {', '.join(map(str, steps)) or 'none'}"
            )
    if rollout is not None:
        if not 0 <= rollout < len(recs):
            raise SamplesError(f"{path}: --rollout {rollout} out of range: step {step} has {len(recs)} rollouts")
        return recs[rollout]
    scored = []
    for i, r in enumerate(recs):
        a = check_record(r, f"{path} line {r['_line']}")
        lf = lift(a)
        scored.append((sum(lf) if lf else 0.0, -i))
    return recs[-max(scored)[1]]


def _display(tok: str) -> Tuple[str, bool]:
    """(text drawn for a token, whether a line break follows it)."""
    brk = "\n" in tok
    s = tok.replace("\n", "\u21b5").replace("\t", " ").replace("\r", "")
    return (s if s else "\u00b7"), brk


def layout(tokens: List[str], width: int = CHARS_PER_LINE) -> List[Tuple[int, int, str]]:
    """(line, column, text) per token in a monospace grid `width` characters wide; wraps before a token
    that would cross the edge, and after a token holding a newline."""
    out, line, col = [], 0, 0
    for tok in tokens:
        s, brk = _display(tok)
        s = s[:width]
        if col + len(s) > width and col > 0:
            line, col = line + 1, 0
        out.append((line, col, s))
        col += len(s)
        if brk:
            line, col = line + 1, 0
    return out


def _views(arrays: Dict[str, List[Any]]) -> List[Tuple[str, List[float], str, float, float]]:
    """(title, values, colormap, vmin, vmax) per coloured panel."""
    h = [float(x) for x in arrays["teacher_entropy"]]
    views = [
        ("teacher entropy H_t (nats)", h, "magma_r", 0.0, max(max(h), 1e-6)),
        ("gate weight g(H_t) (EGRSD)", [float(x) for x in arrays["gate"]], "RdYlGn", 0.0, 1.0),
    ]
    lf = lift(arrays)
    if lf is not None:
        views.append(
            ("lookahead lift g(H^CL_t) - g(H_t) (what CL-EGRSD forgives)", lf, "Blues", 0.0, max(max(lf), 1e-6))
        )
    return views


def _header(rec: Dict[str, Any]) -> str:
    bits = [f"step {rec.get('step', '?')}"]
    for k in ("reward", "advantage"):
        if isinstance(rec.get(k), (int, float)):
            bits.append(f"{k} {rec[k]:+.3f}")
    if rec.get("truncated"):
        bits.append("truncated")
    if rec.get("answer") is not None:
        bits.append(f"reference answer {rec['answer']}")
    return ", ".join(bits)


def render_png(rec: Dict[str, Any], arrays: Dict[str, List[Any]], out: str) -> str:
    from matplotlib.patches import Rectangle

    from ..eval.plots import pyplot, save

    plt = pyplot()
    cells = layout(arrays["tokens"])
    nlines = cells[-1][0] + 1
    views = _views(arrays)
    char_in = FONT_PT * MONO_ADVANCE / 72
    text_w = CHARS_PER_LINE * char_in
    line_in = FONT_PT * 1.55 / 72
    panel_h = nlines * line_in + 0.45
    curve_h = 2.2
    fig_w = text_w + 1.6
    fig_h = len(views) * panel_h + curve_h + 0.9
    fig = plt.figure(figsize=(fig_w, fig_h))
    fig.suptitle(_header(rec), fontsize=10, x=0.02, ha="left")
    y_top = fig_h - 0.55
    for title, vals, cmap_name, vmin, vmax in views:
        y0 = y_top - panel_h
        ax = fig.add_axes((0.25 / fig_w, (y0 + 0.05) / fig_h, text_w / fig_w, (panel_h - 0.35) / fig_h))
        cmap = plt.get_cmap(cmap_name)
        for (line, col, s), v in zip(cells, vals):
            frac = 0.0 if vmax <= vmin else min(max((v - vmin) / (vmax - vmin), 0.0), 1.0)
            ax.add_patch(Rectangle((col, line), len(s), 1.0, facecolor=cmap(frac), edgecolor="white", linewidth=0.3))
            ax.text(
                col + 0.05,
                line + 0.5,
                s,
                fontsize=FONT_PT,
                family="DejaVu Sans Mono",
                va="center",
                ha="left",
                color="black" if frac < 0.75 or cmap_name == "RdYlGn" else "white",
            )
        ax.set_xlim(0, CHARS_PER_LINE)
        ax.set_ylim(nlines, 0)
        ax.axis("off")
        ax.set_title(title, fontsize=9, loc="left")
        cax = fig.add_axes(((0.45 + text_w) / fig_w, (y0 + 0.1) / fig_h, 0.15 / fig_w, (panel_h - 0.45) / fig_h))
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(vmin, vmax))
        fig.colorbar(sm, cax=cax).ax.tick_params(labelsize=7)
        y_top = y0
    ax = fig.add_axes((0.7 / fig_w, 0.45 / fig_h, (text_w - 0.45) / fig_w, (curve_h - 0.5) / fig_h))
    pos = list(range(len(arrays["tokens"])))
    ax.plot(pos, arrays["teacher_entropy"], color="tab:purple", linewidth=1.2, label="H_t")
    if "lookahead_entropy" in arrays:
        ax.plot(pos, arrays["lookahead_entropy"], color="tab:blue", linewidth=1.0, linestyle="--", label="H^CL_t")
    ax.set_ylabel("entropy (nats)", fontsize=8)
    ax.set_xlabel("response position t", fontsize=8)
    ax2 = ax.twinx()
    ax2.plot(pos, arrays["gate"], color="tab:green", linewidth=1.0, label="g(H_t)")
    if "gate_lookahead" in arrays:
        ax2.plot(pos, arrays["gate_lookahead"], color="tab:olive", linewidth=1.0, linestyle=":", label="g(H^CL_t)")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("gate", fontsize=8)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right", ncol=4)
    ax.tick_params(labelsize=7)
    ax2.tick_params(labelsize=7)
    save(fig, out)
    plt.close(fig)
    return out


def render_html(rec: Dict[str, Any], arrays: Dict[str, List[Any]], out: str) -> str:
    from ..eval.plots import pyplot

    plt = pyplot()
    lf = lift(arrays)
    blocks = []
    for title, vals, cmap_name, vmin, vmax in _views(arrays):
        cmap = plt.get_cmap(cmap_name)
        spans = []
        for t, (tok, v) in enumerate(zip(arrays["tokens"], vals)):
            frac = 0.0 if vmax <= vmin else min(max((v - vmin) / (vmax - vmin), 0.0), 1.0)
            r, g, b, _ = cmap(frac)
            tip = f"t={t} H={arrays['teacher_entropy'][t]:.3f} g={arrays['gate'][t]:.3f}"
            if lf is not None:
                tip += f" H_CL={arrays['lookahead_entropy'][t]:.3f} " if "lookahead_entropy" in arrays else " "
                tip += f"lift={lf[t]:.3f}"
            fg = "#fff" if (0.299 * r + 0.587 * g + 0.114 * b) < 0.5 else "#000"
            spans.append(
                f'<span title="{html.escape(tip)}" style="background:rgb({r * 255:.0f},{g * 255:.0f},'
                f'{b * 255:.0f});color:{fg}">{html.escape(tok)}</span>'
            )
        blocks.append(
            f"<h3>{html.escape(title)} <small>(colour scale {vmin:.3g} .. {vmax:.3g})</small></h3>"
            f"<pre class=tok>{''.join(spans)}</pre>"
        )
    prompt = html.escape(str(rec.get("prompt", "")))
    page = (
        "<!doctype html><meta charset=utf-8><title>egrsd inspect</title>"
        "<style>body{font-family:sans-serif;max-width:70em;margin:1em auto}"
        "pre.tok{white-space:pre-wrap;font-size:14px;line-height:1.6;border:1px solid #ccc;padding:.5em}"
        "pre.tok span{border-radius:2px}</style>"
        f"<h2>{html.escape(_header(rec))}</h2><p><b>prompt:</b> {prompt}</p>"
        "<p>Hover a token for its values.</p>" + "".join(blocks)
    )
    atomic_write_text(out, page)
    return out


def inspect_rollout(
    samples_path: str, out_prefix: Optional[str] = None, step: Optional[int] = None, rollout: Optional[int] = None
) -> Tuple[str, str]:
    """Draw one rollout of `samples_path`; returns (png, html) paths."""
    records = read_samples_file(samples_path)
    if not records:
        raise SamplesError(f"{samples_path}: no records")
    rec = select(records, samples_path, step, rollout)
    arrays = check_record(rec, f"{samples_path} line {rec['_line']}")
    if out_prefix is None:
        out_prefix = os.path.join(
            os.path.dirname(os.path.abspath(samples_path)), "inspect", f"step{rec.get('step', 'x')}_line{rec['_line']}"
        )
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    return render_png(rec, arrays, out_prefix + ".png"), render_html(rec, arrays, out_prefix + ".html")
