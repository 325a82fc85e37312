"""The transformers rollout engine: a Hugging Face causal LM, refitted in place, batched with a KV cache.

Prompts are LEFT padded so every row's next token sits in the last column; position ids count only real
tokens (cumsum of the mask), so padding changes neither positions nor attention. Decoding is one cached
forward per new token; as rows finish they are dropped from the batch and the KV cache
(Cache.batch_select_indices), so a long tail costs only its own rows. Works on CPU (fp32) and on a GPU
(bf16 by default: `rollout.hf_dtype`; bf16 generation itself is GPU-only, unverified: bench/gpu_check.py).
Each sampled token's log-prob comes from the very logits it was drawn from (sampling.select_next: after the
temperature and any top-k / top-p truncation; greedy: softmax(z) at T = 1). A row stops after a stop token
id or once its ids end with a stop sequence, which is kept (rollout/base.py).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .base import Completion, RolloutEngine, SamplingParams, check_prompts, row_seed
from .footprint import engine_weight_dtype
from .sampling import select_next

log = logging.getLogger(__name__)


def build_hf_model(
    hf_config: Dict[str, Any], weights_dir: Optional[str] = None, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """An AutoModelForCausalLM from a config dict (random init) or from `weights_dir` (safetensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if weights_dir is not None:
        model = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=dtype)
    else:
        cfg = dict(hf_config)
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise ValueError(
                "hf_config has no 'model_type' (expected e.g. 'qwen3' or 'llama'): pass the "
                "dict of a Hugging Face config.json"
            )
        for k in ("torch_dtype", "dtype", "quantization_config", "transformers_version", "architectures"):
            cfg.pop(k, None)
        config = AutoConfig.for_model(model_type, **cfg)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


class HFEngine(RolloutEngine):
    def __init__(
        self, model: torch.nn.Module, tokenizer: Any = None, max_batch: int = 16, pad_token_id: int = 0
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.pad_token_id = pad_token_id
        # transformers 5 renamed past_key_values -> cache; keep both working (setup.py allows >= 4.56).
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---------------------------------------------------------------- generation
    def generate(
        self, prompts: List[List[int]], params: SamplingParams, seeds: Optional[Sequence[int]] = None
    ) -> List[Completion]:
        check_prompts(prompts, seeds)
        row_seeds = list(seeds) if seeds is not None else [row_seed(params.seed, i) for i in range(len(prompts))]
        out: List[Completion] = []
        for start in range(0, len(prompts), self.max_batch):
            sl = slice(start, start + self.max_batch)
            out.extend(self._generate_batch(prompts[sl], params, row_seeds[sl]))
        return out

    @torch.no_grad()
    def _generate_batch(self, prompts: List[List[int]], params: SamplingParams, seeds: List[int]) -> List[Completion]:
        from transformers import DynamicCache

        dev = self.device
        B, L = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, L), self.pad_token_id, dtype=torch.long, device=dev)
        mask = torch.zeros((B, L), dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            ids[i, L - len(p) :] = torch.tensor(p, dtype=torch.long, device=dev)
            mask[i, L - len(p) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        gens = [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds]

        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, pos, cache)
        responses: List[List[int]] = [[] for _ in prompts]
        logprobs: List[List[float]] = [[] for _ in prompts]
        stopped = [False] * B
        active = list(range(B))  # original row of each row still in the batch
        last_pos = pos[:, -1]
        for t in range(params.max_new_tokens):
            nxt, lp = select_next(logits, params, [gens[r] for r in active])
            keep = []
            for j, (r, tok, lpt) in enumerate(zip(active, nxt.tolist(), lp.tolist())):
                responses[r].append(tok)
                logprobs[r].append(lpt)
                if params.ends_with_stop(responses[r]):
                    stopped[r] = True
                else:
                    keep.append(j)
            if not keep or t == params.max_new_tokens - 1:
                break
            if len(keep) < len(active):
                # Drop finished rows from the batch and the KV cache: long tails cost only their own rows.
                idx = torch.tensor(keep, device=dev)
                cache.batch_select_indices(idx)
                mask, last_pos, nxt = mask[idx], last_pos[idx], nxt[idx]
                active = [active[j] for j in keep]
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=dev)], dim=1)
            last_pos = last_pos + 1
            logits = self._forward(nxt[:, None], mask, last_pos[:, None], cache)

        return [
            Completion(
                prompt_ids=list(p),
                response_ids=responses[i],
                text=self._decode(responses[i]),
                truncated=not stopped[i],
                logprobs=logprobs[i],
            )
            for i, p in enumerate(prompts)
        ]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache},
        )
        return out.logits[:, -1, :].float()

    def _decode(self, ids: List[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ---------------------------------------------------------------- refit
    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Copy each (HF name, full tensor) into the existing parameter storage (no reallocation).

        Every parameter must be given once (tied weights: either name). An unknown name, a wrong shape, or
        a missing parameter raises, because a silently stale weight would make rollouts off-policy.
        """
        params = dict(self.model.named_parameters(remove_duplicate=False))
        unique = {id(p): n for n, p in self.model.named_parameters()}
        seen = set()
        for name, tensor in named_tensors:
            p = params.get(name)
            if p is None:
                raise ValueError(
                    f"update_weights: tensor '{name}' is not a parameter of the rollout model "
                    f"({type(self.model).__name__}); check the HF name mapping"
                )
            if tuple(p.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"update_weights: tensor '{name}' has shape {tuple(tensor.shape)}, the rollout "
                    f"model expects {tuple(p.shape)}"
                )
            p.copy_(tensor.detach().to(device=p.device, dtype=p.dtype))
            seen.add(id(p))
        missing = [n for i, n in unique.items() if i not in seen]
        if missing:
            raise ValueError(
                f"update_weights: {len(missing)} parameter(s) were not given, e.g. {missing[:3]}; "
                f"the rollout model would keep stale weights"
            )

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]


def make_hf_engine(
    rollout_cfg: Any, hf_config: Dict[str, Any], tokenizer: Any, weights_dir: Optional[str] = None
) -> HFEngine:
    """The model on the GPU when one is visible, else on CPU, in `rollout.hf_dtype` (unset: float32 on CPU,
    bfloat16 on a GPU; rollout/footprint.py, which the planner reads too); sub-batches of `rollout.max_batch`
    rows."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_hf_model(hf_config, weights_dir, dtype=engine_weight_dtype(rollout_cfg, device))
    model.to(device)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    return HFEngine(
        model,
        tokenizer,
        max_batch=int(getattr(rollout_cfg, "max_batch", 16)),
        pad_token_id=int(pad) if pad is not None else 0,
    )
