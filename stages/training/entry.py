"""The process a stage runs in, as the flow launches it (locally or under ``accelerate launch``):

    python -m stages.training.entry sft --out runs/<id>/sft [--config runs/<id>/config.yaml]
                                        [--set sft.max_steps=20] [--input reward=runs/<id>/reward]

A rank of ``accelerate launch`` dies with its launcher (``stages.io.lifetime``). It prepares the process
before any heavy library loads, which its recipe's imports would do: ranks other
than the main one keep their libraries' progress bars off (tqdm reads ``TQDM_DISABLE`` when it is
imported), and the library lines known to be harmless for this config are filtered (their loggers exist
before the libraries print). Then it imports the stage's recipe (``StageSpec.module``; its top imports
torch) and runs the recipe's ``train_<stage>(cfg, ctx)`` through ``stages.training.runner``. Torch-free
itself: only argparse, the config and the registry load before the setup.

Where ``$RLHF_STAGE_PEAKS`` names a file, the process appends its peak memory to it when the stage has
published (``record_peaks``): what ``bench/shape_chain.py`` reports per stage. Nothing in a run reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
from importlib import import_module
from pathlib import Path

from stages.io.config import ConfigError, load_config
from stages.io.lifetime import die_with_parent
from stages.io.noise import silence_known_noise
from stages.io.sections import needs_4bit
from stages.registry import spec

# A JSON-lines file each stage process appends its peak memory to (``record_peaks``); unset: nothing is written.
PEAKS_ENV = "RLHF_STAGE_PEAKS"


def main(argv: list[str] | None = None) -> None:
    """Run one stage in this process; a bad stage name, argument or config is one line and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "LOCAL_RANK" in os.environ:  # a rank of `accelerate launch`: its agent put it in a session of its own
        die_with_parent(signal.SIGKILL)
    quiet_other_ranks()
    try:
        stage = spec(argv[0] if argv else "").name
    except KeyError as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        sys.exit(2)
    args = parse_args(stage, argv[1:])
    try:
        cfg = load_config(args.config, args.overrides)
        inputs = dict(_parse_input(item) for item in args.inputs)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    silence_known_noise(needs_4bit(cfg.adapter.kind))
    recipe = import_module(spec(stage).module)
    from stages.training.runner import stage_main  # torch: after the setup above

    stage_main(stage, getattr(recipe, f"train_{stage}"), cfg, args.out, inputs)
    record_peaks(stage, os.environ.get(PEAKS_ENV))


def parse_args(stage: str, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.training.entry {stage}", description=f"Run the {stage} stage alone."
    )
    parser.add_argument("--config", type=Path, help="YAML config (default: the embedded default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--out", type=Path, required=True, help="artifact folder to publish, e.g. runs/<id>/sft")
    parser.add_argument(
        "--input",
        dest="inputs",
        action="append",
        default=[],
        metavar="STAGE=FOLDER",
        help="an upstream artifact, e.g. sft=runs/<id>/sft",
    )
    return parser.parse_args(argv)


def _parse_input(item: str) -> tuple[str, Path]:
    name, sep, folder = item.partition("=")
    if not sep:
        raise ConfigError(f"--input {item!r}: expected STAGE=FOLDER")
    return name, Path(folder)


def record_peaks(stage: str, path: str | None) -> None:
    """Append this process's peak memory, in MiB, to ``path`` as one JSON line (nothing when ``path`` is
    empty): its peak RSS and, where it computed on a GPU, torch's peak allocated and reserved GPU memory
    (``torch.cuda.max_memory_allocated``: the tensors' bytes; ``max_memory_reserved``: the caching allocator's,
    nearer what ``nvidia-smi`` shows). Reads torch only if the stage loaded it."""
    if not path:
        return
    row: dict[str, str | int | float] = {
        "stage": stage,
        "rank": int(os.environ.get("RANK", "0")),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
    }
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        row["peak_gpu_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        row["peak_gpu_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    with open(path, "a") as peaks:  # one short line per process: ranks of a launch append whole lines
        peaks.write(json.dumps(row) + "\n")


def quiet_other_ranks() -> None:
    """On ranks other than the main one of an ``accelerate launch``, libraries' own tqdm bars (datasets,
    weight loading) stay silent: one progress display per stage."""
    if os.environ.get("RANK", "0") != "0":
        os.environ.setdefault("TQDM_DISABLE", "1")


if __name__ == "__main__":
    main()
