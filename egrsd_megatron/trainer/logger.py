"""Step logging: a console line every `train.log_every` steps with rate and ETA, TensorBoard scalars and W&B
(when configured) at the same steps, `metrics.jsonl` (one JSON object EVERY step), `validation.jsonl` (one
per validation) and sampled rollouts to `samples.jsonl`. Only global rank 0 logs.

Console: on a terminal the lines scroll above a tqdm progress bar; when stdout or stderr is not a terminal
(CI, a Slurm log, `> file`) there is no bar, only the step lines, one per logged step (a bar redrawn with
carriage returns would interleave fragments with them in the file).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ..config import ConfigError, ExperimentConfig, to_dict
from ..eval.validation import validation_scalars
from ..utils import atomic_write_text
from ..utils.progress import interactive


def _truncate_after(path: str, step: int) -> None:
    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(keep))


class StepLogger:
    def __init__(self, cfg: ExperimentConfig, out_dir: str, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self.total, self.start = total_steps, start_step
        self.every = cfg.train.log_every
        if self.every < 1:
            raise ConfigError(f"train.log_every={self.every} must be >= 1 (metrics.jsonl gets every step regardless)")
        self.t0 = time.monotonic()
        self.tb = self.wandb = self.bar = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.samples_path = os.path.join(out_dir, "samples.jsonl")
        self.validation_path = os.path.join(out_dir, "validation.jsonl")
        # Resuming: drop lines of steps after the checkpoint (a killed run may have logged them), so the
        # files read as one uninterrupted run.
        for path in (self.metrics_path, self.samples_path, self.validation_path):
            _truncate_after(path, start_step)
        if cfg.logging.tensorboard:
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
        if cfg.logging.wandb_project:
            import wandb  # optional extra: pip install egrsd_megatron[wandb]

            self.wandb = wandb.init(
                project=cfg.logging.wandb_project, name=cfg.logging.wandb_run, config=to_dict(cfg), resume="allow"
            )
        if interactive():
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def log_step(self, step: int, m: Dict[str, float]) -> None:
        if not self.enabled:
            return
        done = step + 1 - self.start
        elapsed = time.monotonic() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step - 1) / rate if rate > 0 else float("nan")
        m = {"step": step + 1, **m, "elapsed_s": elapsed, "eta_s": eta}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(m) + "\n")
        if self.bar is not None:
            self.bar.update(1)
        if (step + 1) % self.every and step + 1 != self.total:
            return  # console, TensorBoard and W&B every train.log_every steps (and the last one)
        if self.tb is not None:
            for k, v in m.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k if "/" in k else f"train/{k}", v, step + 1)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(m, step=step + 1)
        line = (
            f"step {step + 1}/{self.total} | acc {m.get('accuracy', float('nan')):.3f} "
            f"| len {m.get('response_length', float('nan')):.1f} | loss {m.get('loss', float('nan')):+.4f} "
            f"| gate {m.get('gate_mean', float('nan')):.3f} floor {m.get('gate_floor_frac', float('nan')):.3f} "
            f"| gen {m.get('time/generate', 0):.1f}s teach {m.get('time/teacher', 0):.1f}s "
            + (f"ref {m['time/reference']:.1f}s " if "time/reference" in m else "")
            + f"train {m.get('time/student', 0):.1f}s opt {m.get('time/optimizer', 0):.1f}s "
            + (f"| kl_ref {m['kl_ref_mean']:.2e} " if "kl_ref_mean" in m else "")
            + f"| {m.get('tokens_per_s', 0):.0f} tok/s | ETA {eta:.0f}s"
        )
        self._print(line)

    def log_eval(self, step: int, m: Dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.validation_path, "a") as f:
            f.write(json.dumps({"step": step + 1, **{f"val/{k}": v for k, v in m.items()}}) + "\n")
        if self.tb is not None:
            for name, v in validation_scalars(m).items():
                self.tb.add_scalar(name, v, step + 1)
        if self.wandb is not None:
            self.wandb.log({f"val/{k}": v for k, v in m.items()}, step=step + 1)
        self._print(
            f"step {step + 1} validation: "
            + ", ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, (int, float)))
        )

    def log_samples(self, step: int, records: List[Dict[str, Any]]) -> None:
        if not self.enabled:
            return
        with open(self.samples_path, "a") as f:
            for r in records:
                f.write(json.dumps({"step": step + 1, **r}) + "\n")

    def message(self, text: str) -> None:
        if self.enabled:
            self._print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
