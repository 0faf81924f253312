"""Pre-flight: everything ``rlhf run``/``stage``/``resume``/``sweep`` check before a run folder or a stage
process exists, so a bad setting fails in one line, in seconds.

In this process (torch-free): the device, the launches, every dataset, and the memory plan. In processes
of their own, because they need transformers: building the built-in backbone on first use (``python -m
stages.model.builtin_backbone``), and the tokenization contract on the data with the LoRA targets on the
backbone (``python -m stages.tools.contract_check``), which runs while the memory plan is computed here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from flows.memory_check import check_memory
from stages.io.backbone_files import BackboneError, is_builtin_chat, unbuilt_builtin
from stages.io.config import BackboneSection, PipelineConfig
from stages.io.data import DataError
from stages.io.deepspeed_config import check_launch
from stages.io.devices import device_type
from stages.io.provenance import check_datasets

CHECK_TIMEOUT_S = 900  # a check silent this long (a stalled tokenizer download) ends, not the command


class ConfigProcess:
    """``python -m <module> --config <cfg as a temporary file> [args]`` in a process of its own: the
    CLI's process never imports torch. ``close`` ends it (if still running) and removes the file."""

    def __init__(self, module: str, cfg: PipelineConfig, *args: str, capture: bool = True) -> None:
        self.folder = tempfile.TemporaryDirectory(prefix="rlhf-config-")
        config = Path(self.folder.name) / "config.yaml"
        config.write_text(cfg.to_yaml())
        pipe = subprocess.PIPE if capture else None
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, "--config", str(config), *args], stdout=pipe, stderr=pipe, text=True
        )

    def wait(self, timeout: float | None = None) -> tuple[int, str, str]:
        """(exit status, stdout, stderr); the dataset store's progress lines (``PROGRESS_PREFIXES``) are
        shown on stderr as they come. Raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds without
        a line on stderr."""
        stdout, stderr = self.process.stdout, self.process.stderr
        if stdout is None or stderr is None:  # not captured: nothing to read
            return self.process.wait(timeout=timeout), "", ""
        errors: list[str] = []
        output: list[str] = []
        readers = [
            threading.Thread(target=_relay_progress, args=(stderr, errors), daemon=True),
            threading.Thread(target=lambda: output.append(stdout.read()), daemon=True),
        ]
        for reader in readers:
            reader.start()
        heard = (0, time.monotonic())  # (lines so far, when the last one came)
        while self.process.poll() is None:  # the timeout counts silence: a long tokenization reports progress
            time.sleep(0.2)
            if len(errors) != heard[0]:
                heard = (len(errors), time.monotonic())
            elif timeout is not None and time.monotonic() - heard[1] > timeout:
                raise subprocess.TimeoutExpired(self.process.args, timeout)
        for reader in readers:
            reader.join()
        return self.process.returncode, "".join(output), "".join(errors)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.folder.cleanup()

    def __enter__(self) -> ConfigProcess:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


PROGRESS_PREFIXES = ("read ", "reading ", "tokenizing ", "tokenized ")  # stages.io.dataset_store's lines


def _relay_progress(stream: IO[str], lines: list[str]) -> None:
    """Keep every line of ``stream``; show the progress lines among them as they come."""
    for line in stream:
        lines.append(line)
        if line.startswith(PROGRESS_PREFIXES):
            print(line, end="", file=sys.stderr, flush=True)


def start_check(cfg: PipelineConfig, tokenize: bool = False) -> ConfigProcess:
    """Start the contract check (``stages.tools.contract_check``) on ``cfg`` in its own process; with
    ``tokenize``, it also tokenizes every dataset into the dataset store for the stages (a run's
    pre-flight; ``rlhf plan`` samples). ``budget_lines`` waits for it, ``close`` ends it."""
    return ConfigProcess("stages.tools.contract_check", cfg, "--json", *(["--tokenize"] if tokenize else []))


def budget_lines(check: ConfigProcess) -> list[dict[str, Any]]:
    """Wait for a started check: the budget counts (``BudgetCount`` fields, ``line``, ``mostly_cut``).
    Raises ``DataError`` with its one-line refusal, or after ``CHECK_TIMEOUT_S`` seconds."""
    try:
        status, out, err = check.wait(CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DataError(
            f"the tokenization check was silent for over {CHECK_TIMEOUT_S} s (a stalled tokenizer download?)"
        ) from None
    for line in err.splitlines():
        if line.startswith("note: "):
            print(line, file=sys.stderr, flush=True)
    if status != 0:
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        output = "".join(line for line in err.splitlines(keepends=True) if not line.startswith(PROGRESS_PREFIXES))
        raise DataError(lines[-1].removeprefix("error: ") if lines else f"the tokenization check failed:\n{output}")
    return json.loads(out.strip().splitlines()[-1])


def build_backbone(cfg: BackboneSection) -> None:
    """Build the built-in backbone ``cfg`` names if it is not built yet (first use: about two minutes on 2
    cores), in its own process, its progress shown. Raises ``BackboneError`` when the build fails."""
    if not unbuilt_builtin(cfg):
        return
    chat = ["--chat"] if is_builtin_chat(cfg) else []
    status = subprocess.run([sys.executable, "-m", "stages.model.builtin_backbone", *chat], stdout=subprocess.DEVNULL)
    if status.returncode != 0:
        raise BackboneError(
            f"backbone.name={cfg.name}: building the built-in backbone failed (exit status "
            f"{status.returncode}; its output is above)"
        )


def preflight(cfg: PipelineConfig, memory_stages: list[str] | None = None) -> None:
    """Refuse, in one line, what would fail inside the run: a device, launch, dataset, chat template, LoRA
    target or token budget the backbone and data cannot serve, and (for ``memory_stages``) a stage whose
    estimated peak memory exceeds what is available. Prints the budgets that cut or drop rows (loudly
    where most rows are cut). Raises ``ConfigError``, ``DataError`` or ``BackboneError``."""
    device_type(cfg.backbone)  # backbone.device: cuda where no GPU is visible fails here, not in a stage
    for stage in cfg.run.stages:
        check_launch(stage, cfg)  # an impossible launch (e.g. PPO under ZeRO-3) fails before anything starts
    build_backbone(cfg.backbone)  # an explicit step: nothing else builds it (a cache key never trains a model)
    check_datasets(cfg)  # bad data fails here, in one line, before any run folder or process exists
    with start_check(cfg, tokenize=True) as check:  # the template, LoRA targets, budgets, token ids: its own process
        if memory_stages:  # and a stage that would run out of memory is refused now, not minutes into the run
            check_memory(cfg, memory_stages)
        for count in budget_lines(check):
            if count["cut"] or count["dropped"]:
                print(count["line"], file=sys.stderr if count["mostly_cut"] else sys.stdout, flush=True)
