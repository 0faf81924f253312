"""Experiment tracking behind one small interface: Weights & Biases (offline by default) or nothing.

One W&B run per stage: ``group`` = the pipeline run id, ``job_type`` = the stage, the resolved config
(secrets removed) as its config, the stage's history and final metrics as its metrics, and its sample
tables (``stages.io.samples``) as W&B Tables, one per moment under its own key (``<stage>/samples/step-
000040``, ``<stage>/samples/final``), so a later table never replaces an earlier one. Each stage
logs its adapter as a W&B artifact whose inputs are its datasets and upstream adapters, giving the
lineage dataset -> SFT adapter -> PPO policy (and preferences -> reward adapter -> PPO policy).

The mode is always explicit, so nothing waits on a network: ``tracking.mode: offline`` (default) writes
``runs/<id>/wandb/offline-run-*`` (upload later with ``wandb sync``); ``online`` needs a key
(``WANDB_API_KEY``). ``tracking.backend: none`` turns tracking off. Training never depends on it: a
tracking failure is reported and training goes on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from stages.io.config import PipelineConfig
from stages.io.samples import COLUMNS, read_samples


class Tracker(Protocol):
    def log_history(self, rows: list[dict[str, Any]], step_key: str) -> None: ...

    def finish(self, metrics: dict[str, Any], artifact: Path | None, inputs: dict[str, Path]) -> None: ...


class NoTracker:
    def log_history(self, rows: list[dict[str, Any]], step_key: str) -> None:
        pass

    def finish(self, metrics: dict[str, Any], artifact: Path | None, inputs: dict[str, Path]) -> None:
        pass


class WandbTracker:
    def __init__(self, cfg: PipelineConfig, stage: str, run_dir: Path, datasets: dict[str, str]) -> None:
        import wandb

        if cfg.tracking.mode == "online" and not os.environ.get("WANDB_API_KEY"):
            raise ValueError("tracking.mode=online needs WANDB_API_KEY in the environment (or use offline)")
        run_dir.mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        self._stage = stage
        self._group = run_dir.name  # names this run's W&B runs and artifacts
        self._datasets = datasets
        self._online = cfg.tracking.mode == "online"
        self.run = wandb.init(
            project=cfg.tracking.project,
            group=cfg.tracking.group or self._group,
            job_type=stage,
            name=f"{self._group}-{stage}",
            dir=str(run_dir),
            mode=cfg.tracking.mode,
            config=cfg.model_dump(mode="json"),
            reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )

    def log_history(self, rows: list[dict[str, Any]], step_key: str) -> None:
        for row in rows:
            numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != step_key}
            self.run.log({f"{self._stage}/{k}": v for k, v in numbers.items()}, step=int(row.get(step_key, 0)))

    def finish(self, metrics: dict[str, Any], artifact: Path | None, inputs: dict[str, Path]) -> None:
        try:
            if artifact is not None:
                self._log_samples(read_samples(artifact))
        except Exception as err:  # tracking must never fail a finished stage, nor lose what follows
            print(f"warning: W&B sample tables failed for {self._stage}: {err}", flush=True)
        try:
            self._log_lineage(artifact, inputs)
            self.run.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
            self.run.summary["warnings"] = "; ".join(metrics.get("warnings", []))
            for warning in metrics.get("warnings", []):  # W&B shows alerts on the run page, offline too after sync
                self.run.alert(
                    title=f"{self._stage}: training warning", text=warning, level=self._wandb.AlertLevel.WARN
                )
        except Exception as err:  # tracking must never fail a finished stage
            print(f"warning: W&B logging failed for {self._stage}: {err}", flush=True)
        finally:
            self.run.finish()

    def _log_samples(self, rows: list[dict[str, Any]]) -> None:
        """One W&B Table per (phase, step) of the sample rows, each under a key of its own."""
        tables: dict[str, list[list[Any]]] = {}
        for row in rows:
            name = "final" if row["phase"] == "final" else f"{row['phase']}-{row['step']:06d}"
            tables.setdefault(name, []).append([row.get(column) for column in COLUMNS])
        for name, data in tables.items():
            self.run.log({f"{self._stage}/samples/{name}": self._wandb.Table(columns=list(COLUMNS), data=data)})

    def _log_lineage(self, artifact: Path | None, inputs: dict[str, Path]) -> None:
        """Datasets and upstream adapters feed this stage's adapter artifact. Online, that is real W&B
        lineage (``use_artifact``); W&B refuses ``use_artifact`` offline, so there the same edges go
        into the artifact's metadata (and the run's config) to survive ``wandb sync``."""
        uses = {f"data-{kind}": source for kind, source in self._datasets.items()}
        uses.update({stage: f"{self._group}-{stage}-adapter:latest" for stage in inputs})
        self.run.config.update({"lineage": uses}, allow_val_change=True)
        if self._online:
            for kind, source in self._datasets.items():
                data = self._wandb.Artifact(f"{self._group}-data-{kind}", type="dataset", metadata={"source": source})
                if Path(source).is_file():
                    data.add_file(source)
                self.run.use_artifact(data)
            for stage in inputs:
                self.run.use_artifact(uses[stage])
        if artifact is not None:
            self.run.log_artifact(self._adapter_artifact(self._stage, artifact, uses))

    def _adapter_artifact(self, stage: str, folder: Path, uses: dict[str, str]) -> Any:
        metadata = {"stage": stage, "inputs": uses}
        art = self._wandb.Artifact(f"{self._group}-{stage}-adapter", type="adapter", metadata=metadata)
        adapter = Path(folder) / "adapter"
        if adapter.is_dir():
            art.add_dir(str(adapter))
        return art


def start_tracking(cfg: PipelineConfig, stage: str, run_dir: Path, datasets: dict[str, str]) -> Tracker:
    """The tracker the config asks for; a W&B start-up failure degrades to no tracking, with a warning."""
    if cfg.tracking.backend == "none":
        return NoTracker()
    os.environ["WANDB_MODE"] = cfg.tracking.mode  # also what the HF trainer's W&B callback will use
    try:
        return WandbTracker(cfg, stage, run_dir, datasets)
    except Exception as err:  # tracking must never stop training
        print(f"warning: W&B tracking disabled for {stage}: {err}", flush=True)
        return NoTracker()
