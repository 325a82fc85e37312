"""Run an experiment: data -> base model -> train every (method, seed) -> evaluate every model on every
benchmark -> summary and plots. Every phase is skipped when its output is already there, so rerunning the
same command continues a killed experiment, and a benchmark added to the file is evaluated for every model
without retraining.

Output folder (<out_dir>):
    experiment.json                  the resolved experiment file (what was run)
    data/train.jsonl, data/eval/<benchmark>.jsonl
    base/megatron_tp<T>/             the base model converted for training at TP=T (and evaluated from there)
    runs/<method>_s<seed>/           each training run (train.out_dir): metrics.jsonl, samples.jsonl,
                                     checkpoints/, run.json (its overrides; status started | done)
    eval/<model>/<benchmark>.jsonl   per-problem outcomes, one line per problem:
                                     {problem_id, problem_index, correct, verifier_correct, length,
                                     truncated, samples} (correct/truncated: fraction of the k samples, a
                                     truncated one counted wrong unless eval.truncated_is_wrong=false;
                                     length: their mean tokens)
    eval/<model>/raw/                the eval runner's folder (per-sample records; resumable on its own)
    summary.json, summary.md, frontier.png, curves.png

Resume rules: a run whose run.json says done (and whose overrides are unchanged) is not retrained; a
started one is relaunched with train.resume=auto, so it continues from its last checkpoint. A model's
benchmark is not re-evaluated when its outcome file exists and the evaluation settings are unchanged.
A changed setting for something already done is an error naming it (delete that folder to redo it), never
a silent mix of two settings.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Tuple

from ..config.loader import resolve_path
from ..config.schema import ConfigError
from ..utils import atomic_write_json, atomic_write_text
from .launch import run_phase, train_cmd
from .schema import BASE_LABEL, TRAIN_PHRASING, DataSource, ExperimentSpec, to_plain, train_overrides

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


def run_name(method: str, seed: int) -> str:
    return f"{method}_s{seed}"


class Experiment:
    def __init__(self, spec: ExperimentSpec, out_dir: Optional[str] = None):
        self.spec = spec
        self.out = os.path.abspath(os.path.expanduser(out_dir or spec.out_dir))
        self.train_config = resolve_path(spec.train_config, os.getcwd())
        self.timings: Dict[str, float] = {}

    # ------------------------------------------------------------------ paths
    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def run_dir(self, method: str, seed: int) -> str:
        return self.path("runs", run_name(method, seed))

    def models(self) -> List[Tuple[str, Optional[str], Optional[int]]]:
        """(label, method, seed): the base, then every run."""
        return [(BASE_LABEL, None, None)] + [(run_name(m, s), m, s) for m, s in self.spec.runs()]

    # ------------------------------------------------------------------ data
    def _materialise(self, src: DataSource, out: str, redo_hint: str) -> str:
        """Write `src` to `out` (generated problems, or a copy of the file); an existing `out` must match."""
        if src.synth is not None:
            s = src.synth
            if s.phrasing == TRAIN_PHRASING:
                from ..data.synth import generate_problems

                rows = generate_problems(s.n, s.seed, s.min_steps, s.max_steps)
            else:
                from ..data.phrasings import generate_phrased

                rows = generate_phrased(s.n, s.seed, s.phrasing)
            text = "".join(json.dumps(r) + "\n" for r in rows)
        else:
            with open(os.path.expanduser(src.path)) as f:
                text = f.read()
        if os.path.isfile(out):
            with open(out) as f:
                if f.read() != text:
                    raise ConfigError(
                        f"{out} holds other problems than the experiment file now describes; results "
                        f"computed on it would not be comparable: {redo_hint}, or restore the source"
                    )
            return out
        atomic_write_text(out, text)
        return out

    def prepare_data(self) -> None:
        self._materialise(
            self.spec.train_data,
            self.path("data", "train.jsonl"),
            f"every run trained on it: use another out_dir (or delete {self.out})",
        )
        for name, src in self.spec.benchmarks.items():
            self._materialise(
                src,
                self.path("data", "eval", f"{name}.jsonl"),
                f"to re-evaluate every model on the new {name}, delete {self.path('data', 'eval', name)}"
                f".jsonl and, in every eval/<model>/ folder, {name}.jsonl and raw/{name}.*",
            )

    # ------------------------------------------------------------------ base model
    def base_hf_dir(self) -> str:
        b = self.spec.base_model
        if b == "smollm2":
            from ..models.smollm2 import smollm2_hf_dir

            return smollm2_hf_dir()
        if b == "tiny":
            from ..testing.tiny import save_tiny_hf_model

            return save_tiny_hf_model(self.path("base", "tiny_hf"))
        path = os.path.abspath(os.path.expanduser(b))
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(
                f"experiment key 'base_model': {b} is neither smollm2, tiny nor a Hugging Face model "
                f"folder (no config.json there)"
            )
        return path

    def base_megatron(self, hf_dir: str, tp: int, pp: int) -> str:
        out = self.path("base", f"megatron_tp{tp}" + (f"_pp{pp}" if pp > 1 else ""))
        from ..checkpoint.megatron_format import META_FILE

        if not os.path.isfile(os.path.join(out, META_FILE)):
            from ..checkpoint.convert import hf_to_megatron

            t = time.monotonic()
            print(f"=== convert base model to Megatron at TP={tp} PP={pp}: {out}", flush=True)
            hf_to_megatron(hf_dir, out, tp=tp, pp=pp, overwrite=True)
            self.timings["convert"] = time.monotonic() - t
        return out

    def train_cfg(self, method: str, seed: int, extra: Tuple[str, ...] = ()) -> Any:
        from ..config import load_config

        return load_config(self.train_config, [*train_overrides(self.spec, method, seed), *extra])

    # ------------------------------------------------------------------ training
    def run_overrides(self, method: str, seed: int, hf_dir: str) -> List[str]:
        cfg = self.train_cfg(method, seed)
        mega = self.base_megatron(hf_dir, cfg.parallel.tp, cfg.parallel.pp)
        # What the experiment owns comes last, so a training override cannot point a run elsewhere.
        return [
            *train_overrides(self.spec, method, seed),
            "model.preset=hf",
            f"model.hf_path={hf_dir}",
            "model.init_from=megatron",
            f"model.load={mega}",
            f"data.train_path={self.path('data', 'train.jsonl')}",
            f"train.out_dir={self.run_dir(method, seed)}",
            "train.resume=auto",
        ]

    def train(self, method: str, seed: int, hf_dir: str) -> None:
        rdir = self.run_dir(method, seed)
        overrides = self.run_overrides(method, seed, hf_dir)
        record_path = os.path.join(rdir, RUN_FILE)
        record: Dict[str, Any] = {}
        if os.path.isfile(record_path):
            with open(record_path) as f:
                record = json.load(f)
            if record.get("overrides") != overrides or record.get("config") != self.train_config:
                raise ConfigError(
                    f"{rdir} was trained with other settings ({record_path}) than the experiment "
                    f"file now gives for {method} seed {seed}; delete that folder to retrain it, "
                    f"or use another out_dir"
                )
            if record.get("status") == "done":
                return
        cfg = self.train_cfg(method, seed)
        nproc = cfg.parallel.tp * cfg.parallel.pp
        record = {
            "method": method,
            "seed": seed,
            "config": self.train_config,
            "overrides": overrides,
            "nproc": nproc,
            "status": "started",
            "seconds": record.get("seconds", 0.0),
            "launches": record.get("launches", 0) + 1,
        }
        os.makedirs(rdir, exist_ok=True)
        atomic_write_json(record_path, record)
        dt = run_phase(f"train {run_name(method, seed)}", train_cmd(nproc, self.train_config, overrides))
        from ..checkpoint.train_state import find_latest

        latest = find_latest(os.path.join(rdir, "checkpoints"))
        if latest is None:
            raise RuntimeError(f"{rdir}: training exited 0 but wrote no checkpoint (train.steps=0?)")
        record.update(status="done", seconds=record["seconds"] + dt, checkpoint=latest)
        atomic_write_json(record_path, record)

    # ------------------------------------------------------------------ evaluation
    def eval_prompt(self) -> Any:
        """The prompt templates every model is evaluated with: the training config's (+ experiment-wide
        overrides), the same for the base and every method."""
        from ..config import load_config

        return load_config(self.train_config, list(self.spec.train_overrides)).prompt

    def model_dir(self, label: str, method: Optional[str], seed: Optional[int], hf_dir: str) -> str:
        if method is None:
            first_m, first_s = self.spec.runs()[0]
            cfg = self.train_cfg(first_m, first_s)
            return self.base_megatron(hf_dir, cfg.parallel.tp, cfg.parallel.pp)
        return os.path.join(self.run_dir(method, seed), "checkpoints")

    def eval_fingerprint(self, model: str) -> Dict[str, Any]:
        """What determines a model's outcomes (batch size and engine do not: every row has its own seed)."""
        ev = {k: v for k, v in asdict(self.spec.eval).items() if k not in ("batch_size", "engine")}
        return {"model": model, "eval": ev, "prompt": asdict(self.eval_prompt())}

    def evaluate(self, label: str, model: str, benchmarks: List[str]) -> None:
        edir = self.path("eval", label)
        fp_path = os.path.join(edir, "settings.json")
        fp = self.eval_fingerprint(model)
        if os.path.isfile(fp_path):
            with open(fp_path) as f:
                old = json.load(f)
            if old != json.loads(json.dumps(fp)):
                diff = sorted(k for k in set(old) | set(fp) if old.get(k) != json.loads(json.dumps(fp)).get(k))
                raise ConfigError(
                    f"{edir} was evaluated with other settings ({', '.join(diff)}); delete that folder "
                    f"to re-evaluate {label}, or use another out_dir"
                )
        todo = [b for b in benchmarks if not os.path.isfile(os.path.join(edir, f"{b}.jsonl"))]
        if not todo:
            return
        os.makedirs(edir, exist_ok=True)
        atomic_write_json(fp_path, fp)
        from ..eval.runner import EvalSettings, read_samples, run_eval

        e = self.spec.eval
        settings = EvalSettings.from_section(e, engine=e.engine, model=model, label=label, seed=e.seed, reward=e.reward)
        print(f"\n=== eval {label} on {', '.join(todo)}", flush=True)
        t = time.monotonic()
        raw = os.path.join(edir, "raw")
        run_eval(
            model,
            todo,
            self.path("data", "eval"),
            raw,
            settings,
            batch_size=e.batch_size,
            prompt_cfg=self.eval_prompt(),
        )
        for b in todo:
            recs = read_samples(os.path.join(raw, f"{b}.samples.jsonl"))
            write_outcomes(
                os.path.join(edir, f"{b}.jsonl"),
                recs,
                self.path("data", "eval", f"{b}.jsonl"),
                e.k,
                truncated_is_wrong=e.truncated_is_wrong,
            )
        self.timings[f"eval {label}"] = self.timings.get(f"eval {label}", 0.0) + time.monotonic() - t
        print(f"=== eval {label}: {time.monotonic() - t:.0f} s", flush=True)

    # ------------------------------------------------------------------ all of it
    def run(self) -> Dict[str, Any]:
        t0 = time.monotonic()
        os.makedirs(self.out, exist_ok=True)
        atomic_write_json(self.path("experiment.json"), {**to_plain(self.spec), "train_config": self.train_config})
        self.prepare_data()
        hf_dir = self.base_hf_dir()
        benches = list(self.spec.benchmarks)
        # The base first: its numbers are the reference of everything else and cost one evaluation.
        for label, method, seed in self.models():
            if method is not None:
                self.train(method, seed, hf_dir)
            self.evaluate(label, self.model_dir(label, method, seed, hf_dir), benches)
        from .plots import plot_experiment_curves, plot_experiment_frontier
        from .summary import build_summary, write_summary

        summary = build_summary(self.out, self.spec)
        summary["timings_this_invocation_s"] = {k: round(v, 1) for k, v in self.timings.items()}
        summary["timings_this_invocation_s"]["total"] = round(time.monotonic() - t0, 1)
        summary["training_seconds"] = {run_name(m, s): _run_seconds(self.run_dir(m, s)) for m, s in self.spec.runs()}
        plot_experiment_frontier(summary, self.path("frontier.png"))
        plot_experiment_curves(self.out, self.spec, self.path("curves.png"))
        write_summary(self.out, summary)
        return summary


def _run_seconds(run_dir: str) -> Optional[float]:
    path = os.path.join(run_dir, RUN_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return round(float(json.load(f).get("seconds", 0.0)), 1)


# ---------------------------------------------------------------------------------------------- outcomes
def _problem_ids(bench_file: str) -> List[Any]:
    ids = []
    with open(bench_file) as f:
        for i, line in enumerate(x for x in f if x.strip()):
            rec = json.loads(line)
            ids.append(rec.get("id", i))
    return ids


def write_outcomes(
    path: str, records: Dict[Tuple[int, int], Dict[str, Any]], bench_file: str, k: int, truncated_is_wrong: bool = True
) -> None:
    """Per-problem outcomes from the eval runner's per-sample records (k samples per problem). `correct` is
    the fraction of samples judged correct (a truncated one never is, with truncated_is_wrong);
    `verifier_correct` the fraction the verifier accepted, truncated or not."""
    ids = _problem_ids(bench_file)
    by_problem: Dict[int, List[Dict[str, Any]]] = {}
    for (p, _s), r in sorted(records.items()):
        by_problem.setdefault(p, []).append(r)
    missing = [i for i in range(len(ids)) if len(by_problem.get(i, [])) < k]
    if missing:
        raise RuntimeError(
            f"{path}: the evaluation has fewer than {k} samples for problem(s) {missing[:5]}; "
            f"rerun the experiment to finish it"
        )
    lines = []
    for i in range(len(ids)):
        rs = by_problem[i][:k]
        ok = [bool(r["correct"]) and not (truncated_is_wrong and bool(r["truncated"])) for r in rs]
        lines.append(
            json.dumps(
                {
                    "problem_id": ids[i],
                    "problem_index": i,
                    "correct": sum(ok) / k,
                    "verifier_correct": sum(bool(r["correct"]) for r in rs) / k,
                    "length": sum(int(r["num_tokens"]) for r in rs) / k,
                    "truncated": sum(bool(r["truncated"]) for r in rs) / k,
                    "samples": k,
                }
            )
        )
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_outcomes(path: str) -> List[Dict[str, Any]]:
    """The per-problem outcome lines of one model on one benchmark, in problem order."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                for key in ("problem_index", "correct", "length", "truncated"):
                    if not isinstance(rec.get(key), (int, float)):
                        raise ValueError(f"no numeric '{key}'")
            except ValueError as e:
                raise ValueError(f"{path} line {n}: not a per-problem outcome ({e})") from e
            out.append(rec)
    if [r["problem_index"] for r in out] != list(range(len(out))):
        raise ValueError(f"{path}: problem_index must run 0..{len(out) - 1} in order")
    return out
