"""SFT wall time at about 50M parameters: one local process versus DeepSpeed ZeRO-2 on 2 processes.

    .venv/bin/python bench/deepspeed_sft.py            # about 10 minutes on 2 cores

Both runs train the same LoRA adapter on a 10 x 640 random-init Llama (about 50M parameters) for the
same number of steps on the same global batch: locally 1 process x 2 threads x batch 8; under ZeRO-2
2 processes x 1 thread x batch 4 (DeepSpeed's CPU accelerator, gloo). Both are the real stage
(``python -m stages.training.entry sft`` and the ``accelerate launch`` the flow runs); the figure is the Trainer's
own ``train_runtime``, so model loading, the JIT build and evaluation are excluded (and reported apart).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.random_backbone import parameter_count, random_llama  # noqa: E402

STEPS, GLOBAL_BATCH = 30, 8
SIZE = {"layers": 10, "hidden": 640, "intermediate": 1728, "heads": 10}


def run(label: str, sets: list[str], work: Path, env: dict[str, str]) -> dict[str, float]:
    from flows.launch import accelerate_command, launch_env
    from stages.io.config import load_config

    out = work / label / "sft"
    args = ["--out", str(out), *(a for s in sets for a in ("--set", s))]
    cfg = load_config(None, sets)
    if cfg.launcher("sft") == "accelerate":
        command, env = (
            accelerate_command("sft", cfg, args),
            {**launch_env(cfg, "sft"), **{k: env[k] for k in ("RLHF_HOME",)}},
        )
    else:
        command = [sys.executable, "-m", "stages.training.entry", "sft", *args]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"{label} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"train_s": manifest["metrics"]["train_seconds"], "wall_s": wall, "loss": manifest["metrics"]["final_loss"]}


def main() -> None:
    from stages.model.builtin_backbone import ensure_builtin_backbone

    builtin = ensure_builtin_backbone()
    with tempfile.TemporaryDirectory(prefix="ds-bench-") as tmp:
        work = Path(tmp)
        backbone = random_llama(work / "llama-50m", builtin, **SIZE)
        params = parameter_count(backbone)
        env = {**os.environ, "RLHF_HOME": os.environ.get("RLHF_HOME", str(REPO / ".rlhf"))}
        common = [
            f"backbone.name={backbone}",
            f"sft.max_steps={STEPS}",
            "sft.logging_steps=10",
            "sft.checkpoint_every=1000",
            "sft.warmup_steps=0",
            "eval.num_prompts=8",
            "tracking.backend=none",
        ]
        local = run("local", [*common, f"sft.batch_size={GLOBAL_BATCH}", "run.threads=2"], work, env)
        zero2 = run(
            "zero2",
            [
                *common,
                f"sft.batch_size={GLOBAL_BATCH // 2}",
                "sft.launcher=accelerate",
                "distributed.deepspeed=zero2",
                "distributed.num_processes=2",
            ],
            work,
            env,
        )
    print(f"SFT, {params / 1e6:.1f}M parameters, {STEPS} steps x global batch {GLOBAL_BATCH}, LoRA r=8 all-linear")
    print(f"{'launcher':<22} {'train s':>8} {'wall s':>8} {'final loss':>11}")
    for label, row in (("local (1 x 2 threads)", local), ("ZeRO-2 (2 x 1 thread)", zero2)):
        print(f"{label:<22} {row['train_s']:>8.1f} {row['wall_s']:>8.1f} {row['loss']:>11.4f}")
    print(f"train-time ratio ZeRO-2 / local: {zero2['train_s'] / local['train_s']:.2f}")


if __name__ == "__main__":
    main()
