"""The experiment file (`egrsd experiment CONFIG`): typed schema, loading, validation.

An experiment trains every (method, seed) from one base model on one training set through the normal
training config, then evaluates the base and every trained model on the same held-out benchmarks:

    base_model: smollm2            # smollm2 | tiny (random tiny Qwen3 + byte tokenizer) | <HF folder>
    train_config: demo_cpu         # the training config every run inherits (conf/ name or path)
    train_overrides: [train.steps=40]   # `section.key=value`, as on the `egrsd train` command line
    train_data: {synth: {n: 512, seed: 1}}        # or {path: file.jsonl}
    benchmarks:                    # name -> source; several held-out files
      synth: {synth: {n: 100, seed: 2}}
      scene: {synth: {n: 50, seed: 3, phrasing: scene}}
    methods: [grpo, rlsd, egrsd, cl_egrsd, opsd]
    seeds: [1]                     # default seeds of every method
    per_method:                    # per-method seeds and training overrides
      grpo: {seeds: [1, 2]}
      opsd: {overrides: [optim.lr=1.0e-5]}
    eval: {max_new_tokens: 128, temperature: 0.0, reward: final_number}
    stats: {resamples: 10000, confidence: 0.95}
    out_dir: runs/experiment

Keys are checked like training configs (config/loader.py): an unknown key names the file and the closest
valid key, a wrong type names the key; `key=value` overrides on the command line edit this file's keys.
Training overrides are validated by loading the training config with them (an error names the method).
Seed s of any method sets train.seed=s and data.seed=s, so all methods with seed s see the same problems
in the same order.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

from ..config.loader import build_typed, check_keys, parse_overrides, resolve_path
from ..config.schema import ConfigError
from ..data.phrasings import PHRASINGS
from ..losses.registry import FAMILY

DEFAULT_METHODS = ("grpo", "rlsd", "egrsd", "cl_egrsd", "opsd")
BASE_LABEL = "base"
BUILTIN_MODELS = ("smollm2", "tiny")
TRAIN_PHRASING = "train"  # data/synth.py's stories (the training generator)


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"experiment key '{key}': {msg}")


@dataclass
class SynthSource:
    """Problems generated once into <out_dir>/data/: data/synth.py (phrasing=train) or data/phrasings.py."""

    n: int = 0
    seed: int = 0
    min_steps: int = 1  # phrasing=train only (the other phrasings are one-step)
    max_steps: int = 1
    phrasing: str = TRAIN_PHRASING  # train | arith | question_first | scene

    def validate(self, key: str) -> None:
        _check(self.n >= 1, f"{key}.n", f"must be >= 1, got {self.n}")
        names = (TRAIN_PHRASING, *PHRASINGS)
        _check(self.phrasing in names, f"{key}.phrasing", f"got {self.phrasing!r}; expected one of {', '.join(names)}")
        _check(
            1 <= self.min_steps <= self.max_steps,
            f"{key}.min_steps",
            f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}",
        )
        _check(
            self.phrasing == TRAIN_PHRASING or self.max_steps == 1,
            f"{key}.max_steps",
            f"phrasing {self.phrasing} makes one-step problems only",
        )


@dataclass
class DataSource:
    """Exactly one of: an existing jsonl (fields problem, answer[, solution]) or generated problems."""

    path: Optional[str] = None
    synth: Optional[SynthSource] = None

    def validate(self, key: str) -> None:
        _check((self.path is None) != (self.synth is None), key, "give exactly one of 'path' or 'synth'")
        if self.synth is not None:
            self.synth.validate(f"{key}.synth")
        elif not os.path.isfile(os.path.expanduser(self.path)):
            raise ConfigError(f"experiment key '{key}.path': file {self.path} not found")


@dataclass
class MethodSpec:
    seeds: Optional[List[int]] = None  # None: the experiment's `seeds`
    overrides: List[str] = field(default_factory=list)  # training `section.key=value` for this method


@dataclass
class EvalSpec:
    """Sampling of the held-out evaluation (the same for every model). Greedy by default: one answer per
    problem, no sampling noise, so every difference between models is a difference of the models."""

    k: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    batch_size: int = 16
    reward: str = "final_number"
    seed: int = 0
    engine: str = "hf"  # hf | vllm | auto
    # A response cut at max_new_tokens counts as wrong even when the verifier accepts its text (the
    # final-number reward reads the last number, which a cut response often holds by chance), as
    # reward.truncated_reward=0 does in training. false: trust the verifier on truncated responses too.
    truncated_is_wrong: bool = True

    def validate(self) -> None:
        for k in ("k", "max_new_tokens", "batch_size"):
            _check(getattr(self, k) >= 1, f"eval.{k}", f"must be >= 1, got {getattr(self, k)}")
        _check(self.temperature >= 0, "eval.temperature", "must be >= 0")
        _check(self.engine in ("hf", "vllm", "auto"), "eval.engine", f"got {self.engine!r}; expected hf, vllm or auto")


@dataclass
class StatsSpec:
    confidence: float = 0.95
    resamples: int = 10000
    seed: int = 0
    baselines: List[str] = field(default_factory=lambda: [BASE_LABEL, "grpo"])  # each method is compared to these

    def validate(self) -> None:
        _check(0 < self.confidence < 1, "stats.confidence", f"must be in (0, 1), got {self.confidence}")
        _check(self.resamples >= 100, "stats.resamples", f"must be >= 100, got {self.resamples}")


@dataclass
class ExperimentSpec:
    base_model: str = "tiny"
    train_config: str = "tiny_cpu"
    train_overrides: List[str] = field(default_factory=list)
    train_data: DataSource = field(default_factory=DataSource)
    benchmarks: Dict[str, DataSource] = field(default_factory=dict)
    methods: List[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: List[int] = field(default_factory=lambda: [1])
    per_method: Dict[str, MethodSpec] = field(default_factory=dict)
    eval: EvalSpec = field(default_factory=EvalSpec)
    stats: StatsSpec = field(default_factory=StatsSpec)
    out_dir: str = "runs/experiment"

    # ------------------------------------------------------------------ derived
    def seeds_of(self, method: str) -> List[int]:
        m = self.per_method.get(method)
        return list(m.seeds) if m is not None and m.seeds is not None else list(self.seeds)

    def overrides_of(self, method: str) -> List[str]:
        m = self.per_method.get(method)
        return list(m.overrides) if m is not None else []

    def runs(self) -> List[tuple]:
        """(method, seed) in training order: seed-major, so a cut-short experiment has every method once."""
        order = []
        for seed in sorted({s for m in self.methods for s in self.seeds_of(m)}):
            order += [(m, seed) for m in self.methods if seed in self.seeds_of(m)]
        return order

    def validate(self) -> None:
        _check(bool(self.methods), "methods", "list at least one method")
        for m in self.methods:
            _check(m in FAMILY, "methods", f"unknown method {m!r}; expected names of loss.name: {', '.join(FAMILY)}")
        _check(len(set(self.methods)) == len(self.methods), "methods", "a method is listed twice")
        _check(BASE_LABEL not in self.methods, "methods", f"'{BASE_LABEL}' names the untrained model")
        for m in self.per_method:
            _check(m in self.methods, f"per_method.{m}", f"{m} is not in 'methods' ({', '.join(self.methods)})")
        for m in self.methods:
            seeds = self.seeds_of(m)
            own = m in self.per_method and self.per_method[m].seeds is not None
            where = f"per_method.{m}.seeds" if own else "seeds"
            _check(bool(seeds), where, "list at least one seed")
            _check(len(set(seeds)) == len(seeds), where, f"a seed is listed twice: {seeds}")
            _check(all(isinstance(s, int) and s >= 0 for s in seeds), where, f"seeds are integers >= 0, got {seeds}")
        _check(bool(self.benchmarks), "benchmarks", "list at least one held-out benchmark")
        for name, src in self.benchmarks.items():
            _check(
                name.replace("_", "").replace("-", "").isalnum(),
                f"benchmarks.{name}",
                "a benchmark name is a file name: letters, digits, '_' and '-'",
            )
            src.validate(f"benchmarks.{name}")
        self.train_data.validate("train_data")
        for b in self.stats.baselines:
            _check(b == BASE_LABEL or b in FAMILY, "stats.baselines", f"unknown baseline {b!r}")
        self.eval.validate()
        self.stats.validate()


# ---------------------------------------------------------------------------------------------- loading
def _dataclass_in(tp: Any) -> Optional[type]:
    """The dataclass inside a field type: X or Optional[X]; None otherwise."""
    if dataclasses.is_dataclass(tp):
        return tp
    args = [a for a in get_args(tp) if a is not type(None)]
    return args[0] if get_origin(tp) is Union and len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def _check_tree(data: Any, cls: type, where: str, prefix: str = "") -> None:
    """config.loader.check_keys at every level, through Optional[dataclass] and Dict[str, dataclass] fields
    too (benchmarks.<name>.synth, per_method.<name>), so an unknown key anywhere names its full path."""
    check_keys(data, cls, where, prefix)
    for key, tp in get_type_hints(cls).items():
        value = data.get(key)
        if value is None:
            continue
        inner = _dataclass_in(tp)
        if inner is not None and not dataclasses.is_dataclass(tp):  # Optional[X]: check_keys skipped it
            _check_tree(value, inner, where, f"{prefix}{key}.")
        elif get_origin(tp) is dict and _dataclass_in(get_args(tp)[1]) is not None and isinstance(value, dict):
            for name, item in value.items():
                if item is not None:
                    _check_tree(item, _dataclass_in(get_args(tp)[1]), where, f"{prefix}{key}.{name}.")
        elif dataclasses.is_dataclass(tp) and isinstance(value, dict):
            _check_tree(value, tp, where, f"{prefix}{key}.")


def load_experiment(path: str, overrides: Sequence[str] = ()) -> ExperimentSpec:
    """Read `path`, apply `key=value` overrides, validate; training overrides are checked too."""
    full = resolve_path(path, os.getcwd())
    try:
        with open(full) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{full}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{full}: an experiment file must be a mapping, got {type(data).__name__}")
    layers = [(data, full), (parse_overrides(overrides), "command line")]
    spec: ExperimentSpec = build_typed(ExperimentSpec, layers, check=_check_tree, where=f"{full}: ")
    spec.validate()
    check_training_configs(spec)
    return spec


def train_overrides(spec: ExperimentSpec, method: str, seed: int) -> List[str]:
    """The training overrides of one run, in order: experiment-wide, then the method's, then what the
    experiment owns (method, seeds); later ones win."""
    return [
        *spec.train_overrides,
        *spec.overrides_of(method),
        f"loss.name={method}",
        f"train.seed={seed}",
        f"data.seed={seed}",
    ]


def check_training_configs(spec: ExperimentSpec) -> None:
    """Load the training config of every method once (first seed): a bad override fails now, naming it."""
    from ..config import load_config

    train_cfg = resolve_path(spec.train_config, os.getcwd())
    for m in spec.methods:
        try:
            load_config(train_cfg, train_overrides(spec, m, spec.seeds_of(m)[0]))
        except ConfigError as e:
            raise ConfigError(
                f"training config of method {m} ({spec.train_config} + train_overrides + per_method.{m}.overrides): {e}"
            ) from None


def to_plain(spec: ExperimentSpec) -> dict:
    return dataclasses.asdict(spec)
