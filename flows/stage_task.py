"""One stage of a run, as a Prefect task: reuse the cached artifact when the key matches, else launch the
stage module.

Stages run as ``python -m stages.training.entry <stage>`` in a child process (the same command a user can run by hand),
or as ``accelerate launch ... -m stages.training.entry <stage>`` for a stage with ``launcher: accelerate``, so the flow
process never imports torch and a crashed stage cannot corrupt the flow's state. The child's output is
streamed to the terminal and the Prefect log (progress bars included) and kept in ``<run>/logs/<stage>.log``.
"""

from __future__ import annotations

import codecs
import io
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed, State

from flows.cache import ArtifactCache
from flows.launch import STAGE_ENTRY, USER_ERRORS, StageFailed, accelerate_command, launch_env
from flows.run_dir import CONFIG, record_status
from stages.io import artifacts
from stages.io.config import PipelineConfig, load_config
from stages.io.lifetime import die_with_parent
from stages.io.progress import PROGRESS_ENV
from stages.io.provenance import stage_provenance

# The line that explains a failure: our own one-line errors, else the last exception of any rank.
_ERROR_LINE = re.compile(r"^(\[rank\d+\]: )?(error: |([\w.]+(Error|Exception|Interrupt)|NonFiniteLoss)(: |$))")


# Tag-based concurrency limit: `rlhf serve` sets it to 1, so two scheduled runs never train at once.
ACCELERATOR_TAG = "rlhf-accelerator"


@task(cache_policy=NO_CACHE, task_run_name="{stage}", tags=[ACCELERATOR_TAG])
def stage_task(stage: str, run_dir: str, inputs: dict[str, str], force: bool = False) -> dict[str, Any] | State:
    try:
        result = run_or_reuse(stage, Path(run_dir), {k: Path(v) for k, v in inputs.items()}, force=force)
    except (StageFailed, *USER_ERRORS) as err:
        # An expected failure with its own clear message: fail the task without a Prefect traceback.
        return Failed(message=str(err))
    publish_stage_artifacts(stage, Path(run_dir), result)
    return result


def publish_stage_artifacts(stage: str, run_dir: Path, result: dict[str, Any]) -> None:
    """A table of the stage's metrics and a note linking its folder and the run report, in Prefect's UI."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    rows = [{"metric": name, "value": value} for name, value in result["metrics"].items()]
    create_table_artifact(key=f"{stage}-metrics", table=rows, description=f"{stage}: {result['status']}")
    create_markdown_artifact(
        key=f"{stage}-artifact",
        markdown=(
            f"**{stage}** {result['status']} in {result['seconds']:.1f}s\n\n"
            f"- artifact: `{result['artifact']}`\n- report: `{run_dir / 'report.html'}`\n"
        ),
        description=f"where the {stage} adapter is",
    )


def run_or_reuse(stage: str, run_dir: Path, inputs: dict[str, Path], force: bool = False) -> dict[str, Any]:
    """Skip the stage on a cache hit, else run it; record and return status, seconds, metrics, artifact."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / CONFIG)
    out = run_dir / stage
    started = time.time()
    record_status(run_dir, stage, status="running")
    try:
        key = stage_provenance(stage, cfg, inputs)["cache_key"]
        cache = ArtifactCache()
        if not force and _holds_intact(out, key):
            status = "cached"  # this run already holds the finished artifact (a resumed or repeated run)
        elif not force and cache.lookup(key) is not None:
            cache.restore(key, out)
            status = "cached"
        else:
            launch_stage(stage, run_dir, inputs, cfg)
            cache.store(key, out)
            status = "completed"
    except BaseException as err:  # a kill (KeyboardInterrupt) is recorded too, then re-raised
        record_status(run_dir, stage, status="failed", seconds=round(time.time() - started, 2), error=str(err))
        raise
    seconds = round(time.time() - started, 2)
    record_status(run_dir, stage, status=status, seconds=seconds)
    manifest = artifacts.read_manifest(out)
    return {"status": status, "seconds": seconds, "metrics": manifest["metrics"], "artifact": str(out)}


def _holds_intact(out: Path, key: str) -> bool:
    """The run's own artifact is finished, of this key, and byte for byte what was published."""
    if not artifacts.is_finished(out) or artifacts.read_manifest(out).get("cache_key") != key:
        return False
    try:
        artifacts.verify(out)
    except artifacts.ArtifactError as err:
        print(f"warning: {err}; running the stage again", flush=True)
        return False
    return True


def stage_command(stage: str, run_dir: Path, inputs: dict[str, Path], cfg: PipelineConfig) -> list[str]:
    """The command that runs one stage of this run: ``python -m`` or ``accelerate launch -m``."""
    args = [
        "--config",
        str(run_dir / CONFIG),
        "--out",
        str(run_dir / stage),
        *(f"--input={name}={path}" for name, path in inputs.items()),
    ]
    if cfg.launcher(stage) == "accelerate":
        return accelerate_command(stage, cfg, args)
    return [sys.executable, "-m", STAGE_ENTRY, stage, *args]


def launch_stage(stage: str, run_dir: Path, inputs: dict[str, Path], cfg: PipelineConfig) -> None:
    """Run the stage's command, streaming its output to the terminal (and Prefect's log) and to its log file."""
    command = stage_command(stage, run_dir, inputs, cfg)
    env = launch_env(cfg, stage)
    # The child writes into a pipe: tell it whether a person watches (bars) or a file reads (plain lines).
    env.setdefault(PROGRESS_ENV, "bars" if sys.stdout.isatty() else "lines")
    log_path = run_dir / "logs" / f"{stage}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    to_prefect = PrefectLines()
    with log_path.open("wb") as log:
        log.write(f"$ {shlex.join(command)}\n".encode())  # how to rerun (or join, on another machine) by hand
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent
        )
        try:
            stdout = process.stdout
            assert isinstance(stdout, io.BufferedReader)  # stdout=PIPE, unbuffered text off
            # read1 returns whatever is available, so "\r" progress-bar updates show as they happen.
            for chunk in iter(lambda: stdout.read1(65536), b""):
                log.write(chunk)
                text = decoder.decode(chunk)
                sys.stdout.write(text)
                sys.stdout.flush()
                to_prefect.feed(text)
            code = process.wait()
            to_prefect.close()
        except BaseException:
            _stop(process)  # never leave an orphaned trainer (or its ranks) behind
            raise
    if code != 0:
        raise StageFailed(f"stage {stage} failed (exit status {code}): {failure_line(log_path)} [log: {log_path}]")


class PrefectLines:
    """Forwards the stage's finished output lines to the Prefect run log (the UI's task log), and only
    there: the terminal already shows them. A progress bar's redraws collapse to its last state."""

    def __init__(self) -> None:
        import logging

        from prefect.context import TaskRunContext

        self.pending = ""
        self.logger: logging.Logger | None = None
        if TaskRunContext.get() is not None:  # not when a stage is launched outside a flow
            from prefect.logging.handlers import APILogHandler

            self.logger = logging.getLogger("rlhf.stage_output")
            if not self.logger.handlers:
                self.logger.addHandler(APILogHandler())
                self.logger.propagate = False
                self.logger.setLevel(logging.INFO)

    def close(self) -> None:
        """Send the last line and wait until every line reached the server (5 s at most)."""
        self.feed("\n")
        for handler in self.logger.handlers if self.logger else ():
            handler.flush()

    def feed(self, text: str) -> None:
        if self.logger is None:
            return
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            redraws = [part.strip() for part in line.split("\r") if part.strip()]
            if redraws:
                self.logger.info(redraws[-1])


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM (``accelerate launch`` forwards it to every rank), then SIGKILL if it lingers."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def failure_line(log_path: Path) -> str:
    """The most telling line of a failed stage's log: its error, else its last line."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").replace("\r", "\n").splitlines()]
    lines = [line for line in lines if line]
    errors = [line for line in lines if _ERROR_LINE.match(line) and "ChildFailedError" not in line]
    return errors[-1] if errors else (lines[-1] if lines else "no output")
