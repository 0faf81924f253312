"""Library log lines known to be harmless where they print, dropped exactly there.

A filter on the library's logger, which exists before the library is imported, so it is in place when
the line prints: a stage process installs it first thing (``stages.training.entry``), the tools'
processes when their package loads (``stages.tools``).
"""

from __future__ import annotations

import logging

# (logger, message start, harmless unless 4-bit kernels compute). bitsandbytes, imported by PEFT on every
# run, looks for an optional CPU kernel package on AVX512-BF16 hosts and falls back to its own 4-bit
# kernels; only a QLoRA run (4-bit weights) uses either.
_KNOWN_NOISE = (("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward", True),)


def silence_known_noise(quantized: bool) -> None:
    """Drop the lines of ``_KNOWN_NOISE`` that are harmless for this process: all of them, or, where
    ``quantized`` (4-bit weights compute here), those that do not concern 4-bit kernels."""
    for name, start, about_4bit in _KNOWN_NOISE:
        logger = logging.getLogger(name)
        harmless = not (quantized and about_4bit)
        if harmless and not any(getattr(f, "noise", None) == start for f in logger.filters):
            logger.addFilter(_NoiseFilter(start))


class _NoiseFilter(logging.Filter):
    """Drops the records whose message starts with ``noise``."""

    def __init__(self, noise: str) -> None:
        super().__init__()
        self.noise = noise

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.noise)
