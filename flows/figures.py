"""What the HTML pages share (a run's ``report.html``, a sweep's): the curves the registry declares, a
matplotlib figure as an inline base64 PNG, and the atomic write of a page."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stages.registry import STAGES

# (stage, history key, title): the curves each stage declares in the registry, in pipeline order
CURVES = [(stage.name, curve.key, curve.title) for stage in STAGES for curve in stage.curves]
X_KEYS = tuple(dict.fromkeys(stage.step_key for stage in STAGES))  # a curve's x axis: the first of these in its rows


def to_png(fig: Any) -> str:
    """A matplotlib figure as base64 PNG text; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def figures_html(figures: Sequence[tuple[str, str | None]]) -> str:
    """(title, base64 PNG or None) pairs as inline figures; a figure without data is left out."""
    return "".join(
        f'<figure><img src="data:image/png;base64,{png}" alt="{html.escape(title)}">'
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
        for title, png in figures
        if png
    )


def write_page(out: Path, page: str) -> Path:
    """Write an HTML page atomically (a reader never sees half of it), also when several processes of one
    sweep write its report at once (each through a temporary file of its own)."""
    import uuid

    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(page)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
