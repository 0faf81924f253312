"""The whole chain at a real model's shape on one device: seconds and peak memory per stage, generation tokens/s.

    python bench/shape_chain.py --device cuda                  # Qwen2.5-0.5B's shape, bf16 (bench/gpu_check.sh step 5)
    python bench/shape_chain.py --shape tiny --device cpu      # the CPU dry run (DRY_RUN=1 bench/gpu_check.sh)

The backbone is ``bench/qwen_shape.py``'s folder (random weights, the real Qwen2.5 tokenizer and chat template),
the data ``configs/chat.yaml``'s conversational files, the stages ``[sft, reward, rrhf, ppo, dpo, grpo]`` with
few steps (``SETTINGS``). The chain runs through the real CLI (``python -m flows.cli run``) where Prefect is
importable, else as the stage processes the flow launches (``python -m stages.training.entry <stage>``, with
the flow's inputs and environment), in the flow's order, in a fresh ``RLHF_HOME`` (no cache hit).

Per stage: ``process s`` is the stage process's wall time (start, imports, loading included: the run's
``status.json``, or timed here), ``stage s`` the manifest's ``seconds`` (the recipe: load, train, evaluate),
the peaks what the stage process recorded (``stages.training.entry.record_peaks``). The stages do not time
their sampling, so tokens/s is measured apart, in a process of its own, after the chain: the SFT adapter
on the same backbone, ``stages.model.generation.generate`` at each generating stage's sampling batch
(rows at once) and response length, one warm-up call first; the random model seldom samples an end token,
so nearly every response is full length.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.qwen_shape import SHAPES, build  # noqa: E402
from stages.training.entry import PEAKS_ENV  # noqa: E402  (torch-free)

CHAT = REPO / "configs" / "chat.yaml"
STAGES = "[sft,reward,rrhf,ppo,dpo,grpo]"
COMMON = [f"run.stages={STAGES}", "tracking.backend=none", "sft.max_length=96"]
# Few steps, the stages' own batch sizes where they are cheap. 0.5b: the chain in about 3.5 minutes on an H100
# (an estimate: most of it the six stage processes' start and load); tiny: the dry run's, as tests/conftest.py's
# TINY (the chain in about 2 minutes on 2 CPU cores).
SETTINGS = {
    "0.5b": [
        *("sft.max_steps=20", "sft.logging_steps=10", "sft.checkpoint_every=20"),
        *("reward.max_steps=20", "reward.logging_steps=10", "reward.checkpoint_every=20"),
        *("rrhf.num_prompts=32", "rrhf.max_steps=8", "rrhf.logging_steps=4", "rrhf.checkpoint_every=8"),
        *("ppo.updates=4", "ppo.checkpoint_every=4"),
        *("dpo.max_steps=20", "dpo.logging_steps=10", "dpo.checkpoint_every=20"),
        *("grpo.max_steps=4", "grpo.checkpoint_every=4"),
    ],
    "tiny": [
        *("sft.max_steps=3", "sft.batch_size=4", "sft.logging_steps=1", "sft.checkpoint_every=3"),
        *("reward.max_steps=3", "reward.batch_size=4", "reward.logging_steps=1", "reward.checkpoint_every=3"),
        *("rrhf.num_prompts=6", "rrhf.num_candidates=3", "rrhf.batch_size=3", "rrhf.max_steps=2"),
        *("rrhf.logging_steps=1", "rrhf.checkpoint_every=2"),
        *("ppo.updates=2", "ppo.rollout_prompts=4", "ppo.minibatch_size=2", "ppo.ppo_epochs=1", "ppo.max_new_tokens=8"),
        *("dpo.max_steps=2", "dpo.batch_size=4", "dpo.logging_steps=1", "dpo.checkpoint_every=2"),
        *("grpo.max_steps=2", "grpo.prompts_per_step=3", "grpo.num_generations=3", "grpo.minibatch_size=4"),
        "grpo.max_new_tokens=8",
        *("eval.num_prompts=8", "eval.max_new_tokens=8"),
    ],
}
DTYPE = {"cuda": "bfloat16", "cpu": "float32"}


def overrides(shape: str, device: str, backbone: Path | str) -> list[str]:
    """The chain's ``--set`` items at ``shape`` on ``device`` with the backbone folder ``backbone``."""
    device_sets = [f"backbone.name={backbone}", f"backbone.device={device}", f"backbone.dtype={DTYPE[device]}"]
    return [*device_sets, *COMMON, *SETTINGS[shape]]


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def work_env(work: Path) -> dict[str, str]:
    """What every process of the chain adds to its environment: a fresh ``RLHF_HOME``, the peaks file, no hub."""
    return {
        "RLHF_HOME": str(work / "home"),
        PEAKS_ENV: str(work / "peaks.jsonl"),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    }


def run_chain(items: list[str], work: Path, launcher: str) -> dict[str, float]:
    """Run the chain into ``work/runs/shape``; return each stage process's wall seconds, in the chain's order."""
    from flows.launch import launch_env  # torch-free, Prefect-free: the flow's environment for a stage
    from stages.io.config import load_config
    from stages.io.progress import PROGRESS_ENV
    from stages.io.provenance import stage_inputs

    cfg = load_config(CHAT, items)
    runs = work / "runs"
    if launcher == "cli":
        command = [sys.executable, "-m", "flows.cli", "run", "--config", str(CHAT), *sets(items)]
        env = {**os.environ, **work_env(work)}
        subprocess.run([*command, "--run-id", "shape", "--runs-dir", str(runs)], env=env, check=True)
        status = json.loads((runs / "shape" / "status.json").read_text())
        return {stage: status[stage]["seconds"] for stage in cfg.run.stages}
    seconds = {}
    for stage in cfg.run.stages:
        out = runs / "shape" / stage
        inputs = [f"--input={name}={out.parent / name}" for name in stage_inputs(stage, cfg)]
        command = [sys.executable, "-m", "stages.training.entry", stage, "--config", str(CHAT), *sets(items)]
        started = time.perf_counter()
        stage_env = {**launch_env(cfg, stage), **work_env(work), PROGRESS_ENV: "lines"}
        subprocess.run([*command, "--out", str(out), *inputs], env=stage_env, check=True)
        seconds[stage] = round(time.perf_counter() - started, 2)
    return seconds


def generation_workloads(cfg: Any) -> list[tuple[str, int, int, int]]:
    """(label, rows, rows per ``generate`` batch, new tokens) of each sampling the configured stages do."""
    from stages.grpo.spec import GENERATION_BATCH as GRPO_BATCH
    from stages.ppo.spec import GENERATION_BATCH as PPO_BATCH
    from stages.rrhf.spec import GENERATION_BATCH as RRHF_BATCH

    ev, ppo, grpo, rrhf = cfg.eval, cfg.ppo, cfg.grpo, cfg.rrhf
    found = [("evaluation (every stage)", ev.num_prompts, ev.batch_size, ev.max_new_tokens)]
    if "ppo" in cfg.run.stages:
        found.append(("ppo rollout", ppo.rollout_prompts, PPO_BATCH, ppo.max_new_tokens))
    if "grpo" in cfg.run.stages:
        found.append(("grpo groups", grpo.prompts_per_step * grpo.num_generations, GRPO_BATCH, grpo.max_new_tokens))
    if "rrhf" in cfg.run.stages:
        found.append(("rrhf candidates", rrhf.num_prompts * rrhf.num_candidates, RRHF_BATCH, rrhf.max_new_tokens))
    return [(label, rows, min(batch, rows), tokens) for label, rows, batch, tokens in found]


def time_generation(items: list[str], sft: Path) -> list[dict[str, Any]]:
    """Tokens/s of ``generate`` with the SFT adapter active, per workload (in this process: run it in a child)."""
    from stages.io.noise import silence_known_noise

    silence_known_noise(quantized=False)  # before PEFT loads bitsandbytes, as a stage process of this LoRA chain
    import torch

    from stages.io.config import load_config
    from stages.io.data import load_rollout_prompts
    from stages.model.adapters import load_adapter
    from stages.model.backbone import stage_backbone
    from stages.model.generation import generate

    cfg = load_config(CHAT, items)
    backbone, tokenization = stage_backbone(cfg)
    model = load_adapter(backbone.model, sft, "policy", backbone.fingerprint)
    model.set_adapter("policy")
    prompts = [tokenization.prompt_ids(p) for p in load_rollout_prompts(cfg.data, cfg.task)]  # PPO's and RRHF's

    def sample(rows: int, batch: int, tokens: int) -> tuple[int, float]:
        ids = (prompts * math.ceil(rows / len(prompts)))[:rows]
        if cfg.backbone.device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        responses = generate(model, tokenization, ids, max_new_tokens=tokens, temperature=1.0, batch_size=batch, seed=0)
        if cfg.backbone.device == "cuda":
            torch.cuda.synchronize()
        return sum(len(r.token_ids) for r in responses), time.perf_counter() - started

    sample(4, 4, 4)  # warm-up: kernels, allocator, caches
    results = []
    for label, rows, batch, tokens in generation_workloads(cfg):
        sampled, seconds = sample(rows, batch, tokens)
        results.append(
            {
                "workload": label,
                "rows": rows,
                "batch": batch,
                "new_tokens": tokens,
                "sampled": sampled,
                "seconds": round(seconds, 3),
                "tokens_per_s": round(sampled / seconds, 1),
            }
        )
    return results


def read_peaks(path: Path) -> dict[str, dict[str, float]]:
    """Each stage's peaks (rank 0's; the chain here runs every stage locally)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {row["stage"]: row for row in rows if row["rank"] == 0}


def table(stages: dict[str, dict[str, Any]], generation: list[dict[str, Any]]) -> str:
    """Markdown tables: one row per stage, one per sampling workload."""
    lines = [
        "| stage | device | process s | stage s | peak GPU MiB allocated / reserved | peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for stage, row in stages.items():
        gpu = "-"
        if "peak_gpu_allocated_mib" in row:
            gpu = f"{row['peak_gpu_allocated_mib']:.0f} / {row['peak_gpu_reserved_mib']:.0f}"
        figures = f"{row['process_s']:.1f} | {row['stage_s']:.1f} | {gpu} | {row['peak_rss_mib']:.0f}"
        lines.append(f"| {stage} | {row['device']} | {figures} |")
    lines += [
        "",
        "| sampling | rows | batch | new tokens | tokens sampled | s | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in generation:
        lines.append(
            f"| {g['workload']} | {g['rows']} | {g['batch']} | {g['new_tokens']} | {g['sampled']} | {g['seconds']:.2f} | {g['tokens_per_s']:.0f} |"
        )
    return "\n".join(lines)


def measure(shape: str, device: str, launcher: str, tokenizer: Path | None, keep: bool) -> dict[str, Any]:
    """Build the backbone, run the chain, time generation; return the figures (the work folder is removed
    unless ``keep``)."""
    work = Path(tempfile.mkdtemp(prefix="shape-chain-"))
    try:
        started = time.perf_counter()
        backbone = build(work / "backbone", shape, tokenizer)
        print(f"built {backbone} ({shape}) in {time.perf_counter() - started:.1f}s; chain via {launcher}", flush=True)
        items = overrides(shape, device, backbone)
        (work / "overrides.json").write_text(json.dumps(items))
        process_s = run_chain(items, work, launcher)
        runs = work / "runs" / "shape"
        manifests = {stage: json.loads((runs / stage / "manifest.json").read_text()) for stage in process_s}
        peaks = read_peaks(work / "peaks.jsonl")
        child = [sys.executable, __file__, "--child-generation", str(work), str(runs / "sft")]
        subprocess.run(child, env={**os.environ, **work_env(work)}, check=True)
        generation = json.loads((work / "generation.json").read_text())
    finally:
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    stages = {
        stage: {
            "process_s": process_s[stage],
            "stage_s": manifest["seconds"],
            "device": manifest["launch"]["device"],
            **peaks[stage],
        }
        for stage, manifest in manifests.items()
    }
    about = {"shape": shape, "device_name": _device_name(device), "dtype": DTYPE[device], "launcher": launcher}
    return {**about, "stages": stages, "generation": generation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="0.5b")
    parser.add_argument("--device", choices=DTYPE, default="cuda")
    parser.add_argument(
        "--launcher",
        choices=("auto", "cli", "processes"),
        default="auto",
        help="auto: the CLI where Prefect is importable, else the stage processes",
    )
    parser.add_argument("--tokenizer", type=Path, help="a qwen2.5-instruct folder (default: tests/families.py's)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (backbone, runs)")
    parser.add_argument("--child-generation", nargs=2, metavar=("WORK", "SFT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_generation:
        work, sft = map(Path, args.child_generation)
        items = json.loads((work / "overrides.json").read_text())
        (work / "generation.json").write_text(json.dumps(time_generation(items, sft)))
        return
    launcher = args.launcher
    if launcher == "auto":
        launcher = "cli" if _importable("prefect") else "processes"
    figures = measure(args.shape, args.device, launcher, args.tokenizer, args.keep)
    print(f"\n{args.shape} on {figures['device_name']}, {figures['dtype']}, chain via {launcher}\n")
    print(table(figures["stages"], figures["generation"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _device_name(device: str) -> str:
    """The device's name, quoted with every figure (CUDA is initialised in this process only now, at the end)."""
    import torch

    from stages.io.devices import cpu_model

    return f"{torch.cuda.get_device_name(0) if device == 'cuda' else cpu_model()} (torch {torch.__version__})"


if __name__ == "__main__":
    main()
