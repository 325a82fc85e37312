"""Frontier and training-curve plots: real images of the expected size with content; Pareto front by hand."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from egrsd_megatron.cli import main
from egrsd_megatron.eval.plots import DPI, PANEL_H, PANEL_W, frontier_table, pareto_front, plot_curves, plot_frontier


def test_pareto_front_hand_example():
    # (length, accuracy): A(100,.5) B(200,.7) C(150,.4) dominated by A; D(300,.7) dominated by B; E(50,.2)
    pts = [(100, 0.5), (200, 0.7), (150, 0.4), (300, 0.7), (50, 0.2)]
    assert pareto_front(pts) == [4, 0, 1]
    assert pareto_front([(1, 1), (1, 1)]) == [0, 1]
    assert pareto_front([]) == []


def _result(root, name, benches):
    d = os.path.join(root, name)
    os.makedirs(d)
    with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump(
            {
                "label": name,
                "benchmarks": {b: {"accuracy": a, "mean_length": n} for b, (a, n) in benches.items()},
                "average": {},
            },
            f,
        )
    return d


def _image(path):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    return img


def test_frontier_png(tmp_path):
    dirs = [
        _result(tmp_path, "grpo", {"gsm8k": (0.80, 400.0), "math500": (0.60, 900.0)}),
        _result(tmp_path, "egrsd", {"gsm8k": (0.82, 250.0), "math500": (0.58, 600.0)}),
        _result(tmp_path, "cl_egrsd", {"gsm8k": (0.79, 300.0), "math500": (0.61, 700.0)}),
    ]
    names, panels = frontier_table(dirs)
    assert names == ["grpo", "egrsd", "cl_egrsd"]
    assert list(panels) == ["gsm8k", "math500", "average (2 benchmarks)"]
    assert panels["average (2 benchmarks)"][1] == (pytest.approx(425.0), pytest.approx(0.70))
    out = str(tmp_path / "frontier.png")
    assert main(["frontier", *dirs, "--out", out, "--labels", "GRPO", "EGRSD", "CL-EGRSD"]) == 0
    img = _image(out)
    assert img.shape[:2] == (round(PANEL_H * DPI), round(3 * PANEL_W * DPI))
    assert float(np.asarray(img[..., :3]).std()) > 0.05  # not a blank canvas
    # bad inputs
    assert main(["frontier", str(tmp_path / "nope"), "--out", out]) == 2
    with pytest.raises(ValueError, match="labels"):
        plot_frontier(dirs, out, labels=["a"])


def test_curves_png(tmp_path, capsys):
    runs = []
    for name, slope in (("egrsd", 1.0), ("grpo", 0.5)):
        d = tmp_path / name
        d.mkdir()
        with open(d / "metrics.jsonl", "w") as f:
            for step in range(1, 21):
                f.write(
                    json.dumps(
                        {
                            "step": step,
                            "accuracy": min(1.0, 0.02 * slope * step),
                            "response_length": 300 - 5 * slope * step,
                            "loss": 0.1,
                        }
                    )
                    + "\n"
                )
        runs.append(str(d))
    out = str(tmp_path / "curves.png")
    assert main(["curves", *runs, "--out", out]) == 0
    img = _image(out)
    assert img.shape[:2] == (round(PANEL_H * DPI), round(2 * PANEL_W * DPI))
    assert float(np.asarray(img[..., :3]).std()) > 0.05
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1, "accuracy": 0.5}\n')
    assert main(["curves", str(bad), "--out", out]) == 2
    assert "line 1: missing numeric key(s) response_length" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_curves([str(tmp_path)], out)
