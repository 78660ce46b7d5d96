"""Where the trainer's metrics go: :class:`LogConfig` (what to log, how often) and :class:`Trackers` (a tqdm
bar, wandb, TensorBoard; rank 0 only). None of it changes what is trained."""
from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Iterable

from tqdm.auto import tqdm

from dlmscope.util import distributed as D

__all__ = ["LogConfig", "Trackers"]

#: the per-SAE metrics of a record, also the keys sent to wandb / TensorBoard as ``k{k}_n{n}/{key}`` (Top-K)
SAE_METRICS = ("fve", "mse", "l0", "dead", "auxk", "loss")


@dataclasses.dataclass
class LogConfig:
    """Logging options of a :class:`~dlmscope.train.trainer.Trainer` (the recipe is
    :class:`~dlmscope.train.trainer.TrainConfig`)."""

    #: metrics (FVE, MSE, L0, dead, AuxK, loss, tokens/s) every this many steps, 0 = only at the last step. A log
    #: step reads the metrics and the deferred NaN flag back from the device (a host sync); other steps do not.
    log_every: int = 100
    progress: bool = True
    #: label of the progress bar
    progress_desc: str = "SAE training"
    wandb_project: str | None = None
    wandb_run_name: str | None = None
    tensorboard_dir: str | None = None

    def __post_init__(self):
        if isinstance(self.log_every, bool) or not isinstance(self.log_every, int) or self.log_every < 0:
            raise ValueError(f"LogConfig.log_every must be a non-negative int, got {self.log_every!r}")

    def logs_at(self, step: int, total_steps: int) -> bool:
        """Whether step ``step`` (1-based, just taken) logs: every ``log_every`` steps and the last one."""
        return step == total_steps or (bool(self.log_every) and step % self.log_every == 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, ignore: Iterable[str] = ()) -> "LogConfig":
        """From a dict of LogConfig fields; keys in ``ignore`` are skipped (``TrainConfig.split_dict`` passes the
        recipe's, so one saved dict holding both recipe and logging options splits in two). Others raise."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known - set(ignore)
        if unknown:
            raise ValueError(f"unknown LogConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k in known})


class Trackers:
    """The run's progress bar and metric sinks, opened on rank 0 only; ``close()`` ends them all.

    ``run_config`` is what wandb records as the run's config. Records are the trainer's history entries:
    ``{"step", "tokens", "lr", "sae": [{"arch", "k", "n", *SAE_METRICS}, ...]}``; :meth:`emit` adds
    ``tokens_per_s``. Sinks get ``k{k}_n{n}/{metric}`` per Top-K SAE, ``{arch}_k{k}_n{n}/{metric}`` per other SAE.
    """

    def __init__(self, log: LogConfig, run_config: dict, total_steps: int, step: int, tokens: int):
        self.bar = self.wandb = self.tensorboard = None
        self._t_last, self._tokens_last = time.perf_counter(), tokens
        if not D.is_main():
            return
        if log.progress:
            self.bar = tqdm(total=total_steps, initial=step, unit="step", desc=log.progress_desc)
        if log.wandb_project:
            try:
                import wandb  # type: ignore[import-not-found]
                self.wandb = wandb.init(project=log.wandb_project, name=log.wandb_run_name, config=run_config)
            except ImportError:
                warnings.warn("wandb_project is set but wandb is not installed; not logging to wandb", stacklevel=4)
        if log.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(log.tensorboard_dir)
            except ImportError:
                warnings.warn("tensorboard_dir is set but tensorboard is not installed; not logging to it",
                              stacklevel=4)

    def advance(self) -> None:
        """One step done."""
        if self.bar is not None:
            self.bar.update(1)

    def emit(self, record: dict) -> None:
        """Add ``tokens_per_s`` (since the previous record) to ``record`` and send it to every sink."""
        now = time.perf_counter()
        record["tokens_per_s"] = (record["tokens"] - self._tokens_last) / max(now - self._t_last, 1e-9)
        self._t_last, self._tokens_last = now, record["tokens"]
        if self.bar is not None:
            fves = [r["fve"] for r in record["sae"]]
            self.bar.set_postfix(fve=f"{min(fves):.3f}-{max(fves):.3f}", dead=sum(r["dead"] for r in record["sae"]),
                                 tok_s=f"{record['tokens_per_s']:.3g}")
        flat = {"lr": record["lr"], "tokens": record["tokens"], "tokens_per_s": record["tokens_per_s"]}
        for r in record["sae"]:
            # a Top-K SAE's keys name k and n; another architecture's are prefixed with it (no clash in a mixed run)
            name = f"k{r['k']}_n{r['n']}" if r.get("arch", "topk") == "topk" else f"{r['arch']}_k{r['k']}_n{r['n']}"
            for key in SAE_METRICS:
                flat[f"{name}/{key}"] = r[key]
        if self.wandb is not None:
            self.wandb.log(flat, step=record["step"])
        if self.tensorboard is not None:
            for key, value in flat.items():
                self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
