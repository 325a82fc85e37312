"""`egrsd inspect`: real images for a rollout written here, from the gate and lookahead of losses/."""

import json
import re

import numpy as np
import pytest
import torch

from egrsd_megatron.cli import main as cli
from egrsd_megatron.config.schema import LossConfig
from egrsd_megatron.experiment.token_view import layout
from egrsd_megatron.losses.gate import entropy_gate
from egrsd_megatron.losses.lookahead import lookahead_entropy


def _record(step, entropies, words):
    cfg = LossConfig(name="cl_egrsd")
    h = torch.tensor([entropies], dtype=torch.float64)
    mask = torch.ones_like(h, dtype=torch.bool)
    hcl = lookahead_entropy(h, mask, cfg.lookahead.window, cfg.lookahead.stat)
    return {
        "step": step,
        "prompt": "Tom has 3 bags with 4 apples in each bag. How many apples?",
        "answer": "12",
        "reward": 1.0,
        "advantage": 0.5,
        "truncated": False,
        "tokens": words,
        "teacher_entropy": entropies,
        "gate": entropy_gate(h, cfg.gate)[0].tolist(),
        "lookahead_entropy": hcl[0].tolist(),
        "gate_lookahead": entropy_gate(hcl, cfg.gate)[0].tolist(),
    }


def _rollouts():
    words = ("Tom has 3 bags .\n Each bag has 4 apples , so 3 * 4 = 12 .\n The answer is 12 .").split(" ")
    words = [w if i == 0 else " " + w for i, w in enumerate(words)]
    n = len(words)
    flat = [0.1] * n  # a confident teacher: nothing to forgive
    spiky = [0.1] * n
    spiky[5] = 4.0  # one transient spike, resolved at once
    sustained = [0.1] * 8 + [3.0] * (n - 8)  # a sustained uncertain span: the lookahead keeps it down
    return [_record(3, flat, words), _record(3, spiky, words), _record(3, sustained, words), _record(4, flat, words)]


def test_inspect_writes_real_images(tmp_path):
    recs = _rollouts()
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    lift = [r["gate_lookahead"][5] - r["gate"][5] for r in recs[:3]]
    assert lift[0] == pytest.approx(0) and lift[1] > 0.5 and lift[2] == pytest.approx(0, abs=1e-9)
    assert cli(["inspect", "--samples", str(path), "--step", "3", "--out", str(tmp_path / "view")]) == 0
    import matplotlib.image as mpimg

    img = mpimg.imread(str(tmp_path / "view.png"))[..., :3]
    h, w, _ = img.shape
    assert h > 300 and w > 600
    # Non-trivial content: a spread of pixel values and many distinct colours (text, colour cells, curves).
    assert img.std() > 0.1
    colours = np.unique((img.reshape(-1, 3) * 255).round().astype(int), axis=0)
    assert len(colours) > 200
    page = (tmp_path / "view.html").read_text()
    n = len(recs[1]["tokens"])
    assert page.count("<span title=") == 3 * n  # 3 views x every token
    # The default pick is the rollout with the most lift: the spiky one (its spike at t=5 has H=4.000).
    assert "t=5 H=4.000" in page
    # The spike's lift cell carries the lift value in its tooltip.
    assert re.search(r"t=5 H=4\.000 g=0\.2\d\d H_CL=0\.1\d\d lift=0\.[5-9]", page)


def test_inspect_errors_and_layout(tmp_path):
    recs = _rollouts()
    bad = dict(recs[0])
    del bad["gate"]
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match="gate"):
        from egrsd_megatron.experiment.token_view import inspect_rollout

        inspect_rollout(str(path), str(tmp_path / "x"))
    path.write_text(json.dumps(recs[0]) + "\n")
    with pytest.raises(ValueError, match="steps with samples: 3"):
        inspect_rollout(str(path), str(tmp_path / "x"), step=9)
    cells = layout(["ab", "cd\n", "e", "x" * 5, "y" * 9], width=5)  # fits exactly, breaks, wraps, cut
    assert cells == [(0, 0, "ab"), (0, 2, "cd\u21b5"), (1, 0, "e"), (2, 0, "xxxxx"), (3, 0, "yyyyy")]


def test_per_token_fields_match_the_loss_functions():
    from egrsd_megatron.data.byte_tokenizer import byte_tokenizer
    from egrsd_megatron.trainer.sample_fields import per_token_fields

    tok = byte_tokenizer()
    ids = tok.encode("So 3 * 4 = 12.", add_special_tokens=False)
    ent = [0.1 * (i % 3) for i in range(len(ids))]
    ent[4] = 3.0
    cfg = LossConfig(name="cl_egrsd")
    f = per_token_fields(tok, ids, ent, cfg, vocab_size=len(tok))
    h = torch.tensor([ent], dtype=torch.float64)
    m = torch.ones_like(h, dtype=torch.bool)
    hcl = lookahead_entropy(h, m, cfg.lookahead.window, cfg.lookahead.stat)
    assert "".join(f["tokens"]) == "So 3 * 4 = 12."
    np.testing.assert_allclose(f["gate"], entropy_gate(h, cfg.gate)[0].numpy(), atol=5e-5)  # 4 decimals kept
    np.testing.assert_allclose(f["gate_lookahead"], entropy_gate(hcl, cfg.gate)[0].numpy(), atol=5e-5)
    np.testing.assert_allclose(f["lookahead_entropy"], hcl[0].numpy(), atol=5e-5)
    assert f["gate_lookahead"][4] > f["gate"][4] + 0.5  # the spike at t=4 is forgiven
    with pytest.raises(ValueError, match="entropies for"):
        per_token_fields(tok, ids, ent[:-1], cfg, vocab_size=len(tok))


@pytest.mark.parametrize("layout", ["padded", "packed", "packed_dp2"])
def test_sample_entropies_find_their_sample(layout):
    """Each sample's teacher entropies reach its own samples.jsonl row whatever the micro-batch layout: the
    records hold each micro-batch's valid tokens row by row, in the micro-batch's (packed: reordered) rows."""
    from egrsd_megatron.trainer.batch import make_micro_batches, packed_micro_batches
    from egrsd_megatron.trainer.metrics import Record
    from egrsd_megatron.trainer.sample_fields import sample_entropies
    from tests.unit.test_packed_batches import _samples

    samples = _samples(10)
    # Entropy of token j of sample i = i + j / 100: every value names its sample and position.
    truth = {i: torch.tensor([i + j / 100 for j in range(len(s.response))]) for i, s in enumerate(samples)}
    if layout == "padded":
        mbs, mine = make_micro_batches(samples, 2), 10
    else:
        dp = 2 if layout == "packed_dp2" else 1
        mbs, mine = packed_micro_batches(samples, 64, 0, dp), 10 // dp  # rank 0's own = the first 10 // dp
    records = [Record({}, {"teacher_entropy": torch.cat([truth[i] for i in mb.sample_ids])}) for mb in mbs]
    got = sample_entropies(mbs, records, mine)
    held = {i for mb in mbs for i in mb.sample_ids if i < mine}
    assert set(got) == held and held  # every own sample this rank scored, and nothing else
    for i, h in got.items():
        assert torch.equal(h, truth[i]), i
    assert sample_entropies(mbs, records[:-1], mine) == {}  # a record missing (another stage): none
    assert sample_entropies(mbs, [Record({}, {}) for _ in mbs], mine) == {}  # no entropies (grpo): none
