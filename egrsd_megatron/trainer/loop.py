"""The on-policy self-distillation training loop (one `Trainer.run()` per job).

Each step (`Trainer.train_step`), on every rank:
  1. draw prompts: every rank draws the same global batch and keeps its data-parallel share;
  2. rollouts (trainer/rollouts.py): refit the rollout engine from the Megatron shards -> G rollouts per
     prompt, split across the model-parallel ranks with per-rollout seeds -> rewards -> all-gather;
  3. group advantages -> micro-batches of (student prompt | teacher prompt) + the same response ids;
  4. update (trainer/update.py): teacher pass (no grad) [-> reference pass when loss.kl_coef > 0] ->
     student pass: fused token_stats -> token advantages -> policy loss (global token mean) -> backward,
     per PPO epoch -> finalise grads (TP/PP/DP) -> clip -> non-finite guard -> AdamW, scheduler;
  5. metrics (trainer/metrics.py): every micro-batch of every data-parallel rank reduced by its kind;
  6. sampled rollouts to samples.jsonl when due.
`run()` logs each step, validates and checkpoints when due, and stops on preemption or non-finite steps.
With train.async_save a save returns once its state is staged (checkpoint/async_save.py); the next save and every
return of `run()` wait for the write in flight and finalize it (an exception only waits for this rank's writer).

On-policy: every log-prob the update computes is of softmax(z / rollout.temperature), the distribution the
engine sampled from, and each step logs the engine-vs-trainer mismatch of the sampled tokens' log-probs
(logprob_diff_mean/_max, prob_ratio_error). Above rollout.max_logprob_diff a step warns; the first step a
process runs aborts instead (exit 4), since a mismatch there is a setup error, not drift.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..checkpoint.async_save import AsyncCheckpointSaver
from ..checkpoint.formats import load_checkpoint as load_model_checkpoint
from ..checkpoint.hf_mapping import load_hf_weights
from ..checkpoint.train_state import load_train_state, resolve_resume, save_train_state
from ..config import ConfigError, ExperimentConfig, load_config, to_dict
from ..config.schema import LossConfig
from ..data import PromptBuilder, PromptSampler, load_problems, load_tokenizer
from ..distributed import init_distributed, teardown
from ..distributed.grads import attach_fp32_grad_accumulators
from ..distributed.runtime import world_size
from ..eval.validation import evaluate_problems
from ..losses import group_advantages, teacher_pass_needed, weight_copies
from ..models import build_model, resolve_arch
from ..models.layout import check_training_config as check_config
from ..rollout import SamplingParams, make_engine
from ..rollout.sampling import check_training_sampling
from .batch import MicroBatch, Sample, make_micro_batches, packed_micro_batches
from .logger import StepLogger
from .metrics import Record, reduce_metrics, rollout_record
from .optim import build_optimizer, build_scheduler
from .passes import scoring_for
from .rollouts import Rollouts, collect_rollouts, refit, to_samples
from .sample_fields import per_token_fields, sample_entropies
from .signals import REQUEUE_EXIT_CODE, PreemptionFlag
from .teacher import Teacher, frozen_copy
from .update import UpdateResult, local_denominator, run_update

log = logging.getLogger(__name__)
NONFINITE_EXIT_CODE = 3
OFF_POLICY_EXIT_CODE = 4  # the first step's engine/trainer log-prob mismatch is above rollout.max_logprob_diff


class Trainer:
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.arch = resolve_arch(cfg.model)
        self.world_size = world_size()  # the one read of the world size in the trainer (the metrics all-gather)
        self.dp = check_config(cfg, self.world_size, self.arch)
        check_training_sampling(cfg.rollout)  # T = 0 or a truncated distribution: refused, naming the key
        self.tokenizer = self._load_tokenizer()

        self.info = init_distributed(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.train.seed)
        self.mp_group = ps.get_model_parallel_group()
        self.mp_rank = dist.get_rank(self.mp_group)
        self.scoring = scoring_for(cfg, self.arch.vocab_size, ps.get_tensor_model_parallel_group())

        self.builder = PromptBuilder(self.tokenizer, cfg.prompt)
        self.problems = load_problems(
            cfg.data.train_path, cfg.data, tokenizer=self.tokenizer, prompt_builder=self.builder
        )
        self.sampler = PromptSampler(self.problems, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
        self.eval_problems = None
        if cfg.train.eval_every and cfg.data.eval_path:
            self.eval_problems = list(
                load_problems(cfg.data.eval_path, cfg.data, tokenizer=self.tokenizer, prompt_builder=self.builder)
            )[: cfg.train.eval_samples]

        self.model = self._init_model(build_model(self.arch, cfg.model))
        attach_fp32_grad_accumulators([self.model])  # bf16 params: gradients summed in fp32 (main_grad)
        teacher_copy, reference_copy = weight_copies(cfg.loss, cfg.teacher.mode, cfg.teacher.log_entropy)
        self.teacher = Teacher(cfg.teacher, self.model, lambda: build_model(self.arch, cfg.model), teacher_copy)
        # The k3 KL's reference policy: the initial weights (built before _resume loads the student's).
        self.reference: Optional[torch.nn.Module] = None
        if cfg.loss.kl_coef > 0:
            self.reference = (
                frozen_copy(self.model, lambda: build_model(self.arch, cfg.model))
                if reference_copy
                else self.teacher.copy
            )

        # parallel.distributed_optimizer: ZeRO-1, the AdamW states sharded over the data-parallel group.
        self.optimizer = build_optimizer(
            [self.model],
            cfg.optim,
            dp_group=ps.get_data_parallel_group() if cfg.parallel.distributed_optimizer else None,
        )
        self.scheduler = build_scheduler(self.optimizer, cfg.train.steps, cfg.optim)

        self.engine = make_engine(cfg.rollout, self.arch.to_hf_config(), self.tokenizer)
        self.sampling = SamplingParams.from_config(cfg.rollout, self.builder.eos_token_ids, tokenizer=self.tokenizer)

        self.out_dir = cfg.train.out_dir
        self.ckpt_root = os.path.join(self.out_dir, "checkpoints")
        # train.async_save: the checkpoint write in flight, finished at the next save and when run() returns.
        self.saver = AsyncCheckpointSaver() if cfg.train.async_save else None
        self.step = 0
        self.counters = {"nonfinite_skipped": 0, "nonfinite_in_row": 0, "truncated_total": 0, "reward_timeouts": 0}
        self._resume()
        self.logger = StepLogger(cfg, self.out_dir, cfg.train.steps, self.step, enabled=self.info.rank == 0)
        self.preempt = PreemptionFlag().install()

    # ---------------------------------------------------------------- setup
    def _load_tokenizer(self):
        path = self.cfg.tokenizer.path or self.cfg.model.hf_path
        if not path:
            raise ConfigError(
                "tokenizer.path is not set and model.hf_path has no tokenizer: set tokenizer.path "
                "to a Hugging Face tokenizer folder, 'qwen3' or 'byte'"
            )
        try:
            tok = load_tokenizer(path)
        except FileNotFoundError as e:  # names the key already; a config problem, found before any work
            raise ConfigError(str(e)) from None
        if len(tok) > self.arch.vocab_size:
            raise ConfigError(
                f"tokenizer.path={path} has {len(tok)} tokens but the model's vocabulary holds "
                f"{self.arch.vocab_size}: pick a matching tokenizer or model"
            )
        return tok

    def _init_model(self, model: torch.nn.Module) -> torch.nn.Module:
        src = self.cfg.model
        if src.init_from == "hf":
            load_hf_weights(model, self.arch, src.hf_path)
        elif src.init_from == "megatron":
            load_model_checkpoint(model, self.arch, src.load)
        return model

    def _resume(self) -> None:
        # Verified against its manifest; auto skips damaged newer folders with a warning.
        path = resolve_resume(self.cfg.train.resume, self.ckpt_root)
        if path is None:
            return
        state = load_train_state(
            path,
            self.model,
            self.arch,
            self.optimizer,
            self.scheduler,
            teacher=self.teacher.copy if self.teacher.needs_checkpoint else None,
            verified=True,
        )
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.counters.update(state.get("counters", {}))
        if self.info.rank == 0:
            log.info("resumed from %s at step %d", path, self.step)

    def save(self) -> str:
        state = {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "counters": self.counters,
            "config": to_dict(self.cfg),
            "arch": self.arch.to_hf_config(),
        }
        return save_train_state(
            self.ckpt_root,
            self.step,
            self.model,
            self.arch,
            self.optimizer,
            self.scheduler,
            state,
            keep_last=self.cfg.train.keep_last,
            teacher=self.teacher.copy if self.teacher.needs_checkpoint else None,
            tokenizer=self.tokenizer,
            fmt=self.cfg.train.ckpt_format,
            async_saver=self.saver,
        )

    # ---------------------------------------------------------------- one step
    def train_step(self) -> Dict[str, float]:
        """One step (the module docstring's 1-6); returns the metrics to log."""
        cfg = self.cfg
        t0 = time.monotonic()
        problems = self._draw_problems()
        student_prompts = [self.builder.student_prompt_ids(p) for p in problems]  # tokenized once per step
        teacher_prompts = [self.builder.teacher_prompt_ids(p) for p in problems]
        refit(self.engine, self.model, self.arch)
        rollouts = collect_rollouts(
            cfg,
            self.engine,
            self.sampling,
            problems,
            student_prompts,
            step=self.step,
            dp_rank=self.info.dp_rank,
            mp_group=self.mp_group,
        )
        self.engine.sleep()  # vllm sleep mode: the engine's memory is free for the passes (else a no-op)
        if self.mp_rank == 0:  # the same count on every rank of the group: counted once
            self.counters["reward_timeouts"] += rollouts.reward_timeouts
        t_generate = time.monotonic() - t0

        adv, zero_adv_group_frac = self._advantages(rollouts.rewards())
        samples = to_samples(rollouts, student_prompts, teacher_prompts, adv.tolist())
        loss_cfg = self._loss_at_step()
        mbs = self._micro_batches(samples, teacher_pass_needed(loss_cfg, cfg.teacher.log_entropy))
        # The loss is a mean over the GLOBAL batch: tokens (token_mean) or sequences (seq_mean_token_mean).
        denominator = self._all_reduce(
            [local_denominator(samples, cfg.loss.aggregation)], ps.get_data_parallel_group()
        )[0]
        update = run_update(
            cfg,
            self.model,
            self.teacher.model,
            self.reference,
            self.optimizer,
            self.scheduler,
            mbs,
            denominator=denominator,
            scoring=self.scoring,
            pp_size=ps.get_pipeline_model_parallel_world_size(),
            all_reduce_max=lambda v: self._all_reduce([v], op=dist.ReduceOp.MAX)[0],
            loss_cfg=loss_cfg,
        )
        self._count_nonfinite(update.skipped)
        self.teacher.after_step(self.step)

        metrics = self._reduce_metrics([*update.records, rollout_record(rollouts, zero_adv_group_frac)])
        step_time = time.monotonic() - t0
        metrics.update({"time/generate": t_generate, **update.timings})
        metrics.update(self._step_scalars(update, samples, step_time))
        if cfg.loss.ratio.lam_end is not None:
            metrics["lam"] = loss_cfg.ratio.lam
        if self.info.rank == 0 and cfg.train.sample_every and (self.step + 1) % cfg.train.sample_every == 0:
            self._log_samples(
                problems, rollouts, samples, sample_entropies(mbs, update.records, len(samples)), loss_cfg
            )
        return metrics

    def _micro_batches(self, samples: List[Sample], teacher: bool) -> List[MicroBatch]:
        """This rank's micro-batches: `parallel.micro_batch_size` padded rows of its own samples, or with
        `parallel.max_tokens_per_micro_batch` packs of the step's samples gathered over the data-parallel
        group and balanced over its ranks (the same plan on every rank: trainer/batch.py), each pack its own
        length at any PP size (variable_seq_lengths: trainer/passes.py)."""
        par, pad_id = self.cfg.parallel, self.tokenizer.pad_token_id or 0
        if not par.packing:
            return make_micro_batches(samples, par.micro_batch_size, pad_id=pad_id)
        group = ps.get_data_parallel_group()
        gathered: List[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, samples, group=group)  # token ids and floats: small next to a pass
        budget = par.max_tokens_per_micro_batch
        return packed_micro_batches(
            [s for part in gathered for s in part],
            budget,
            self.info.dp_rank,
            self.dp,
            pad_id=pad_id,
            teacher=teacher,
        )

    def _loss_at_step(self):
        """The loss knobs of this step: cfg.loss with the scheduled values (loss.ratio.lam -> lam_end) applied."""
        ratio = self.cfg.loss.ratio
        if ratio.lam_end is None:
            return self.cfg.loss
        return dataclasses.replace(self.cfg.loss, ratio=dataclasses.replace(ratio, lam=ratio.lam_at(self.step)))

    def off_policy_message(self, metrics: Dict[str, float]) -> Optional[str]:
        """A warning when the engine's sampled-token log-probs differ from the trainer's by more than
        rollout.max_logprob_diff (mean |delta| over the step's valid tokens); None when they agree."""
        diff, limit = metrics.get("logprob_diff_mean"), self.cfg.rollout.max_logprob_diff
        if diff is None or diff <= limit:
            return None
        return (
            f"the rollout engine's log-probs of the sampled tokens differ from the trainer's by "
            f"{diff:.3g} on average (max {metrics.get('logprob_diff_max', float('nan')):.3g}; "
            f"rollout.max_logprob_diff={limit}): the update is off-policy. Likely causes: the engine was not "
            f"refitted with the current weights, it samples at another temperature than "
            f"rollout.temperature={self.cfg.rollout.temperature}, or its precision (rollout.vllm_dtype, "
            f"bf16) is too low for this threshold"
        )

    def _draw_problems(self) -> list:
        """Every rank draws the same global batch (same sampler state) and keeps its data-parallel share."""
        batch = self.sampler.next_batch(self.cfg.train.prompts_per_step)
        per = self.cfg.train.prompts_per_step // self.dp
        return batch[self.info.dp_rank * per : (self.info.dp_rank + 1) * per]

    def _advantages(self, rewards: torch.Tensor) -> Tuple[torch.Tensor, float]:
        """(A_i per rollout, the fraction of groups whose rewards are all equal, i.e. A = 0 exactly);
        A = 0 for a reward-free loss."""
        adv, stats = group_advantages(
            rewards, self.cfg.rollout.group_size, normalize_std=self.cfg.loss.normalize_std, return_metrics=True
        )
        return (adv if self.cfg.loss.spec.uses_reward else torch.zeros_like(rewards)), stats["zero_adv_group_frac"]

    def _all_reduce(self, values: List[float], group=None, op=dist.ReduceOp.SUM) -> List[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=op, group=group)
        return t.tolist()

    def _count_nonfinite(self, skipped: bool) -> None:
        if skipped:
            self.counters["nonfinite_skipped"] += 1
            self.counters["nonfinite_in_row"] += 1
        else:
            self.counters["nonfinite_in_row"] = 0

    def _reduce_metrics(self, records: List[Record]) -> Dict[str, float]:
        """All data-parallel ranks' records (from the last pipeline stage, tensor-parallel rank 0) reduced."""
        is_logger_rank = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        gathered: List[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, records if is_logger_rank else None)
        return reduce_metrics([g for g in gathered if g is not None])

    def _step_scalars(self, update: UpdateResult, samples: List[Sample], step_time: float) -> Dict[str, float]:
        all_tokens = sum(len(s.student_prompt) + len(s.teacher_prompt) + 2 * len(s.response) for s in samples)
        return {
            "grad_norm": update.grad_norm,
            "lr": self.scheduler.get_last_lr()[0],
            "skipped": float(update.skipped),
            "tokens_per_s": all_tokens * self.dp / step_time,
            "time/step": step_time,
            "nonfinite_skipped_total": float(self.counters["nonfinite_skipped"]),
        }

    def _log_samples(
        self,
        problems: list,
        rollouts: Rollouts,
        samples: List[Sample],
        entropies: Dict[int, torch.Tensor],
        loss_cfg: LossConfig,
    ) -> None:
        rows = []
        for i, (r, s) in enumerate(zip(rollouts.items, samples)):
            row = {
                "prompt": problems[r.problem].problem,
                "response": r.text,
                "reward": r.reward,
                "advantage": s.advantage,
                "truncated": r.truncated,
                "answer": problems[r.problem].answer,
            }
            if i in entropies:
                row.update(per_token_fields(self.tokenizer, s.response, entropies[i], loss_cfg, self.arch.vocab_size))
            rows.append(row)
        self.logger.log_samples(self.step, rows)

    # ---------------------------------------------------------------- validation
    def validate(self) -> Optional[Dict[str, float]]:
        if not self.eval_problems:
            return None
        result = None
        if self.info.rank == 0:
            params = SamplingParams(
                temperature=0.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=self.cfg.rollout.max_new_tokens,
                stop_token_ids=self.builder.eos_token_ids,
                seed=self.cfg.train.seed,
            )
            result, _ = evaluate_problems(self.engine, self.builder, self.eval_problems, self.cfg.reward.name, params)
        dist.barrier()
        return result

    # ---------------------------------------------------------------- main loop
    def run(self) -> int:
        cfg = self.cfg
        last_saved = self.step if self.step > 0 else -1
        start = self.step
        try:
            while self.step < cfg.train.steps:
                metrics = self.train_step()
                self.logger.log_step(self.step, metrics)
                first_step = self.step == start
                self.step += 1
                off_policy = self.off_policy_message(metrics)  # the same metrics on every rank
                if off_policy and first_step:
                    self.logger.message(f"aborting at the first step: {off_policy}")
                    return OFF_POLICY_EXIT_CODE
                if off_policy:
                    self.logger.message(f"warning, step {self.step}: {off_policy}")
                if self.counters["nonfinite_in_row"] >= cfg.train.max_nonfinite_in_row:
                    self.save()
                    self.logger.message(
                        f"aborting: {self.counters['nonfinite_in_row']} steps in a row had a non-finite loss or "
                        f"gradient (train.max_nonfinite_in_row={cfg.train.max_nonfinite_in_row}); the last good "
                        f"weights are saved in {self.ckpt_root}. Lower optim.lr or check the data."
                    )
                    return NONFINITE_EXIT_CODE
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                    # The engine holds the weights it generated with this step; refit to the updated ones.
                    refit(self.engine, self.model, self.arch)
                    val = self.validate()
                    self.engine.sleep()
                    if val:
                        self.logger.log_eval(self.step - 1, val)
                if cfg.train.save_every and self.step % cfg.train.save_every == 0:
                    self.save()
                    last_saved = self.step
                flag = float(self.preempt.requested)
                if self._all_reduce([flag], op=dist.ReduceOp.MAX)[0] > 0:
                    if last_saved != self.step:
                        self.save()
                    self.logger.message(
                        f"preempted at step {self.step}: checkpoint saved, exiting {REQUEUE_EXIT_CODE} to be requeued"
                    )
                    return REQUEUE_EXIT_CODE
            if last_saved != self.step:
                self.save()
            self.logger.message(f"done: {self.step} steps; checkpoints in {self.ckpt_root}")
            return 0
        except BaseException:
            if self.saver is not None:  # the other ranks may be anywhere: wait for this rank's writer only
                self.saver.abandon()
            raise
        finally:
            try:
                if self.saver is not None:  # every return: the last checkpoint is complete before run() returns
                    self.saver.wait()
            finally:
                self.logger.close()
                self.engine.close()


def train_main(config_path: Optional[str], overrides: List[str]) -> int:
    cfg = load_config(config_path, overrides)
    trainer = Trainer(cfg)
    try:
        code = trainer.run()
    finally:
        teardown()
    return code
