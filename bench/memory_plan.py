"""The memory plan's estimate vs the measured peak RSS of each stage, run as the flow runs it.

    .venv/bin/python bench/memory_plan.py                    # both backbones, about 4 minutes on 2 cores
    .venv/bin/python bench/memory_plan.py --backbones builtin

Backbones: the built-in one (4 x 128), and a random-init Llama of 8 layers x 512 hidden (2048
intermediate, 33.7M parameters) saved with the built-in tokenizer and used as ``backbone.name: <folder>``.
Stages: the default chain (sft, reward, ppo) on both, RRHF on the built-in one, and on the larger Llama
the settings that move the estimate most (``CASES``); each with the default config's batch sizes,
lengths and evaluation settings unless the case says otherwise, but a few steps (the peak comes with
the first steps and the final evaluation). Each stage is ``python -m stages.<name> --config CFG --out DIR``
in a child process; its peak is the child's ``ru_maxrss`` from ``os.wait4``. The estimate is
``rlhf plan``'s, for the same config.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.random_backbone import random_llama  # noqa: E402

INPUTS = {"sft": (), "reward": (), "ppo": ("sft", "reward"), "rrhf": ("sft", "reward")}
# Few steps, everything that sizes memory left at the default.
FEW_STEPS = [
    "sft.max_steps=3",
    "reward.max_steps=3",
    "ppo.updates=1",
    "rrhf.max_steps=3",
    "tracking.backend=none",
    "run.stages=[sft,reward,rrhf,ppo]",
    "run.threads=1",
]
# (backbone, stage, overrides): the default chain on both backbones, RRHF on the built-in one, then the
# larger Llama with the settings that move the estimate most: 4x batches, bf16, QLoRA, P-tuning v2.
# RRHF trains on its candidates' sampled ids, and a random-init model samples max_new_tokens of byte soup
# that never stops, so its lengths say nothing about a trained model's: RRHF is benched on the built-in
# (trained) backbone only.
CASES: list[tuple[str, str, tuple[str, ...]]] = [
    *(("builtin", stage, ()) for stage in ("sft", "reward", "ppo", "rrhf")),
    *(("llama-34m", stage, ()) for stage in ("sft", "reward", "ppo")),
    ("llama-34m", "sft", ("sft.batch_size=64",)),
    ("llama-34m", "reward", ("reward.batch_size=64",)),
    ("llama-34m", "ppo", ("ppo.rollout_prompts=64", "ppo.minibatch_size=32")),
    ("llama-34m", "reward", ("backbone.dtype=bfloat16",)),
    ("llama-34m", "reward", ("adapter.kind=qlora",)),
    ("llama-34m", "reward", ("adapter.kind=ptuning_v2",)),
]
LLAMA = {"layers": 8, "hidden": 512, "intermediate": 2048, "heads": 8}  # about 34M parameters
MiB = 1 << 20
TARGET = 0.30


def run_stage(stage: str, config: Path, out: Path, inputs: Path, env: dict[str, str]) -> tuple[int, float]:
    """Run one stage as a child process (upstream artifacts from ``inputs``); (its peak RSS, seconds)."""
    args = [sys.executable, "-m", "stages.training.entry", stage, "--config", str(config), "--out", str(out)]
    for name in INPUTS[stage]:
        args += ["--input", f"{name}={inputs / name}"]
    started = time.perf_counter()
    log = out.with_suffix(".log")
    with open(log, "w") as handle:
        child = subprocess.Popen(args, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"{stage} failed; the end of {log}:\n{log.read_text()[-2000:]}")
    return usage.ru_maxrss * 1024, time.perf_counter() - started


def bench_case(
    number: int, label: str, backbone: str, stage: str, overrides: tuple[str, ...], work: Path, env: dict[str, str]
) -> float:
    """Plan and run one stage; print its row and return estimate / measured."""
    from flows.memory_check import plan_memory
    from stages.io.config import load_config

    cfg = load_config(None, [*FEW_STEPS, f"backbone.name={backbone}", *overrides])
    config = work / f"case-{number}.yaml"
    config.write_text(cfg.to_yaml())
    est = plan_memory(cfg, [stage]).estimates[0]
    base = work / label  # the default-config artifacts of this backbone: later stages read them
    base.mkdir(exist_ok=True)
    out = base / stage if not overrides else work / f"case-{number}"
    measured, seconds = run_stage(stage, config, out, base, env)
    ratio = est.total / measured
    print(
        f"{label:<10} {stage:<7} {' '.join(overrides) or 'default':<42} {est.peak_phase:<20} "
        f"{est.total / MiB:>8.0f} {measured / MiB:>8.0f} {ratio:>6.2f} {seconds:>5.0f}",
        flush=True,
    )
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="builtin,llama-34m")
    args = parser.parse_args()
    chosen = args.backbones.split(",")
    with tempfile.TemporaryDirectory(prefix="memory-plan-") as tmp:
        work = Path(tmp)
        os.environ["RLHF_HOME"] = str(work / "home")  # the plan resolves the built-in backbone here too
        (work / "home").mkdir()
        (REPO / ".rlhf" / "backbones").mkdir(parents=True, exist_ok=True)
        (work / "home" / "backbones").symlink_to(REPO / ".rlhf" / "backbones", target_is_directory=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        from stages.model.builtin_backbone import ensure_builtin_backbone

        builtin = ensure_builtin_backbone()
        backbones = {"builtin": "builtin:tiny"}
        if "llama-34m" in chosen:
            backbones["llama-34m"] = str(random_llama(work / "llama-34m-backbone", builtin, **LLAMA))
        print(
            f"{'backbone':<10} {'stage':<7} {'settings':<42} {'peak phase (plan)':<20} {'plan MiB':>8} "
            f"{'RSS MiB':>8} {'ratio':>6} {'s':>5}",
            flush=True,
        )
        ratios = [
            bench_case(n, label, backbones[label], stage, overrides, work, env)
            for n, (label, stage, overrides) in enumerate(CASES)
            if label in chosen
        ]
    worst = max(abs(ratio - 1) for ratio in ratios)
    verdict = "met" if worst <= TARGET else "NOT met"
    print(f"worst |plan / measured - 1| = {worst:.2f} (target <= {TARGET:.2f}): {verdict}")


if __name__ == "__main__":
    main()
