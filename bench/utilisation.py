"""Every stage's time against the machine's limit: matmul FLOPs per second of each stage, over the throughput
of a plain torch matmul of the same dtype measured in the same script (model-FLOPs utilisation).

    python bench/utilisation.py                      # CPU: a 106M random Llama, each stage a few steps, 1 thread
    python bench/utilisation.py --layers 2 --hidden 128 --intermediate 384 --heads 4   # a quick dry run
    python bench/utilisation.py --device cuda        # bf16 on a GPU

Each stage runs as the flow launches it (``python -m stages.training.entry <stage>``, local launcher) on the
same random-init Llama with the built-in tokenizer and data: SFT, then the reward model, then PPO, GRPO, DPO
and RRHF from them, a few steps each (``STAGE_SETTINGS``). A wrapper in the stage process counts, with one
global forward hook on every ``nn.Linear`` (frozen base layers, LoRA factors, the LM head, score heads):

- forward FLOPs: 2 x in x out x rows of every call;
- backward FLOPs, for a call made with gradients on: 2 x in x out x rows for the input's gradient where the
  input needs one, and as much again for the weight's where the weight is trained. A frozen backbone
  under LoRA computes activation gradients only, so a training token costs about 4 x parameters, not the
  6 x of full fine-tuning; counting 6 x would report a utilisation 1.5x too high on the backward.

Attention's score and value products (4 x T x hidden per token and layer: about 1% at these lengths) and
element-wise work are not counted; gradient checkpointing's recomputed forward is (it is work done). Time
is the wall clock from the stage's first counted matmul to its last (not imports, model loading or
saving), split into generation (inside transformers' ``generate``) and the rest (scoring, training,
evaluation forwards). Utilisation = FLOPs / time / peak, where peak is the best of a few (2048 x 2048) @
(2048 x 2048) matmuls of the stage's dtype on the stage's thread count. Decode's matmuls are far
smaller (rows = the sequences sampled at once) and read every weight from memory for those few rows, so
the script also measures a decode step's matmuls at 32 rows with the model's weight shapes streamed from
memory (``decode_limit``): the ceiling of generation at that batch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.grpo_vs_trl import Phases  # noqa: E402
from bench.random_backbone import parameter_count, random_llama  # noqa: E402

# A few steps of each stage; the eval section's 16 prompts make SFT's and the RL stages' task_score
# generations small next to training. Sample tables off (eval.samples=0): extra generations, not training.
COMMON = ["tracking.backend=none", "eval.num_prompts=16", "eval.samples=0"]
STAGE_SETTINGS: dict[str, list[str]] = {
    "sft": ["sft.max_steps=6", "sft.warmup_steps=0", "sft.logging_steps=3", "sft.checkpoint_every=999"],
    "reward": ["reward.max_steps=6", "reward.warmup_steps=0", "reward.logging_steps=3", "reward.checkpoint_every=999"],
    "ppo": ["ppo.updates=2", "ppo.checkpoint_every=1000"],
    "grpo": ["grpo.max_steps=2", "grpo.checkpoint_every=1000"],
    "dpo": ["dpo.max_steps=6", "dpo.warmup_steps=0", "dpo.logging_steps=3", "dpo.checkpoint_every=999"],
    "rrhf": ["rrhf.num_prompts=8", "rrhf.max_steps=2", "rrhf.warmup_steps=0", "rrhf.logging_steps=1"],
}
INPUTS = {
    "sft": [],
    "reward": [],
    "ppo": ["sft", "reward"],
    "grpo": ["sft", "reward"],
    "dpo": ["sft"],
    "rrhf": ["sft", "reward"],
}


class MatmulCounter:
    """FLOPs of every ``nn.Linear`` call in the process, and the wall-clock window they fall in, split into
    generation and the rest (module docstring). Every stage ends with an evaluation forward, so the window
    holds its last backward and optimizer step."""

    def __init__(self, device: str) -> None:
        self.phases = Phases(device)  # time inside ``generate``, as grpo_vs_trl measures it
        self.flops = {"generation": 0.0, "other": 0.0}
        self.first: float | None = None
        self.last = 0.0

    def install(self) -> None:
        import torch

        torch.nn.modules.module.register_module_forward_hook(self._count)
        self.phases.install()

    def _count(self, module: Any, inputs: tuple[Any, ...], output: Any) -> None:
        import torch

        if not isinstance(module, torch.nn.Linear) or not inputs or not isinstance(inputs[0], torch.Tensor):
            return
        x = inputs[0]
        forward = 2.0 * module.in_features * module.out_features * (x.numel() // module.in_features)
        flops = forward
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
            flops += forward * (int(x.requires_grad) + int(module.weight.requires_grad))
        self.flops["generation" if self.phases.generating else "other"] += flops
        now = time.perf_counter()
        self.first = now if self.first is None else self.first
        self.last = now

    def summary(self) -> dict[str, float]:
        self.phases.sync()
        return {
            "seconds": self.last - (self.first or self.last),
            "generation_s": self.phases.generation,
            "generation_flops": self.flops["generation"],
            "other_flops": self.flops["other"],
        }


def child(argv: list[str], report: Path, device: str) -> None:
    """One stage process: the stage entry, counted (``MatmulCounter``); the counts go to ``report``."""
    counter = MatmulCounter(device)
    counter.install()
    from stages.training.entry import main as stage_main

    stage_main(argv)
    report.write_text(json.dumps(counter.summary()))


def matmul_peak(device: str, threads: int, rows: int, inner: int, cols: int) -> float:
    """FLOP/s of the best of 5 timed ``(rows x inner) @ (inner x cols)`` products (after a warm-up), in the
    stages' dtype: float32 on the CPU, bfloat16 on a GPU."""
    import torch

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(rows, inner, device=device, dtype=dtype)
    b = torch.randn(inner, cols, device=device, dtype=dtype)
    repeats = max(1, int(2e9 // (2 * rows * inner * cols)))  # about 2 GFLOP a timing
    best = float("inf")
    for attempt in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if attempt:  # the first is a warm-up
            best = min(best, (time.perf_counter() - started) / repeats)
    return 2.0 * rows * inner * cols / best


def decode_limit(device: str, threads: int, rows: int, layers: int, hidden: int, intermediate: int) -> float:
    """FLOP/s of one decode step's matmuls: ``rows`` tokens through every projection of ``layers`` Llama layers
    (four hidden x hidden, three hidden x intermediate), each weight read once from memory as in a real
    step (the whole set is larger than any cache), best of 3 passes after a warm-up. At 32 rows a weight
    read from memory is used for 32 tokens only: this is the ceiling generation can reach at that batch."""
    import torch

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = [(hidden, hidden)] * 4 + [(hidden, intermediate)] * 2 + [(intermediate, hidden)]
    weights = [torch.randn(a, b, device=device, dtype=dtype) for _ in range(layers) for a, b in shapes]
    inputs = {a: torch.randn(rows, a, device=device, dtype=dtype) for a in (hidden, intermediate)}
    flops = sum(2.0 * rows * w.shape[0] * w.shape[1] for w in weights)
    best = float("inf")
    for attempt in range(4):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for w in weights:
            inputs[w.shape[0]] @ w
        if device == "cuda":
            torch.cuda.synchronize()
        if attempt:
            best = min(best, time.perf_counter() - started)
    return flops / best


def run_stage(stage: str, work: Path, backbone: Path, args: argparse.Namespace) -> dict[str, float]:
    out, report = work / stage, work / f"{stage}.counts.json"
    sets = [
        f"backbone.name={backbone}",
        f"backbone.device={args.device}",
        f"backbone.dtype={'bfloat16' if args.device == 'cuda' else 'float32'}",
        f"run.threads={args.threads}",
        *COMMON,
        *STAGE_SETTINGS[stage],
    ]
    argv = [stage, "--out", str(out), *(f"--input={name}={work / name}" for name in INPUTS[stage])]
    argv += [a for item in sets for a in ("--set", item)]
    command = [sys.executable, __file__, "--child", str(report), "--device", args.device, "--", *argv]
    started = time.perf_counter()
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    if result.returncode:
        raise SystemExit(f"{stage} failed:\n{result.stderr[-4000:]}")
    return {**json.loads(report.read_text()), "process_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="run.threads of every stage, and of the peak matmul")
    parser.add_argument("--layers", type=int, default=15)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument(
        "--stages", default=",".join(STAGE_SETTINGS), help="in order; a stage needs those it reads (INPUTS) before it"
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        child([a for a in rest if a != "--"], args.child, args.device)
        return
    from stages.model.builtin_backbone import ensure_builtin_backbone

    peak = matmul_peak(args.device, args.threads, 2048, 2048, 2048)
    with tempfile.TemporaryDirectory(prefix="utilisation-") as tmp:
        work = Path(tmp)
        backbone = random_llama(
            work / "backbone",
            ensure_builtin_backbone(),
            layers=args.layers,
            hidden=args.hidden,
            intermediate=args.intermediate,
            heads=args.heads,
        )
        params = parameter_count(backbone)
        decode = decode_limit(args.device, args.threads, 32, args.layers, args.hidden, args.intermediate)
        print(
            f"{args.device}, {args.threads} thread(s), random Llama of {params / 1e6:.1f}M parameters "
            f"({args.layers} x {args.hidden}, MLP {args.intermediate}); peak matmul {peak / 1e9:.1f} GFLOP/s "
            f"(2048^3); a decode step's matmuls at 32 rows, weights from memory: {decode / 1e9:.1f} GFLOP/s "
            f"({decode / peak:.0%} of peak, generation's ceiling)",
            flush=True,
        )
        print(
            f"{'stage':>7} {'s':>7} {'GFLOP':>8} {'GFLOP/s':>8} {'util':>6} {'gen s':>7} {'gen util':>8} "
            f"{'rest util':>9} {'process s':>9}",
            flush=True,
        )
        rows = {}
        for stage in args.stages.split(","):
            r = run_stage(stage, work, backbone, args)
            total = r["generation_flops"] + r["other_flops"]
            rest_s = max(r["seconds"] - r["generation_s"], 1e-9)
            rows[stage] = total / r["seconds"] / peak
            print(
                f"{stage:>7} {r['seconds']:>7.1f} {total / 1e9:>8.0f} {total / r['seconds'] / 1e9:>8.1f} "
                f"{rows[stage]:>6.0%} {r['generation_s']:>7.1f} "
                f"{r['generation_flops'] / max(r['generation_s'], 1e-9) / peak:>8.0%} "
                f"{r['other_flops'] / rest_s / peak:>9.0%} {r['process_s']:>9.1f}",
                flush=True,
            )
    lowest = min(rows, key=rows.get)
    print(f"lowest utilisation: {lowest} ({rows[lowest]:.0%} of the {peak / 1e9:.1f} GFLOP/s matmul peak)")


if __name__ == "__main__":
    main()
