"""`egrsd eval`: evaluate one model on benchmark files, resumably, and write metrics per benchmark.

Output folder:
    <out>/<NAME>.samples.jsonl   one record per sample, appended (and flushed) as each batch finishes
    <out>/<NAME>.json, .csv      metrics of that benchmark (+ label, model, sampling parameters)
    <out>/summary.json, .csv     one row per benchmark plus "average" (unweighted mean over benchmarks)
Resume: rerunning the same command reads the samples already in <NAME>.samples.jsonl and generates only
the missing ones (a torn last line from a crash is dropped). The settings that determine the samples are
stored in <out>/eval_settings.json; resuming with different ones is an error, not a silent mix.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..checkpoint.convert import megatron_to_hf
from ..checkpoint.metadata import META_FILE
from ..checkpoint.train_state import find_latest
from ..config.schema import DataConfig, PromptConfig, RolloutConfig
from ..data import PromptBuilder, load_problems, load_tokenizer
from ..data.benchmarks import BENCHMARKS
from ..rollout import SamplingParams, make_engine
from ..utils import atomic_write_json, atomic_write_text
from ..utils.errors import InputError, MissingInputError
from .metrics import average_summaries
from .validation import evaluate_problems, sample_key

log = logging.getLogger(__name__)

WEIGHT_FILES = (".safetensors", ".bin")


SAMPLING_KEYS = ("k", "temperature", "top_p", "top_k", "max_new_tokens")


@dataclass
class EvalSettings:
    """Everything that determines the samples; stored with the results, checked on resume."""

    model: str
    label: str
    k: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    max_new_tokens: int = 1024
    seed: int = 0
    reward: str = "math"
    engine: str = "hf"
    tokenizer: Optional[str] = None
    limit: Optional[int] = None
    chat: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_section(cls, section: Any, *, engine: str, **rest: Any) -> "EvalSettings":
        """Settings taking the sampling keys (SAMPLING_KEYS) from an `eval` section (the training config's
        EvalConfig or an experiment's EvalSpec); engine "auto" becomes default_engine_name()."""
        sampling = {k: getattr(section, k) for k in SAMPLING_KEYS}
        return cls(**sampling, engine=default_engine_name() if engine == "auto" else engine, **rest)

    def sample_defining(self) -> Dict[str, Any]:
        d = asdict(self)
        for k in ("label", "engine"):  # presentation / engine choice do not change what a sample means
            d.pop(k)
        return d


# ------------------------------------------------------------------------------------------ inputs
def benchmark_file(data_dir: str, name: str) -> str:
    """DATA_DIR/NAME.jsonl, with an error that says what to do when it is not there."""
    path = os.path.join(data_dir, f"{name}.jsonl")
    if os.path.isfile(path):
        return path  # a known set, or a custom one someone put there
    if name in BENCHMARKS:
        raise MissingInputError(
            f"benchmark '{name}': file {path} not found; create it with `egrsd data prepare "
            f"{name} --src <downloaded file> --out {path}` or pass the right --data-dir"
        )
    raise InputError(
        f"unknown benchmark '{name}': known are {', '.join(sorted(BENCHMARKS))}; a custom benchmark "
        f"needs a file {path} (jsonl with fields problem, answer)"
    )


def megatron_model_dir(path: str) -> Optional[str]:
    """The megatron_format folder behind `path`: the folder itself (it holds egrsd_checkpoint.json), a
    training step folder (step_N/model/), or a run folder (or its checkpoints/) whose `latest` names a step;
    else None."""
    if os.path.isfile(os.path.join(path, META_FILE)):
        return path
    if os.path.isfile(os.path.join(path, "model", META_FILE)):
        return os.path.join(path, "model")
    # A checkpoints folder holds `latest`; a run folder (train.out_dir) holds it in checkpoints/.
    for root in (path, os.path.join(path, "checkpoints")):
        if os.path.isfile(os.path.join(root, "latest")):
            step = find_latest(root)
            if step is not None and os.path.isfile(os.path.join(step, "model", META_FILE)):
                return os.path.join(step, "model")
    return None


def has_hf_weights(path: str) -> bool:
    return any(f.endswith(WEIGHT_FILES) for f in os.listdir(path))


def resolve_model_dir(model_dir: str, tmp_root: str) -> str:
    """A Hugging Face folder with weights: `model_dir` itself, or a conversion of a Megatron checkpoint."""
    if not os.path.isdir(model_dir):
        raise MissingInputError(f"--model {model_dir}: folder not found")
    mdir = megatron_model_dir(model_dir)
    if mdir is not None:
        log.info("converting Megatron checkpoint %s to Hugging Face format", mdir)
        return megatron_to_hf(mdir, os.path.join(tmp_root, "hf_model"))
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise MissingInputError(
            f"--model {model_dir}: neither a Hugging Face model folder (config.json) nor a "
            f"Megatron checkpoint (egrsd_checkpoint.json, step_N/model/, or a run with `latest`)"
        )
    if not has_hf_weights(model_dir):
        raise MissingInputError(
            f"--model {model_dir}: config.json but no weights (*.safetensors or *.bin); "
            f"save the model with save_pretrained or convert a checkpoint into it"
        )
    return model_dir


# ------------------------------------------------------------------------------------------ resume
def read_samples(path: str) -> Dict[Tuple[int, int], Dict[str, Any]]:
    """Records already in a samples file. A torn LAST line (crash mid-write) is cut off the file; a bad line
    elsewhere is an error naming the line."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        raw = f.read()
    out: Dict[Tuple[int, int], Dict[str, Any]] = {}
    lines = raw.split(b"\n")
    offset = 0
    for i, line in enumerate(lines):
        if line.strip():
            try:
                rec = json.loads(line)
                out[sample_key(rec)] = rec
            except (ValueError, KeyError, TypeError) as e:
                if i == len(lines) - 1 or all(not x.strip() for x in lines[i + 1 :]):
                    log.warning("%s: dropping a torn last line (interrupted write)", path)
                    with open(path, "r+b") as f:
                        f.truncate(offset)
                    break
                raise InputError(
                    f"{path} line {i + 1}: not a sample record ({e}); delete the file to start this benchmark over"
                ) from e
        offset += len(line) + 1
    return out


class _Appender:
    """Appends one JSON line per record and flushes+fsyncs it, so a kill loses at most the line in flight."""

    def __init__(self, path: str) -> None:
        self.f = open(path, "a", encoding="utf-8")

    def __call__(self, rec: Dict[str, Any]) -> None:
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def _check_settings(out_dir: str, settings: EvalSettings) -> None:
    path = os.path.join(out_dir, "eval_settings.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        new = json.loads(json.dumps(settings.sample_defining()))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise InputError(
                f"{out_dir} holds an evaluation with different settings ({', '.join(diff)}): use "
                f"another --out folder, or delete it to start over"
            )
    else:
        atomic_write_json(path, settings.sample_defining())


# ------------------------------------------------------------------------------------------ outputs
METRIC_COLUMNS = (
    "accuracy",
    "mean_length",
    "median_length",
    "mean_length_correct",
    "median_length_correct",
    "mean_length_wrong",
    "median_length_wrong",
    "truncation_rate",
    "num_problems",
    "num_samples",
)


def _csv(rows: List[Dict[str, Any]]) -> str:
    cols: List[str] = ["label", "benchmark", *METRIC_COLUMNS]  # the columns people read first
    for r in rows:
        cols += [c for c in r if c not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    return buf.getvalue()


def write_benchmark(out_dir: str, name: str, label: str, summary: Dict[str, Any], settings: EvalSettings) -> None:
    row = {"label": label, "benchmark": name, **summary}
    atomic_write_json(os.path.join(out_dir, f"{name}.json"), {**row, "settings": asdict(settings)})
    atomic_write_text(os.path.join(out_dir, f"{name}.csv"), _csv([row]))


def write_summary(
    out_dir: str, label: str, per_bench: Dict[str, Dict[str, Any]], settings: EvalSettings
) -> Dict[str, Any]:
    avg = average_summaries(per_bench) if per_bench else {}
    summary = {
        "label": label,
        "model": settings.model,
        "benchmarks": per_bench,
        "average": avg,
        "settings": asdict(settings),
    }
    atomic_write_json(os.path.join(out_dir, "summary.json"), summary)
    rows = [{"label": label, "benchmark": n, **s} for n, s in per_bench.items()]
    rows.append({"label": label, "benchmark": "average", **avg})
    atomic_write_text(os.path.join(out_dir, "summary.csv"), _csv(rows))
    return summary


# ------------------------------------------------------------------------------------------ run
def run_eval(
    model_dir: str,
    benchmarks: Sequence[str],
    data_dir: str,
    out_dir: str,
    settings: EvalSettings,
    batch_size: int = 16,
    engine: Any = None,
    prompt_cfg: Any = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Evaluate and write all outputs; returns the summary. `engine` may be passed in (tests, the trainer);
    otherwise one is built from the model folder (vllm when a GPU and vllm are present, else hf)."""
    if not benchmarks:
        raise InputError("no benchmarks given: pass --benchmarks NAME [NAME ...]")
    files = {name: benchmark_file(data_dir, name) for name in benchmarks}  # all checked before any work
    tmp_root = tempfile.mkdtemp(prefix="egrsd_eval_")
    own_engine = engine is None
    try:
        if engine is None:
            hf_dir = resolve_model_dir(model_dir, tmp_root)
            tokenizer = load_tokenizer(settings.tokenizer, fallback_dir=hf_dir)
            with open(os.path.join(hf_dir, "config.json")) as f:
                hf_config = json.load(f)
            engine = make_engine(
                RolloutConfig(engine=settings.engine, max_batch=batch_size), hf_config, tokenizer, weights_dir=hf_dir
            )
        else:
            tokenizer = load_tokenizer(settings.tokenizer, fallback_dir=model_dir)
        prompt_cfg = prompt_cfg or PromptConfig()
        settings.chat = {
            "thinking": prompt_cfg.thinking,
            "chat_format": prompt_cfg.chat_format,
            "student_template": prompt_cfg.student_template,
            "system": prompt_cfg.system,
        }
        os.makedirs(out_dir, exist_ok=True)  # only once the model and data were found
        _check_settings(out_dir, settings)
        builder = PromptBuilder(tokenizer, prompt_cfg)
        params = SamplingParams(
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            max_new_tokens=settings.max_new_tokens,
            stop_token_ids=builder.eos_token_ids,
            seed=settings.seed,
        )
        data_cfg = DataConfig(max_prompt_tokens=10**9)  # evaluation never drops a problem for its length
        per_bench: Dict[str, Dict[str, Any]] = {}
        for name, path in files.items():
            problems = list(load_problems(path, data_cfg, require_solution=False))
            if settings.limit is not None:
                problems = problems[: settings.limit]
            samples_path = os.path.join(out_dir, f"{name}.samples.jsonl")
            done = read_samples(samples_path)
            appender = _Appender(samples_path)
            try:
                summary, _ = evaluate_problems(
                    engine,
                    builder,
                    problems,
                    settings.reward,
                    params,
                    k=settings.k,
                    on_result=appender,
                    benchmark=name,
                    done=done,
                    batch_size=batch_size,
                    progress=progress,
                )
            finally:
                appender.close()
            write_benchmark(out_dir, name, settings.label, summary, settings)
            per_bench[name] = summary
            log.info(
                "%s: accuracy %.4f, mean length %.1f tokens, truncated %.3f",
                name,
                summary["accuracy"],
                summary["mean_length"],
                summary["truncation_rate"],
            )
        return write_summary(out_dir, settings.label, per_bench, settings)
    finally:
        if own_engine and engine is not None:
            engine.close()
        shutil.rmtree(tmp_root, ignore_errors=True)


def default_engine_name() -> str:
    """vllm when it is importable and a GPU is visible, else hf."""
    return "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None else "hf"
