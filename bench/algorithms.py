"""Head-to-head: PPO, GRPO, DPO and RRHF on the harder built-in task, from ONE SFT adapter, on one backbone.

    python bench/algorithms.py [--seeds 3] [--config bench/task-hard.yaml] [--only "GRPO + checker"]
                               [--set grpo.beta=0.2]   # a setting for every variant's stage

SFT and the reward model are trained once. Then each variant's stage runs as the flow launches it
(``python -m stages.<name> --input sft=... [--input reward=...]``), once per ``run.seed`` in
0..seeds-1, so only the RL stage changes between seeds. Variants: PPO, GRPO, DPO and RRHF with the
reward model (DPO reads the preference pairs instead), and PPO and GRPO with the task's checker.

Per variant: held-out ``task_score`` (mean and population std over the seeds), its gain over SFT (whose
own score is one evaluation: 64 prompts sampled at T=1, about +-0.06 of sampling noise), the stage's
wall seconds and peak RSS (the stage process, from ``wait4``), and the final KL to the reference
(``kl_to_reference``: nats per response on the evaluation samples). Measure on a quiet machine: the
stages use the cores no other process uses (``run.threads: auto``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS: list[tuple[str, str, list[str]]] = [
    ("PPO + reward model", "ppo", []),
    ("GRPO + reward model", "grpo", []),
    ("DPO (preference pairs)", "dpo", []),
    ("RRHF + reward model", "rrhf", []),
    ("PPO + checker", "ppo", ["ppo.reward=checker"]),
    ("GRPO + checker", "grpo", ["grpo.reward=checker"]),
]


def run_stage(
    stage: str, out: Path, config: Path, sets: list[str], inputs: dict[str, Path], env: dict[str, str]
) -> tuple[dict, float, float]:
    """One stage process: its metrics, wall seconds and peak RSS in MiB."""
    command = [
        sys.executable,
        "-m",
        "stages.training.entry",
        stage,
        "--config",
        str(config),
        "--out",
        str(out),
        *(f"--input={name}={path}" for name, path in inputs.items()),
        *(a for item in ["tracking.backend=none", *sets] for a in ("--set", item)),
    ]
    log = out.with_suffix(".log")  # a file, not a pipe: nobody reads a pipe until wait4 returns
    started = time.perf_counter()
    with log.open("w") as sink:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=sink)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{stage} {sets} failed:\n{log.read_text()[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics, seconds, usage.ru_maxrss / 1024  # ru_maxrss: KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--config", type=Path, default=REPO / "bench" / "task-hard.yaml")
    parser.add_argument("--only", action="append", help="run only these variants (by their label)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="a setting for every variant's stage (not SFT or the reward model)",
    )
    args = parser.parse_args()
    unknown = set(args.only or ()) - {label for label, _, _ in VARIANTS}
    if unknown:
        parser.error(f"--only {sorted(unknown)}: the variants are {[label for label, _, _ in VARIANTS]}")
    subprocess.run(
        [str(Path(sys.executable).parent / "rlhf"), "build-backbone"],
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "RLHF_HOME": str(REPO / ".rlhf")},
    )
    variants = [v for v in VARIANTS if not args.only or v[0] in args.only]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "home").mkdir()
        (root / "home" / "backbones").symlink_to(REPO / ".rlhf" / "backbones", target_is_directory=True)
        env = {**os.environ, "RLHF_HOME": str(root / "home")}
        sft, _, _ = run_stage("sft", root / "sft", args.config, [], {}, env)
        reward, _, _ = run_stage("reward", root / "reward", args.config, [], {}, env)
        print(
            f"SFT task_score {sft['task_score']:.3f} (base {sft['task_score_before']:.3f}); "
            f"reward model held-out pair_accuracy {reward['pair_accuracy']:.3f}",
            flush=True,
        )
        rows = []
        for label, stage, sets in variants:
            runs = []
            for seed in range(args.seeds):
                inputs = {"sft": root / "sft"}
                if stage != "dpo" and not any(s.endswith("reward=checker") for s in sets):
                    inputs["reward"] = root / "reward"
                out = root / f"{stage}-{len(rows)}-{seed}"
                runs.append(
                    run_stage(stage, out, args.config, [*sets, *args.overrides, f"run.seed={seed}"], inputs, env)
                )
                print(
                    f"  {label} seed {seed}: task_score {runs[-1][0]['task_score']:.3f} in {runs[-1][1]:.1f} s",
                    flush=True,
                )
            scores = [m["task_score"] for m, _, _ in runs]
            rows.append(
                (
                    label,
                    statistics.mean(scores),
                    statistics.pstdev(scores),
                    statistics.mean(scores) - sft["task_score"],
                    statistics.mean(s for _, s, _ in runs),
                    max(r for _, _, r in runs),
                    statistics.mean(m["kl_to_reference"] for m, _, _ in runs),
                )
            )
    print(
        f"\nharder task ({args.config.name}), {args.seeds} seeds; SFT task_score {sft['task_score']:.3f}"
        f"{'; with ' + ' '.join(args.overrides) if args.overrides else ''}\n"
    )
    print("| variant | task_score (mean ± population std) | gain over SFT | wall s | peak RSS MiB | KL to reference |")
    print("|---|---|---|---|---|---|")
    for label, mean, spread, gain, seconds, rss, kl in rows:
        print(f"| {label} | {mean:.3f} ± {spread:.3f} | {gain:+.3f} | {seconds:.1f} | {rss:.0f} | {kl:.2f} |")


if __name__ == "__main__":
    main()
