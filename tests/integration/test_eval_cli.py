"""`egrsd eval` end to end on a tiny random Qwen3 with the byte tokenizer: outputs, resume after an
interruption (same files as an uninterrupted run), the Megatron-checkpoint route, and bad inputs."""

from __future__ import annotations

import json
import os

import pytest
import torch

from egrsd_megatron.cli import main
from egrsd_megatron.data.byte_tokenizer import byte_tokenizer
from egrsd_megatron.eval.runner import EvalSettings, run_eval
from egrsd_megatron.rollout.hf_engine import HFEngine, build_hf_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

K, MAX_NEW = 2, 6
OUT_FILES = (
    "gsm8k.samples.jsonl",
    "gsm8k.json",
    "gsm8k.csv",
    "mine.samples.jsonl",
    "mine.json",
    "mine.csv",
    "summary.json",
    "summary.csv",
    "eval_settings.json",
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = dict(
        model_type="qwen3",
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=0.2,
        eos_token_id=tok.eos_token_id,
    )
    model = build_hf_model(cfg)
    model_dir = root / "tiny-qwen3"
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    data = root / "data"
    data.mkdir()
    with open(data / "gsm8k.jsonl", "w") as f:
        for i in range(5):
            f.write(json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n")
    with open(data / "mine.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"problem": f"Compute {i} times 3.", "answer": str(3 * i), "solution": "x"}) + "\n")
    return root, str(model_dir), str(data)


def _cli(model, data, out, *extra):
    return main(
        [
            "eval",
            "--model",
            model,
            "--benchmarks",
            "gsm8k",
            "mine",
            "--k",
            str(K),
            "--data-dir",
            data,
            "--out",
            out,
            "--max-new-tokens",
            str(MAX_NEW),
            "--label",
            "tiny",
            "--engine",
            "hf",
            "--no-progress",
            *extra,
        ]
    )


def _settings(model):
    return EvalSettings(model=os.path.abspath(model), label="tiny", k=K, max_new_tokens=MAX_NEW, engine="hf")


class Interrupting(HFEngine):
    """Raises KeyboardInterrupt on the n-th generate call (a user pressing Ctrl-C mid-evaluation)."""

    def __init__(self, model, tokenizer, n):
        super().__init__(model, tokenizer)
        self.left = n

    def generate(self, prompts, params, seeds=None):
        self.left -= 1
        if self.left < 0:
            raise KeyboardInterrupt
        return super().generate(prompts, params, seeds)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.slow
def test_outputs_and_interrupted_resume_equals_uninterrupted(setup):
    root, model, data = setup
    full = str(root / "full")
    assert _cli(model, data, full, "--batch-size", "4") == 0
    summary = json.load(open(os.path.join(full, "summary.json")))
    assert summary["label"] == "tiny" and set(summary["benchmarks"]) == {"gsm8k", "mine"}
    g = summary["benchmarks"]["gsm8k"]
    recs = [json.loads(ln) for ln in open(os.path.join(full, "gsm8k.samples.jsonl"))]
    assert len(recs) == 5 * K and g["num_samples"] == 5 * K and g["samples_per_problem"] == K
    assert [(r["problem_index"], r["sample_index"]) for r in recs] == [(p, s) for p in range(5) for s in range(K)]
    assert all(1 <= r["num_tokens"] <= MAX_NEW for r in recs)
    assert g["mean_length"] == pytest.approx(sum(r["num_tokens"] for r in recs) / len(recs))
    assert g["truncation_rate"] == pytest.approx(sum(r["truncated"] for r in recs) / len(recs))
    assert summary["average"]["accuracy"] == pytest.approx(
        (g["accuracy"] + summary["benchmarks"]["mine"]["accuracy"]) / 2
    )
    lines = _read(os.path.join(full, "summary.csv")).decode().splitlines()
    assert lines[0].startswith("label,benchmark,accuracy,mean_length,") and "pass@2" in lines[0]
    assert [ln.split(",")[1] for ln in lines[1:]] == ["gsm8k", "mine", "average"]

    # interrupted during its 2nd batch of 3, then a torn half line from the crash, then resumed with
    # another batch size
    part = str(root / "part")
    tok = byte_tokenizer()
    eng = Interrupting(build_hf_model({}, weights_dir=model), tok, n=1)
    with pytest.raises(KeyboardInterrupt):
        run_eval(model, ["gsm8k", "mine"], data, part, _settings(model), batch_size=3, engine=eng, progress=False)
    samples = os.path.join(part, "gsm8k.samples.jsonl")
    assert len(open(samples).readlines()) == 3 and not os.path.exists(os.path.join(part, "summary.json"))
    with open(samples, "a") as f:
        f.write('{"benchmark": "gsm8k", "problem_in')
    assert _cli(model, data, part, "--batch-size", "2") == 0
    for name in OUT_FILES:
        assert _read(os.path.join(part, name)) == _read(os.path.join(full, name)), name
    # a finished evaluation rerun is a no-op that rewrites the same files
    assert _cli(model, data, part, "--batch-size", "5") == 0
    assert _read(os.path.join(part, "summary.json")) == _read(os.path.join(full, "summary.json"))
    # changing what a sample means is refused
    assert _cli(model, data, part, "--temperature", "1.0") == 2


def test_megatron_checkpoint_gives_same_samples(setup):
    from egrsd_megatron.checkpoint.convert import hf_to_megatron

    root, model, data = setup
    ckpt = str(root / "ckpt")
    hf_to_megatron(model, ckpt, tp=2)
    outs = {}
    for name, m in (("hf", model), ("megatron", ckpt)):
        out = str(root / f"route_{name}")
        assert (
            main(
                [
                    "eval",
                    "--model",
                    m,
                    "--benchmarks",
                    "mine",
                    "--data-dir",
                    data,
                    "--out",
                    out,
                    "--max-new-tokens",
                    str(MAX_NEW),
                    "--limit",
                    "2",
                    "--engine",
                    "hf",
                    "--no-progress",
                ]
            )
            == 0
        )
        outs[name] = [
            (r["response"], r["num_tokens"], r["seed"])
            for r in map(json.loads, open(os.path.join(out, "mine.samples.jsonl")))
        ]
    assert len(outs["hf"]) == 2 and outs["hf"] == outs["megatron"]
    # the frontier plot reads real `egrsd eval` folders
    png = str(root / "frontier.png")
    assert main(["frontier", str(root / "route_hf"), str(root / "route_megatron"), "--out", png]) == 0
    import matplotlib.image as mpimg

    assert mpimg.imread(png).shape[:2] == (390, 480)  # one benchmark: a single panel


def test_bad_inputs_exit_2_with_clear_message(setup, tmp_path, capsys):
    root, model, data = setup
    out = str(tmp_path / "o")

    def run(*argv):
        code = main(["eval", "--out", out, "--no-progress", "--engine", "hf", *argv])
        return code, capsys.readouterr().err

    code, err = run("--model", model, "--benchmarks", "aime24", "--data-dir", data)
    assert code == 2 and "aime24.jsonl not found" in err and "egrsd data prepare aime24" in err
    code, err = run("--model", model, "--benchmarks", "nosuch", "--data-dir", data)
    assert code == 2 and "unknown benchmark 'nosuch'" in err
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text(open(os.path.join(model, "config.json")).read())
    code, err = run("--model", str(empty), "--benchmarks", "mine", "--data-dir", data)
    assert code == 2 and "no weights" in err
    code, err = run("--model", str(tmp_path / "missing"), "--benchmarks", "mine", "--data-dir", data)
    assert code == 2 and "folder not found" in err
    assert not os.path.exists(out)  # nothing written for a run that could not start


def test_eval_defaults_come_from_the_config_eval_section(tmp_path):
    """`egrsd eval --config X`: every eval option not given takes X's eval.* value; a given one wins."""
    from egrsd_megatron.cli import build_parser
    from egrsd_megatron.eval.commands import _eval_defaults

    conf = tmp_path / "c.yaml"
    conf.write_text(
        "eval:\n  benchmarks: [mine, gsm8k]\n  k: 3\n  temperature: 0.0\n  max_new_tokens: 7\n"
        "prompt:\n  thinking: false\n"
    )
    args = build_parser().parse_args(["eval", "--model", "m", "--out", "o", "--config", str(conf), "--k", "5"])
    ev, prompt = _eval_defaults(args)
    assert (ev.benchmarks, ev.k, ev.temperature, ev.max_new_tokens, ev.top_p) == (["mine", "gsm8k"], 5, 0.0, 7, 0.95)
    assert prompt.thinking is False
    # Without --config: EvalConfig's defaults, and --benchmarks is then required (a one-line error, exit 2).
    ev, _ = _eval_defaults(build_parser().parse_args(["eval", "--model", "m", "--out", "o"]))
    assert (ev.benchmarks, ev.k, ev.temperature) == ([], 1, 0.6)
    assert main(["eval", "--model", "m", "--out", str(tmp_path / "o")]) == 2
