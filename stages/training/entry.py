"""The process a stage runs in, as the flow launches it (locally or under ``accelerate launch``):

    python -m stages.training.entry sft --out runs/<id>/sft [--config runs/<id>/config.yaml]
                                        [--set sft.max_steps=20] [--input reward=runs/<id>/reward]

It prepares the process before any heavy library loads, which its recipe's imports would do: ranks other
than the main one keep their libraries' progress bars off (tqdm reads ``TQDM_DISABLE`` when it is
imported), and the library lines known to be harmless for this config are filtered (their loggers exist
before the libraries print). Then it imports the stage's recipe (``StageSpec.module``; its top imports
torch) and runs the recipe's ``train_<stage>(cfg, ctx)`` through ``stages.training.runner``. Torch-free
itself: only argparse, the config and the registry load before the setup.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib import import_module
from pathlib import Path

from stages.io.config import ConfigError, PipelineConfig, load_config
from stages.registry import spec

# Library log lines known to be harmless where they print: (logger, message start, when it is harmless).
_KNOWN_NOISE = (
    # bitsandbytes, imported by PEFT on every run, looks for an optional CPU kernel package on AVX512-BF16
    # hosts and falls back to its own 4-bit kernels; only a QLoRA run (4-bit weights) uses either.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward", lambda cfg: cfg.adapter.kind != "qlora"),
)


def main(argv: list[str] | None = None) -> None:
    """Run one stage in this process; a bad stage name, argument or config is one line and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
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
    silence_known_noise(cfg)
    recipe = import_module(spec(stage).module)
    from stages.training.runner import stage_main  # torch: after the setup above

    stage_main(stage, getattr(recipe, f"train_{stage}"), cfg, args.out, inputs)


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


def quiet_other_ranks() -> None:
    """On ranks other than the main one of an ``accelerate launch``, libraries' own tqdm bars (datasets,
    weight loading) stay silent: one progress display per stage."""
    if os.environ.get("RANK", "0") != "0":
        os.environ.setdefault("TQDM_DISABLE", "1")


def silence_known_noise(cfg: PipelineConfig) -> None:
    """Drop exactly the library log lines of ``_KNOWN_NOISE`` that are harmless for ``cfg``."""
    for name, start, harmless in _KNOWN_NOISE:
        logger = logging.getLogger(name)
        if harmless(cfg) and not any(getattr(f, "noise", None) == start for f in logger.filters):
            logger.addFilter(_NoiseFilter(start))


class _NoiseFilter(logging.Filter):
    """Drops the records whose message starts with ``noise``."""

    def __init__(self, noise: str) -> None:
        super().__init__()
        self.noise = noise

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.noise)


if __name__ == "__main__":
    main()
