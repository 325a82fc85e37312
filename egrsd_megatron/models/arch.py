"""`ModelArch`: the architecture of a Qwen3 / Llama-family decoder, independent of Megatron and transformers.

One dataclass is the single source of truth that the Megatron TransformerConfig, the Hugging Face
config.json and the HF <-> Megatron weight mapping are all derived from. Llama = Qwen3 without QK-norm.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, Tuple, Union

from ..config.schema import ConfigError
from ..utils.errors import MissingInputError

# Megatron-LM pads the vocabulary to a multiple of (make_vocab_size_divisible_by x TP); 128 is its default.
VOCAB_DIVISIBLE_BY = 128

# transformers architecture / model_type -> our family
_FAMILIES = {"Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama", "qwen3": "qwen3", "llama": "llama"}


@dataclass(frozen=True)
class ModelArch:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    qk_norm: bool = True
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    family: str = "qwen3"  # qwen3 | llama

    def __post_init__(self) -> None:
        if self.family not in ("qwen3", "llama"):
            raise ConfigError(f"model family {self.family!r} is not supported; expected qwen3 or llama")
        for k in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "num_kv_heads",
            "head_dim",
            "ffn_hidden_size",
            "vocab_size",
        ):
            if int(getattr(self, k)) < 1:
                raise ConfigError(f"model architecture field {k} must be >= 1, got {getattr(self, k)}")
        if self.num_attention_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_kv_heads

    def padded_vocab_size(self, tp: int) -> int:
        """Vocabulary rounded up to a multiple of 128 x TP (Megatron-LM's rule), so TP shards are equal."""
        m = VOCAB_DIVISIBLE_BY * tp
        return ((self.vocab_size + m - 1) // m) * m

    # ---- Megatron-side attention layout (KV-group padding) ------------------------------------
    def megatron_groups(self, tp: int) -> int:
        """Query groups of the Megatron model at TP: num_kv_heads rounded up to a multiple of TP.

        Megatron-Core needs TP to divide the query groups. When it does not, zero groups are appended
        (global group indices num_kv_heads .. megatron_groups-1, i.e. at the end of the last TP ranks):
        a zero group has zero q/k/v weights and zero linear_proj input columns, so its attention output
        softmax(.) @ v = 0 is mapped to 0 (logits exact), and its gradients are exactly 0 (v = 0 and
        W_o = 0 kill every path), so AdamW keeps it at 0. This is the one place that decides the layout.
        """
        if tp < 1:
            raise ConfigError(f"tp={tp} must be >= 1")
        return -(-self.num_kv_heads // tp) * tp

    def megatron_heads(self, tp: int) -> int:
        """Query heads of the Megatron model at TP (heads_per_group per group, padded groups included)."""
        return self.megatron_groups(tp) * self.heads_per_group

    def padded_groups(self, tp: int) -> int:
        """Number of zero (padding) query groups at TP; 0 when TP divides num_kv_heads."""
        return self.megatron_groups(tp) - self.num_kv_heads

    def check_parallel(self, tp: int, pp: int, keys: Tuple[str, str] = ("tp", "pp")) -> None:
        """Raise ConfigError when TP does not divide the FFN, or PP the layers; `keys` name TP and PP in the
        message as the caller's user set them (e.g. "parallel.tp" for a config, "--tp" for a command).

        Heads / KV groups that TP does not divide are padded with zero groups (see megatron_groups), so
        they do not restrict TP; the FFN (split column-wise, no exact padding here) and layers do.
        """
        if tp < 1 or pp < 1:
            raise ConfigError(f"{keys[0]}={tp} and {keys[1]}={pp} must be >= 1")
        if self.ffn_hidden_size % tp:
            raise ConfigError(
                f"{keys[0]}={tp} must divide the model's FFN size: {tp} does not divide "
                f"ffn_hidden_size={self.ffn_hidden_size}; choose a TP that divides "
                f"{self.ffn_hidden_size}"
            )
        if self.num_layers % pp:
            raise ConfigError(
                f"{keys[1]}={pp} must divide the model's {self.num_layers} layers: {pp} does not divide "
                f"num_layers={self.num_layers}; choose a PP that divides {self.num_layers}"
            )

    def num_params(self) -> int:
        h, L = self.hidden_size, self.num_layers
        q, kv = self.num_attention_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * self.ffn_hidden_size + 2 * h
        per_layer += 2 * self.head_dim if self.qk_norm else 0
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return L * per_layer + emb + h

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelArch":
        return cls(**d)

    # ---- Hugging Face config.json ----------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, path_or_dict: Union[str, os.PathLike, Dict[str, Any]]) -> "ModelArch":
        """Read a transformers Qwen3ForCausalLM / LlamaForCausalLM config (folder, config.json path or dict).

        Features the Megatron mapping does not reproduce (biases, RoPE scaling, sliding window, another
        activation) are refused with a ConfigError naming the key, rather than silently converted.
        """
        src = "<dict>"
        if isinstance(path_or_dict, dict):
            cfg = path_or_dict
        else:
            p = os.fspath(path_or_dict)
            if os.path.isdir(p):
                p = os.path.join(p, "config.json")
            src = p
            if not os.path.isfile(p):
                raise MissingInputError(f"no Hugging Face config at {p}: pass a model folder with config.json")
            with open(p) as f:
                try:
                    cfg = json.load(f)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{p}: not valid JSON ({e})") from e
        archs = cfg.get("architectures") or []
        fam = next((_FAMILIES[a] for a in archs if a in _FAMILIES), None) or _FAMILIES.get(cfg.get("model_type", ""))
        if fam is None:
            raise ConfigError(
                f"{src}: unknown architecture (architectures={archs}, model_type="
                f"{cfg.get('model_type')!r}); supported: Qwen3ForCausalLM (qwen3), "
                f"LlamaForCausalLM (llama)"
            )

        def need(key: str) -> Any:
            if key not in cfg:
                raise ConfigError(f"{src}: key {key!r} is missing")
            return cfg[key]

        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{src}: hidden_act={cfg['hidden_act']!r} is not supported (SwiGLU with silu only)")
        for k in ("attention_bias", "mlp_bias"):
            if cfg.get(k):
                raise ConfigError(f"{src}: {k}=true is not supported (the mapping has no biases)")
        if fam == "qwen3" and cfg.get("use_sliding_window"):
            raise ConfigError(f"{src}: use_sliding_window=true is not supported")
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type not in (None, "default"):
            raise ConfigError(
                f"{src}: rope type {rope_type!r} (rope_scaling / rope_parameters) is not supported; "
                f"only default RoPE maps to Megatron's rotary embedding here"
            )
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        return cls(
            num_layers=int(need("num_hidden_layers")),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            ffn_hidden_size=int(need("intermediate_size")),
            vocab_size=int(need("vocab_size")),
            rope_theta=float(theta),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            qk_norm=fam == "qwen3",
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            family=fam,
        )

    def to_hf_config(self, dtype: str = "float32") -> Dict[str, Any]:
        """A transformers config.json dict (Qwen3ForCausalLM or LlamaForCausalLM), built by transformers itself."""
        # lazy: transformers takes seconds to import; `egrsd plan` and config checks use ModelArch without it.
        from transformers import LlamaConfig, Qwen3Config

        common = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=False,
            rope_parameters={"rope_theta": self.rope_theta, "rope_type": "default"},
        )
        if self.family == "qwen3":
            cfg = Qwen3Config(**common, use_sliding_window=False)
            arch_name = "Qwen3ForCausalLM"
        else:
            cfg = LlamaConfig(**common, mlp_bias=False)
            arch_name = "LlamaForCausalLM"
        d = cfg.to_dict()
        d["architectures"] = [arch_name]
        d["dtype"] = dtype
        return d
