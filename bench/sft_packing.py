"""SFT tokens per second with and without packing (``sft.packing``), the same demonstrations and steps.

    python bench/sft_packing.py [--rows 20000] [--steps 60] [--set sft.batch_size=16]

Runs the SFT stage process twice on a generated file of prompt-completion demonstrations (the built-in
task's shape: 30% ramble on with 1-12 more equations), once unpacked (rows padded to the batch's longest)
and once packed (TRL's best-fit decreasing, padding-free). Reported per run: the demonstrations' tokens
trained on (TRL's ``num_tokens``: padding not counted), training seconds (TRL's ``train_runtime``),
tokens per second and the final loss, and the packed/unpacked ratio of tokens per second.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_scale import fresh_home, write_files  # noqa: E402


def sft_run(packing: bool, sft: Path, root: Path, steps: int, sets: list[str]) -> dict[str, float]:
    out = root / f"sft-{'packed' if packing else 'unpacked'}"
    config = root / "config.yaml"
    config.write_text(json.dumps({"data": {"sft": str(sft)}, "tracking": {"backend": "none"}}))
    overrides = [f"sft.max_steps={steps}", f"sft.packing={str(packing).lower()}", "sft.checkpoint_every=100000", *sets]
    command = [sys.executable, "-m", "stages.training.entry", "sft", "--out", str(out), "--config", str(config)]
    for item in overrides:
        command += ["--set", item]
    subprocess.run(command, check=True, env=fresh_home(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    history = json.loads((out / "history.json").read_text())
    tokens = history[-1]["num_tokens"]
    return {"tokens": tokens, "seconds": metrics["train_seconds"], "loss": metrics["train_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args()
    os.chdir(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        sft, _ = write_files(args.rows, root)
        runs = {packing: sft_run(packing, sft, root, args.steps, args.sets) for packing in (False, True)}
    print("| sft.packing | tokens trained | train s | tokens/s | train loss |")
    print("|---|---|---|---|---|")
    for packing, run in runs.items():
        rate = run["tokens"] / run["seconds"]
        print(f"| {packing} | {run['tokens']:.0f} | {run['seconds']:.2f} | {rate:.0f} | {run['loss']:.4f} |")
    ratio = (runs[True]["tokens"] / runs[True]["seconds"]) / (runs[False]["tokens"] / runs[False]["seconds"])
    print(f"\npacked / unpacked tokens per second: {ratio:.2f}")


if __name__ == "__main__":
    main()
