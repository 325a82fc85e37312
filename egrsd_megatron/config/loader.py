"""YAML configs with inheritance and `key=value` overrides, validated against `schema.ExperimentConfig`.

A config file may start with a `defaults:` list of other files (relative to the file, `.yaml` optional),
merged in order, then the file's own keys on top, then command-line overrides. OmegaConf does the merging
and type coercion (Literal fields included); we check keys ourselves first so an unknown key names the file
it came from and the closest valid key, or, for a key that now sits in a nested section (`loss.g_min`), its
new place (OmegaConf's own error names none of these). A value outside a Literal type names the allowed ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, get_type_hints

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .schema import ConfigError, ExperimentConfig, literal_choices

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf")


def resolve_path(name: str, base_dir: str) -> str:
    candidates = [name, name + ".yaml"]
    for root in (base_dir, CONF_DIR, os.getcwd()):
        for c in candidates:
            p = c if os.path.isabs(c) else os.path.join(root, c)
            if os.path.isfile(p):
                return os.path.abspath(p)
    raise ConfigError(f"config file {name!r} not found (looked in {base_dir}, {CONF_DIR} and the current folder)")


def _sections(cls: type) -> Dict[str, type]:
    """{field: dataclass} for the nested sections of the dataclass `cls` (e.g. loss -> gate, ratio, ...)."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def _unknown_key(key: str, cls: type, where: str, prefix: str) -> ConfigError:
    """The error for `key`, not a field of `cls`: where it lives when a nested section has it (an old flat
    key such as loss.g_min -> loss.gate.g_min), else the closest key (nested ones included)."""
    full = f"{prefix}{key}"
    homes = [
        f"{name}.{key}" for name, sub in _sections(cls).items() if key in {f.name for f in dataclasses.fields(sub)}
    ]
    if len(homes) == 1:
        return ConfigError(
            f"{where}: unknown config key '{full}': it lives at '{prefix}{homes[0]}' now (the keys "
            f"of '{prefix.rstrip('.') or '<root>'}' are grouped by what they belong to)"
        )
    candidates = [f.name for f in dataclasses.fields(cls)]
    candidates += [f"{name}.{f.name}" for name, sub in _sections(cls).items() for f in dataclasses.fields(sub)]
    by_leaf = {c.rsplit(".", 1)[-1]: c for c in reversed(candidates)}  # a direct key wins over a nested one
    close = difflib.get_close_matches(str(key), list(by_leaf), n=1, cutoff=0.5)
    valid = [f.name for f in dataclasses.fields(cls)]
    hint = f"; did you mean '{prefix}{by_leaf[close[0]]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"{where}: unknown config key '{full}'{hint}")


def check_keys(data: Dict[str, Any], cls: type, where: str, prefix: str = "") -> None:
    """Raise ConfigError for a key that `cls` does not have, naming the file and the closest key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    for key, value in data.items():
        if key not in valid:
            raise _unknown_key(str(key), cls, where, prefix)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            check_keys(value, tp, where, f"{prefix}{key}.")


def _literal_choices(dotted: str) -> Optional[Tuple[Any, ...]]:
    """The allowed values of the config key `dotted` when its type is a Literal, else None."""
    cls: Any = ExperimentConfig
    *path, leaf = dotted.split(".")
    for part in path:
        cls = _sections(cls).get(part) if dataclasses.is_dataclass(cls) else None
        if cls is None:
            return None
    return literal_choices(cls).get(leaf) if dataclasses.is_dataclass(cls) else None


def _load_file(path: str, seen: Tuple[str, ...] = ()) -> List[Tuple[str, Dict[str, Any]]]:
    """Return [(file, mapping)] in merge order: each default's chain first, then the file itself."""
    if path in seen:
        raise ConfigError(f"{path}: circular defaults: {' -> '.join(seen + (path,))}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, got {type(data).__name__}")
    defaults = data.pop("defaults", []) or []
    if not isinstance(defaults, list):
        raise ConfigError(f"{path}: 'defaults' must be a list of config files")
    chain: List[Tuple[str, Dict[str, Any]]] = []
    for d in defaults:
        chain += _load_file(resolve_path(str(d), os.path.dirname(path)), seen + (path,))
    chain.append((path, data))
    return chain


def parse_overrides(overrides: Sequence[str]) -> Dict[str, Any]:
    nested: Dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return nested


def merge(base: Any, data: Dict[str, Any], where: str) -> Any:
    try:
        return OmegaConf.merge(base, OmegaConf.create(data))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        choices = _literal_choices(key)
        if choices is not None:
            raise ConfigError(
                f"{where}: config key '{key}': got {_lookup(data, key)!r}; expected one of "
                f"{', '.join(map(str, choices))}"
            ) from None
        msg = str(e).splitlines()[0]
        # OmegaConf says e.g. "Value 'abc' of type 'str' could not be converted to Integer".
        raise ConfigError(f"{where}: config key '{key}' has the wrong type: {msg}") from None


def _lookup(data: Dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def build_typed(
    cls: type,
    layers: Sequence[Tuple[Dict[str, Any], str]],
    check: Callable[[Dict[str, Any], type, str], None] = check_keys,
    where: str = "",
) -> Any:
    """The dataclass `cls` from `layers` of (data, where it came from), later ones overriding earlier ones;
    each layer's keys checked by `check` first. OmegaConf's own type errors become ConfigError (prefixed
    with `where`, e.g. the file)."""
    cfg = OmegaConf.structured(cls)
    for data, src in layers:
        check(data, cls, src)
        cfg = merge(cfg, data, src)
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}{str(e).splitlines()[0]}") from None


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load `path` (with its defaults chain), apply `overrides`, validate, return a typed config."""
    files = [] if path is None else _load_file(resolve_path(path, os.getcwd()))
    layers = [(data, file) for file, data in files] + [(parse_overrides(overrides), "command line")]
    obj: ExperimentConfig = build_typed(ExperimentConfig, layers)
    obj.validate()
    return obj


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: ExperimentConfig) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)
