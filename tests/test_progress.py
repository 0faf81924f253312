"""Progress output: bars for a person, plain lines for a log file, nothing from the other ranks."""

import pytest

from stages.io import progress as progress_module
from stages.io.progress import progress


def test_a_log_gets_plain_lines_without_cursor_movements(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RLHF_PROGRESS", "lines")
    monkeypatch.setattr(progress_module, "LINE_EVERY_S", 0.0)  # a line at every step
    assert list(progress(range(3), desc="reward", unit="step", initial=2, total=5)) == [0, 1, 2]
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["reward: step 3/5", "reward: step 4/5", "reward: step 5/5"]
    monkeypatch.setattr(progress_module, "LINE_EVERY_S", 3600.0)
    assert list(progress(range(4), desc="rollout", unit="batch", leave=False)) == [0, 1, 2, 3]
    assert capsys.readouterr().err == ""  # a short inner loop leaves nothing behind
    assert "\x1b" not in "".join(lines) and "\r" not in "".join(lines)


def test_other_ranks_report_nothing_and_a_terminal_gets_a_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    items = range(3)
    assert progress(items, desc="ppo", unit="update") is items
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("RLHF_PROGRESS", "bars")
    from tqdm import tqdm

    assert isinstance(progress(items, desc="ppo", unit="update"), tqdm)


def test_known_library_noise_is_silenced_exactly_where_it_is_harmless() -> None:
    import logging

    from stages.io.noise import silence_known_noise

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    noise = logger.makeRecord(
        logger.name,
        logging.WARNING,
        __file__,
        1,
        "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'",
        (),
        None,
    )
    other = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "something else", (), None)
    logger.filters.clear()  # importing stages.tools (an earlier test) installs the tools' filter
    try:
        silence_known_noise(quantized=True)  # 4-bit kernels in use: the hint stays
        assert logger.filter(noise)
        silence_known_noise(quantized=False)
        assert not logger.filter(noise) and logger.filter(other)
    finally:
        logger.filters.clear()
