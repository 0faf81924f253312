"""Cost of the data path as datasets grow: `rlhf plan` and a 5-step `[sft, reward]` run on generated files of
2k, 20k and 200k rows (plus a 1M-row SFT file), as ratios against the 2k run in the same script (issue 31).

    python bench/data_scale.py                          # all sizes
    python bench/data_scale.py --sizes 2000,20000       # a subset; --run-limit-s caps each run

The files are the built-in task's shape: prompt-completion demonstrations (30% ramble on with 1-12 more
equations) and explicit-prompt preference pairs (the exact answer against a rambling one), 10k distinct
prompts. Each size gets a fresh `RLHF_HOME` (sharing only the backbone build), so every figure includes
reading, validating and tokenizing its data once. Reported per size:

- `plan s`, `plan MiB`: wall time and peak RSS of `rlhf plan` (the CLI and the contract check's process);
- `run s`, `run MiB`: wall time of `rlhf run` (pre-flight, which tokenizes each dataset once into the
  store, Prefect, both stages) and the peak RSS of its largest process; `sft s` / `reward s` each stage's
  own seconds (its manifest); `quiet s` the longest time the run's output stayed silent (every stage's
  progress lines stream through it; the target is under 30 s); `tokenized` the token tables written over
  that run and a second one that retrains the last stage (a dataset tokenized twice would count twice:
  one per dataset, sft + eval + preferences, is the target).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RLHF = Path(sys.executable).parent / "rlhf"
STEPS = ["--set", "sft.max_steps=5", "--set", "reward.max_steps=5", "--set", "tracking.backend=none"]


def write_files(rows: int, folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """(SFT file, preference file) of ``rows`` rows each."""
    rng = random.Random(seed)

    def equation() -> tuple[str, str]:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"{a}+{b}=", str(a + b)

    sft, pairs = folder / f"sft_{rows}.jsonl", folder / f"preferences_{rows}.jsonl"
    with sft.open("w") as demos, pairs.open("w") as prefs:
        for _ in range(rows):
            prompt, answer = equation()
            ramble = "".join(";" + "".join(equation()) for _ in range(rng.randint(0, 12)))
            completion = answer + (ramble if rng.random() < 0.3 else "")
            demos.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
            rejected = answer + ";" + "".join(equation()) + ramble
            prefs.write(json.dumps({"prompt": prompt, "chosen": answer, "rejected": rejected}) + "\n")
    return sft, pairs


def fresh_home(root: Path) -> dict[str, str]:
    home = Path(tempfile.mkdtemp(dir=root))
    (home / "backbones").symlink_to(REPO / ".rlhf" / "backbones", target_is_directory=True)
    return {**os.environ, "RLHF_HOME": str(home), "PREFECT_HOME": str(home / "prefect"), "WANDB_MODE": "offline"}


def timed(command: list[str], cwd: Path, env: dict[str, str], limit: float) -> tuple[float, float, float, bool]:
    """(wall s, peak RSS MiB of the process and the children it waited for, longest silence s, succeeded)."""
    started = last = time.monotonic()
    quiet = 0.0
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    os.set_blocking(process.stdout.fileno(), False)
    while True:
        if process.stdout.read():
            quiet, last = max(quiet, time.monotonic() - last), time.monotonic()
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() - started > limit:
            process.kill()
            _, status, usage = os.wait4(process.pid, 0)
            break
        time.sleep(0.2)
    wall = time.monotonic() - started
    return wall, usage.ru_maxrss / 1024, max(quiet, time.monotonic() - last), os.waitstatus_to_exitcode(status) == 0


def measure(name: str, config: dict, root: Path, limit: float) -> dict[str, object]:
    folder = Path(tempfile.mkdtemp(dir=root))
    (folder / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    cfg = str(folder / "config.yaml")
    env = fresh_home(root)
    plan_wall, plan_rss, _, planned = timed([str(RLHF), "plan", "--config", cfg], folder, env, limit)
    run = [str(RLHF), "run", "--config", cfg, "--run-id", "bench", *STEPS]
    run_wall, run_rss, quiet, finished = timed(run, folder, env, limit)
    stages = {}
    tokenized = None
    if finished:
        report = subprocess.run([str(RLHF), "report", "bench", "--json"], cwd=folder, env=env, capture_output=True)
        stages = {s: v.get("seconds") for s, v in json.loads(report.stdout)["stages"].items()}
        # A second run that retrains the last stage: the tables it finds are the first run's, never rewritten.
        written = _token_tables(Path(env["RLHF_HOME"]))
        last = config["run"]["stages"][-1]
        again = [str(RLHF), "run", "--config", cfg, "--run-id", "again", *STEPS, "--set", f"{last}.max_steps=6"]
        timed(again, folder, env, limit)
        written |= _token_tables(Path(env["RLHF_HOME"]))
        tokenized = len(written)
    return {
        "name": name,
        "plan_s": plan_wall if planned else None,
        "plan_mib": plan_rss,
        "run_s": run_wall if finished else None,
        "run_mib": run_rss,
        "quiet_s": quiet,
        **{f"{s}_s": seconds for s, seconds in stages.items()},
        "tokenized": tokenized,
    }


def _token_tables(home: Path) -> set[tuple[str, int, int]]:
    """Each token table the dataset store holds, as (path, inode, modification time): a table written again
    would count twice."""
    return {(str(p), p.stat().st_ino, p.stat().st_mtime_ns) for p in home.glob("datasets/*/tokens-*")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2000,20000,200000")
    parser.add_argument("--sft-only", default="1000000", help="rows of the SFT-only file ('' to skip)")
    parser.add_argument("--run-limit-s", type=float, default=900)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        results = []
        for rows in [int(n) for n in args.sizes.split(",") if n]:
            sft, pairs = write_files(rows, root)
            config = {"data": {"sft": str(sft), "preferences": str(pairs)}, "run": {"stages": ["sft", "reward"]}}
            results.append(measure(f"{rows // 1000}k pairs + demos", config, root, args.run_limit_s))
            print(json.dumps(results[-1]), flush=True)
        if args.sft_only:
            rows = int(args.sft_only)
            sft, _ = write_files(rows, root, seed=1)
            config = {"data": {"sft": str(sft)}, "run": {"stages": ["sft"]}}
            results.append(measure(f"{rows // 1000}k demos (SFT only)", config, root, args.run_limit_s))
            print(json.dumps(results[-1]), flush=True)
    print_table(results)


def print_table(results: list[dict[str, object]]) -> None:
    base = results[0]

    def cell(row: dict[str, object], key: str) -> str:
        value = row.get(key)
        if value is None:
            return "killed" if key in ("run_s", "plan_s") else "-"
        if key in ("quiet_s", "tokenized"):
            return f"{value:.1f}" if key == "quiet_s" else str(value)
        ratio = f" ({value / base[key]:.1f}x)" if isinstance(base.get(key), float) and base[key] else ""  # type: ignore[operator]
        return f"{value:.1f}{ratio}"  # type: ignore[str-format]

    keys = ("plan_s", "plan_mib", "run_s", "run_mib", "sft_s", "reward_s", "quiet_s", "tokenized")
    print("\n| rows | " + " | ".join(k.replace("_", " ") for k in keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for row in results:
        print(f"| {row['name']} | " + " | ".join(cell(row, k) for k in keys) + " |")


if __name__ == "__main__":
    main()
