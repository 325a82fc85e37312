"""The on-policy self-distillation training loop (one `Trainer.run()` per job).

Each step, on every rank:
  draw prompts (this data-parallel rank's share) -> refit the rollout engine from the Megatron shards
  -> G rollouts per prompt (split across the model-parallel ranks, then all-gathered) -> rewards
  -> group advantages -> teacher pass (teacher prompt + the same response ids, no grad)
  -> [loss.kl_coef > 0: reference pass, the student sequences through the initial weights, no grad]
  -> student pass: fused token_stats -> token advantages -> policy loss (global token mean) -> backward
  -> finalise grads (TP/PP/DP) -> clip -> AdamW -> metrics -> checkpoint when due.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from ..config import ConfigError, ExperimentConfig, to_dict
from ..distributed.runtime import world_size
from ..models.layout import check_training_config as check_config
from .batch import Sample, make_micro_batches
from .signals import REQUEUE_EXIT_CODE, PreemptionFlag

log = logging.getLogger(__name__)
NONFINITE_EXIT_CODE = 3


class Trainer:
    def __init__(self, cfg: ExperimentConfig):
        from ..models import resolve_arch
        self.cfg = cfg
        self.arch = resolve_arch(cfg.model)
        self.dp = check_config(cfg, world_size(), self.arch)
        self.tokenizer = self._load_tokenizer()

        from ..distributed import init_distributed
        self.info = init_distributed(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.train.seed)
        from megatron.core import parallel_state as ps
        self.ps = ps
        self.mp_group = ps.get_model_parallel_group()
        self.mp_rank, self.mp_size = dist.get_rank(self.mp_group), dist.get_world_size(self.mp_group)

        from ..data import PromptBuilder, PromptSampler, load_problems
        self.builder = PromptBuilder(self.tokenizer, cfg.prompt)
        self.problems = load_problems(cfg.data.train_path, cfg.data, tokenizer=self.tokenizer,
                                      prompt_builder=self.builder)
        self.sampler = PromptSampler(self.problems, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
        self.eval_problems = None
        if cfg.train.eval_every and cfg.data.eval_path:
            self.eval_problems = list(load_problems(cfg.data.eval_path, cfg.data, tokenizer=self.tokenizer,
                                                    prompt_builder=self.builder))[: cfg.train.eval_samples]

        from ..models import build_model
        self.model = self._init_model(build_model(self.arch, cfg.model))
        from ..distributed.grads import attach_fp32_grad_accumulators
        attach_fp32_grad_accumulators([self.model])   # bf16 params: gradients summed in fp32 (main_grad)
        from .teacher import Teacher, frozen_copy
        self.teacher = Teacher(cfg.teacher, self.model, lambda: build_model(self.arch, cfg.model))
        # The k3 KL's reference policy: the initial weights (built before _resume loads the student's).
        self.reference: Optional[torch.nn.Module] = None
        if cfg.loss.kl_coef > 0:
            self.reference = self.teacher.copy if cfg.teacher.mode == "frozen" else \
                frozen_copy(self.model, lambda: build_model(self.arch, cfg.model))

        from .optim import build_optimizer, build_scheduler
        # parallel.distributed_optimizer: ZeRO-1, the AdamW states sharded over the data-parallel group.
        self.optimizer = build_optimizer([self.model], cfg.optim, dp_group=ps.get_data_parallel_group()
                                         if cfg.parallel.distributed_optimizer else None)
        self.scheduler = build_scheduler(self.optimizer, cfg.train.steps, cfg.optim)

        from ..rollout import SamplingParams, make_engine
        self.engine = make_engine(cfg.rollout, self.arch.to_hf_config(), self.tokenizer)
        self.sampling = SamplingParams.from_config(cfg.rollout, self.builder.eos_token_ids)

        self.out_dir = cfg.train.out_dir
        self.ckpt_root = os.path.join(self.out_dir, "checkpoints")
        self.step = 0
        self.counters = {"nonfinite_skipped": 0, "nonfinite_in_row": 0, "truncated_total": 0,
                         "reward_timeouts": 0}
        self._resume()
        from .logger import StepLogger
        self.logger = StepLogger(cfg, self.out_dir, cfg.train.steps, self.step, enabled=self.info.rank == 0)
        self.preempt = PreemptionFlag().install()

    # ---------------------------------------------------------------- setup
    def _load_tokenizer(self):
        from ..data import load_tokenizer
        path = self.cfg.tokenizer.path or self.cfg.model.hf_path
        if not path:
            raise ConfigError("tokenizer.path is not set and model.hf_path has no tokenizer: set tokenizer.path "
                              "to a Hugging Face tokenizer folder, 'qwen3' or 'byte'")
        try:
            tok = load_tokenizer(path)
        except FileNotFoundError as e:  # names the key already; a config problem, found before any work
            raise ConfigError(str(e)) from None
        if len(tok) > self.arch.vocab_size:
            raise ConfigError(f"tokenizer.path={path} has {len(tok)} tokens but the model's vocabulary holds "
                              f"{self.arch.vocab_size}: pick a matching tokenizer or model")
        return tok

    def _init_model(self, model: torch.nn.Module) -> torch.nn.Module:
        src = self.cfg.model
        if src.init_from == "hf":
            from ..checkpoint.hf_mapping import load_hf_weights
            load_hf_weights(model, self.arch, src.hf_path)
        elif src.init_from == "megatron":
            from ..checkpoint.megatron_format import load_model_checkpoint
            load_model_checkpoint(model, self.arch, src.load)
        return model

    def _resume(self) -> None:
        from ..checkpoint.train_state import find_latest, load_train_state
        r = self.cfg.train.resume
        path = None
        if r == "auto":
            path = find_latest(self.ckpt_root)
        elif r not in ("none", "", None):
            path = r
            if not os.path.isdir(path):
                raise ConfigError(f"train.resume={r}: no such checkpoint folder")
        if path is None:
            return
        state = load_train_state(path, self.model, self.arch, self.optimizer, self.scheduler,
                                 teacher=self.teacher.copy if self.teacher.needs_checkpoint else None)
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.counters.update(state.get("counters", {}))
        if self.info.rank == 0:
            log.info("resumed from %s at step %d", path, self.step)

    def save(self) -> str:
        from ..checkpoint.train_state import save_train_state
        state = {"step": self.step, "sampler": self.sampler.state_dict(), "counters": self.counters,
                 "config": to_dict(self.cfg), "arch": self.arch.to_hf_config()}
        return save_train_state(self.ckpt_root, self.step, self.model, self.arch, self.optimizer, self.scheduler,
                                state, keep_last=self.cfg.train.keep_last,
                                teacher=self.teacher.copy if self.teacher.needs_checkpoint else None,
                                tokenizer=self.tokenizer)

    # ---------------------------------------------------------------- one step
    def _rollouts(self, problems, student_prompts: List[List[int]]) -> List[Dict[str, Any]]:
        """G completions per problem, scored; identical list on every rank of the model-parallel group."""
        from ..checkpoint.hf_mapping import gather_hf_state_dict
        from ..rewards import score_batch
        from ..rollout.base import stable_seed
        cfg = self.cfg
        self.engine.update_weights(gather_hf_state_dict(self.model, self.arch))
        G = cfg.rollout.group_size
        prompts = [(i, student_prompts[i]) for i in range(len(problems)) for _ in range(G)]
        mine = list(range(self.mp_rank, len(prompts), self.mp_size))
        # One seed per rollout from (run seed, step, global rollout index): the same rollouts whatever the
        # TP/PP/DP layout and whichever rank generates them.
        first = self.info.dp_rank * len(prompts)
        seeds = [stable_seed(cfg.train.seed, self.step, first + k) for k in mine]
        comps = self.engine.generate([prompts[k][1] for k in mine], self.sampling, seeds=seeds) if mine else []
        rewards = [0.0] * len(comps)
        stats: Dict[str, Any] = {}
        if cfg.loss.uses_reward and comps:
            rewards, stats = score_batch([c.text for c in comps], [problems[prompts[k][0]].answer for k in mine],
                                         name=cfg.reward.name, timeout_s=cfg.reward.timeout_s,
                                         num_workers=cfg.reward.num_workers)
        if cfg.reward.truncated_reward is not None:
            rewards = [cfg.reward.truncated_reward if c.truncated else r for c, r in zip(comps, rewards)]
        local = [{"k": k, "response": list(c.response_ids), "text": c.text, "truncated": bool(c.truncated),
                  "reward": float(r)} for k, c, r in zip(mine, comps, rewards)]
        local_stats = {"timeouts": int(stats.get("timeouts", 0))}
        gathered: List[Any] = [None] * self.mp_size
        dist.all_gather_object(gathered, (local, local_stats), group=self.mp_group)
        out: List[Optional[Dict[str, Any]]] = [None] * len(prompts)
        for part, st in gathered:
            self.counters["reward_timeouts"] += st["timeouts"] if self.mp_rank == 0 else 0
            for rec in part:
                out[rec["k"]] = {**rec, "problem": prompts[rec["k"]][0]}
        return out  # type: ignore[return-value]

    def _all_reduce(self, values: List[float], group=None, op=dist.ReduceOp.SUM) -> List[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=op, group=group)
        return t.tolist()

    def train_step(self) -> Dict[str, float]:
        from ..distributed.grads import clip_grads, finalize_grads, zero_grads
        from ..losses import divergence_kind, group_advantages
        from .passes import reference_pass, student_pass, teacher_pass
        cfg, ps = self.cfg, self.ps
        timings: Dict[str, float] = {}
        t0 = time.monotonic()

        # Every rank draws the same global batch (same sampler state) and keeps its DP share.
        batch = self.sampler.next_batch(cfg.train.prompts_per_step)
        per = cfg.train.prompts_per_step // self.dp
        problems = batch[self.info.dp_rank * per:(self.info.dp_rank + 1) * per]

        # Each problem's two prompts, tokenized once per step.
        student_prompts = [self.builder.student_prompt_ids(p) for p in problems]
        teacher_prompts = [self.builder.teacher_prompt_ids(p) for p in problems]
        recs = self._rollouts(problems, student_prompts)
        timings["time/generate"] = time.monotonic() - t0

        G = cfg.rollout.group_size
        rewards = torch.tensor([r["reward"] for r in recs], dtype=torch.float32)
        adv = group_advantages(rewards, G, normalize_std=cfg.loss.normalize_std) if cfg.loss.uses_reward \
            else torch.zeros_like(rewards)
        samples = [Sample(student_prompt=student_prompts[r["problem"]], teacher_prompt=teacher_prompts[r["problem"]],
                          response=r["response"], advantage=float(a), reward=r["reward"],
                          truncated=r["truncated"], group=r["problem"])
                   for r, a in zip(recs, adv.tolist())]
        mbs = make_micro_batches(samples, cfg.parallel.micro_batch_size,
                                 pad_id=self.tokenizer.pad_token_id or 0)
        # The loss is a mean over the GLOBAL batch: tokens (token_mean) or sequences (seq_mean_token_mean).
        local_count = len(samples) if cfg.loss.aggregation == "seq_mean_token_mean" else \
            sum(len(s.response) for s in samples)
        denominator = self._all_reduce([local_count], ps.get_data_parallel_group())[0]

        # Teacher logits at the response positions are the step's largest buffer ([b, R, V/TP] each). Without
        # pipeline parallelism (and with one PPO epoch) each micro-batch's teacher pass runs right before its
        # student pass, so one micro-batch of them is alive at a time. With PP (or PPO epochs) every
        # micro-batch's teacher output is needed at once: then only its per-token log-prob and entropy are
        # kept, unless the loss compares the full distributions (OPSD reverse_kl / jsd).
        interleave = ps.get_pipeline_model_parallel_world_size() == 1 and cfg.train.ppo_epochs == 1
        tp_group = ps.get_tensor_model_parallel_group()
        reduce = None if divergence_kind(cfg.loss) else (self.arch.vocab_size, tp_group)
        t_teacher = 0.0
        t2 = time.monotonic()
        teacher_logits: Dict[int, Any] = {}
        if not interleave:
            teacher_logits = teacher_pass(self.teacher.model, mbs, reduce=reduce)
            t_teacher = time.monotonic() - t2
        old: Optional[Dict[int, torch.Tensor]] = {} if cfg.train.ppo_epochs > 1 else None
        mb_metrics: List[dict] = []
        skipped = False
        grad_norm = float("nan")
        ref_logprobs = None
        if self.reference is not None:   # [b, R] per micro-batch: small, so all at once
            tt = time.monotonic()
            ref_logprobs = reference_pass(self.reference, mbs, vocab_size=self.arch.vocab_size, tp_group=tp_group)
            timings["time/reference"] = time.monotonic() - tt
        pass_args = dict(denominator=denominator, vocab_size=self.arch.vocab_size, tp_group=tp_group,
                         old_logprobs=old, ref_logprobs=ref_logprobs)
        for _epoch in range(cfg.train.ppo_epochs):
            zero_grads([self.model])
            if interleave:
                mb_metrics = []
                for mb in mbs:
                    tt = time.monotonic()
                    one = teacher_pass(self.teacher.model, [mb])
                    t_teacher += time.monotonic() - tt
                    mb_metrics += student_pass(self.model, [mb], one, cfg.loss, **pass_args)
                    del one
            else:
                mb_metrics = student_pass(self.model, mbs, teacher_logits, cfg.loss, **pass_args)
            finalize_grads([self.model])
            tt = time.monotonic()
            grad_norm = clip_grads([self.model], cfg.optim.clip_grad)
            local_loss = sum(m.get("loss", 0.0) for m in mb_metrics)
            bad = 0.0 if (math.isfinite(grad_norm) and math.isfinite(local_loss)) else 1.0
            if self._all_reduce([bad], op=dist.ReduceOp.MAX)[0] > 0:
                skipped = True
                zero_grads([self.model])
                break
            self.optimizer.step()
            timings["time/optimizer"] = timings.get("time/optimizer", 0.0) + time.monotonic() - tt
        self.scheduler.step()
        timings["time/teacher"] = t_teacher
        timings["time/student"] = time.monotonic() - t2 - t_teacher - timings.get("time/optimizer", 0.0) \
            - timings.get("time/reference", 0.0)
        if skipped:
            self.counters["nonfinite_skipped"] += 1
            self.counters["nonfinite_in_row"] += 1
        else:
            self.counters["nonfinite_in_row"] = 0
        self.teacher.after_step(self.step)

        # ---- metrics (reduced over the last stage's data-parallel ranks; logged by rank 0)
        is_logger_rank = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        keys = sorted({k for m in mb_metrics for k in m})
        weights = [m.get("num_tokens", 1.0) for m in mb_metrics]
        local = {k: sum(m.get(k, 0.0) * w for m, w in zip(mb_metrics, weights)) / max(sum(weights), 1.0)
                 for k in keys}
        local["loss"] = sum(m.get("loss", 0.0) for m in mb_metrics)
        lengths = [len(s.response) for s in samples]
        local.update({
            "accuracy": float(rewards.mean()), "response_length": sum(lengths) / len(lengths),
            "truncated_frac": sum(s.truncated for s in samples) / len(samples),
            "zero_adv_group_frac": float((rewards.view(-1, G).std(dim=1) == 0).float().mean()),
        })
        gathered: List[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (is_logger_rank, local))
        parts = [m for ok, m in gathered if ok]
        metrics = {k: sum(p.get(k, 0.0) for p in parts) / len(parts) for k in parts[0]} if parts else {}
        metrics["loss"] = sum(p["loss"] for p in parts)  # each DP share is already globally normalised
        step_time = time.monotonic() - t0
        all_tokens = sum(len(s.student_prompt) + len(s.teacher_prompt) + 2 * len(s.response) for s in samples)
        metrics.update(timings)
        metrics.update({"grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0], "skipped": float(skipped),
                        "tokens_per_s": all_tokens * self.dp / step_time, "time/step": step_time,
                        "nonfinite_skipped_total": float(self.counters["nonfinite_skipped"])})
        if self.info.rank == 0 and cfg.train.sample_every and (self.step + 1) % cfg.train.sample_every == 0:
            self.logger.log_samples(self.step, [
                {"prompt": problems[r["problem"]].problem, "response": r["text"], "reward": r["reward"],
                 "advantage": s.advantage, "truncated": r["truncated"], "answer": problems[r["problem"]].answer}
                for r, s in zip(recs, samples)])
        return metrics

    # ---------------------------------------------------------------- validation
    def validate(self) -> Optional[Dict[str, float]]:
        if not self.eval_problems:
            return None
        result = None
        if self.info.rank == 0:
            from ..eval.validation import evaluate_problems
            from ..rollout import SamplingParams
            params = SamplingParams(temperature=0.0, top_p=1.0, top_k=0,
                                    max_new_tokens=self.cfg.rollout.max_new_tokens,
                                    stop_token_ids=self.builder.eos_token_ids, seed=self.cfg.train.seed)
            result, _ = evaluate_problems(self.engine, self.builder, self.eval_problems, self.cfg.reward.name, params)
        dist.barrier()
        return result

    # ---------------------------------------------------------------- main loop
    def run(self) -> int:
        cfg = self.cfg
        last_saved = self.step if self.step > 0 else -1
        try:
            while self.step < cfg.train.steps:
                metrics = self.train_step()
                self.logger.log_step(self.step, metrics)
                self.step += 1
                if self.counters["nonfinite_in_row"] >= cfg.train.max_nonfinite_in_row:
                    self.save()
                    self.logger.message(
                        f"aborting: {self.counters['nonfinite_in_row']} steps in a row had a non-finite loss or "
                        f"gradient (train.max_nonfinite_in_row={cfg.train.max_nonfinite_in_row}); the last good "
                        f"weights are saved in {self.ckpt_root}. Lower optim.lr or check the data.")
                    return NONFINITE_EXIT_CODE
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                    # The engine holds the weights it generated with this step; refit to the updated ones.
                    from ..checkpoint.hf_mapping import gather_hf_state_dict
                    self.engine.update_weights(gather_hf_state_dict(self.model, self.arch))
                    val = self.validate()
                    if val:
                        self.logger.log_eval(self.step - 1, val)
                if cfg.train.save_every and self.step % cfg.train.save_every == 0:
                    self.save()
                    last_saved = self.step
                flag = float(self.preempt.requested)
                if self._all_reduce([flag], op=dist.ReduceOp.MAX)[0] > 0:
                    if last_saved != self.step:
                        self.save()
                    self.logger.message(f"preempted at step {self.step}: checkpoint saved, exiting "
                                        f"{REQUEUE_EXIT_CODE} to be requeued")
                    return REQUEUE_EXIT_CODE
            if last_saved != self.step:
                self.save()
            self.logger.message(f"done: {self.step} steps; checkpoints in {self.ckpt_root}")
            return 0
        finally:
            self.logger.close()
            self.engine.close()


def train_main(config_path: Optional[str], overrides: List[str]) -> int:
    from ..config import load_config
    from ..distributed import teardown
    cfg = load_config(config_path, overrides)
    trainer = Trainer(cfg)
    try:
        code = trainer.run()
    finally:
        teardown()
    return code
