"""Seconds per GRPO step, split by phase, and peak memory: TRL's own GRPOTrainer against our GRPO stage, on
identical work.

    python bench/grpo_vs_trl.py                       # sizes 1.6m, 31m, 105m; 1 warm-up + 3 timed steps, 3 repeats
    python bench/grpo_vs_trl.py --sizes 105m --steps 5 --repeats 5
    python bench/grpo_vs_trl.py --device cuda         # on a GPU: bf16, peak GPU memory instead of peak RSS

TRL    ``trl.GRPOTrainer`` of trl 1.16 (the project's pin), untouched, with a PEFT LoRA: its reference is the
       base with the adapter disabled, so it holds one backbone too.
ours   the stage's own ``stages.grpo.recipe.sample_groups`` and ``grpo_step`` on one backbone with the
       ``reference`` and ``policy`` LoRA adapters, as ``build_model`` lays them out.

The same work on both sides, every step: the same random-init Llama (``bench/ppo_vs_trl.py``'s sizes, saved once
per size and loaded by both), 4 prompts of 16 words x G=8 completions of 32 tokens sampled at temperature 1
(TRL: ``min_new_tokens`` keeps it from stopping early; ours: the random model's end token is one of 26,000,
and the mean response length is printed), one reference pass, one training pass and one AdamW step over the
32 completions (one iteration, beta 0.04, DAPO's token-mean loss, no std scaling), LoRA r=16 on all seven
projections, the same reward function of the text (a share of distinct words), no gradient checkpointing
(TRL's GRPOConfig turns it on by default: a recomputed forward in every backward), fp32 with one torch
thread on the CPU (bf16 on a GPU).

The phases: ``generation`` is the time inside transformers' ``generate`` (both sides call it), ``scoring`` the
time in the side's log-prob function without gradients (the reference's log-probs: TRL's
``_get_per_token_logps_and_entropies``, our ``token_logprobs``), ``optimisation`` the rest of the step (the
policy's forward with gradients, backward, AdamW, rewards and each side's own bookkeeping).
Each (side, size, repeat) runs in a fresh child process, so each peak is that side's alone; the table gives
the median over ``--repeats`` of each figure (peak RSS jumps by ~0.9 GB between repeats at 105M, as the
allocator decides, so one repeat is no measure).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_vs_trl import SIZES, build_assets, child_env  # noqa: E402  (bench/ is no package)

PROMPTS, GROUP, RESPONSE, RANK, LEARNING_RATE, BETA = 4, 8, 32, 16, 1e-5, 0.04


def distinct_words(completions: list[str], **kwargs: Any) -> list[float]:
    """The reward of both sides: the share of distinct words in a completion (a function of its text only)."""
    return [len(set(text.split())) / max(1, len(text.split())) for text in completions]


class Phases:
    """Where a step's time goes: time inside ``generate`` is generation, time in the side's log-prob function
    without gradients is scoring (``time_scoring``), the rest of the step is optimisation."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.generation = self.scoring = 0.0
        self.generating = False
        self.marks: list[tuple[float, float, float, float]] = []  # (wall, cpu, generation, scoring) at step ends

    def sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def install(self) -> None:
        """Time ``generate`` (both sides call transformers' ``GenerationMixin.generate``)."""
        from transformers.generation.utils import GenerationMixin

        generate = GenerationMixin.generate

        def timed_generate(model: Any, *args: Any, **kwargs: Any) -> Any:
            self.sync()
            started, self.generating = time.perf_counter(), True
            try:
                return generate(model, *args, **kwargs)
            finally:
                self.sync()
                self.generating = False
                self.generation += time.perf_counter() - started

        GenerationMixin.generate = timed_generate  # type: ignore[method-assign]

    def time_scoring(self, owner: Any, name: str) -> None:
        """Time ``owner.name``, the side's log-prob function, when it runs without gradients (the reference's
        log-probs): TRL's ``GRPOTrainer._get_per_token_logps_and_entropies`` (decoder and its fused LM head),
        our ``token_logprobs`` (decoder, LM head, log-softmax)."""
        function = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            import torch

            if self.generating or torch.is_grad_enabled():
                return function(*args, **kwargs)
            self.sync()
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.sync()
                self.scoring += time.perf_counter() - started

        setattr(owner, name, timed)

    def mark(self) -> None:
        self.sync()
        self.marks.append((time.perf_counter(), time.process_time(), self.generation, self.scoring))

    def per_step(self) -> dict[str, float]:
        """Means per step from the end of the warm-up step (the first mark) to the last."""
        first, last = self.marks[1], self.marks[-1]
        steps = len(self.marks) - 2
        wall, cpu, generation, scoring = ((b - a) / steps for a, b in zip(first, last, strict=True))
        return {
            "wall_s": wall,
            "cpu_s": cpu,
            "generation_s": generation,
            "scoring_s": scoring,
            "optimisation_s": wall - generation - scoring,
        }


def _texts(folder: Path) -> list[str]:
    """The prompts as text: the word-level tokenizer maps ``w17`` back to id 17 on both sides."""
    return [" ".join(f"w{i}" for i in ids) for ids in json.loads((folder / "prompts.json").read_text())]


def run_trl(folder: Path, steps: int, device: str, phases: Phases) -> dict[str, float]:
    """TRL 1.16's GRPOTrainer, untouched, with a callback that marks each step's end."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    phases.time_scoring(GRPOTrainer, "_get_per_token_logps_and_entropies")
    lengths: list[float] = []

    class MarkSteps(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            phases.mark()

    def reward(completions: list[str], completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        lengths.extend(len(ids) for ids in completion_ids)
        return distinct_words(completions)

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=PROMPTS * GROUP,
            gradient_accumulation_steps=1,
            steps_per_generation=1,
            num_generations=GROUP,
            num_iterations=1,
            max_completion_length=RESPONSE,
            generation_kwargs={"min_new_tokens": RESPONSE},
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=BETA,
            loss_type="dapo",
            scale_rewards="none",
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant",
            gradient_checkpointing=False,  # TRL's GRPO default is on: a second forward ours does not do
            max_steps=steps + 1,
            shuffle_dataset=False,
            logging_steps=10**6,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            seed=0,
            bf16=device == "cuda",
            use_cpu=device == "cpu",
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": _texts(folder)}),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        trainer.add_callback(MarkSteps())
        phases.mark()
        trainer.train()
    return {"response_length": sum(lengths) / len(lengths)}


def run_ours(folder: Path, steps: int, device: str, phases: Phases) -> dict[str, float]:
    """Our stage's functions on the adapters ``stages.grpo.recipe.build_model`` lays out (fresh LoRA)."""
    import torch
    from peft import LoraConfig, get_peft_model

    import stages.grpo.recipe
    from stages.grpo.recipe import POLICY, REFERENCE, grpo_step, sample_groups
    from stages.io.config import load_config
    from stages.model.adapters import set_trainable
    from stages.model.backbone import load_backbone
    from stages.model.tokenization import Tokenization
    from stages.training.rewards import RewardSource
    from stages.training.updater import Updater

    phases.time_scoring(stages.grpo.recipe, "token_logprobs")
    cfg = load_config(
        None,
        [
            f"backbone.name={folder}",
            f"backbone.device={device}",
            f"backbone.dtype={'bfloat16' if device == 'cuda' else 'float32'}",
            f"grpo.prompts_per_step={PROMPTS}",
            f"grpo.num_generations={GROUP}",
            f"grpo.minibatch_size={PROMPTS * GROUP}",
            "grpo.num_iterations=1",
            f"grpo.max_new_tokens={RESPONSE}",
            "grpo.temperature=1.0",
            f"grpo.beta={BETA}",
            f"grpo.learning_rate={LEARNING_RATE}",
            f"grpo.max_steps={steps + 1}",
            "grpo.scale_rewards=false",
            "grpo.reward=checker",
        ],
    )
    backbone = load_backbone(cfg.backbone)
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(backbone.model, lora, adapter_name=REFERENCE)
    model.add_adapter(POLICY, lora)
    model.set_adapter(POLICY)
    set_trainable(model, [POLICY])
    model.eval()  # as the stage: dropout off (TRL: disable_dropout)
    source = RewardSource("checker", "distinct_words", distinct_words, None)
    updater = Updater(
        model,
        LEARNING_RATE,
        warmup_steps=0,
        total_steps=steps + 1,
        max_grad_norm=cfg.grpo.max_grad_norm,
        schedule="constant",
        micro_batch_size=PROMPTS * GROUP,
        bf16=device == "cuda",
    )
    tokenization = Tokenization.of(backbone.tokenizer)
    texts, order, lengths = _texts(folder), torch.Generator().manual_seed(0), []
    phases.mark()
    for step in range(steps + 1):
        batch, old_logprobs, rewards, stats = sample_groups(
            model, tokenization, source, texts[step * PROMPTS : (step + 1) * PROMPTS], cfg.grpo, seed=step
        )
        grpo_step(model, batch, old_logprobs, rewards, updater, cfg.grpo, order)
        lengths.append(stats["response_length"])
        phases.mark()
    return {"response_length": sum(lengths) / len(lengths)}


def run_ours_unshared(folder: Path, steps: int, device: str, phases: Phases) -> dict[str, float]:
    """Ours without issue 33's prompt sharing (``stages.model.prompt_sharing``): every one of a group's G
    rows computes its prompt again, in generation and in scoring; the lever's gain, in the same run."""
    from stages.model import generation
    from stages.model.prompt_sharing import PromptGroups

    generation.shared_prompt_cache = lambda *args: None  # type: ignore[assignment]
    PromptGroups.of = staticmethod(lambda *args: None)  # type: ignore[method-assign]
    return run_ours(folder, steps, device, phases)


SIDES: dict[str, Callable[[Path, int, str, Phases], dict[str, float]]] = {
    "trl": run_trl,
    "ours": run_ours,
    "ours-unshared": run_ours_unshared,
}


def child(side: str, folder: Path, steps: int, device: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    phases = Phases(device)
    phases.install()
    extra = SIDES[side](folder, steps, device, phases)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"side": side, **phases.per_step(), "peak_mb": peak_mb, **extra}))


def run_child(side: str, folder: Path, args: argparse.Namespace) -> dict[str, float]:
    env = child_env(args.device)
    command = [sys.executable, __file__, "--child", side, str(folder), "--steps", str(args.steps)]
    command += ["--device", args.device, "--threads", str(args.threads)]
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{side} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


FIGURES = ("wall_s", "generation_s", "scoring_s", "optimisation_s", "cpu_s", "peak_mb", "response_length")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up")
    parser.add_argument("--repeats", type=int, default=3, help="child processes per side and size (medians)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    parser.add_argument("--sides", default="trl,ours", help=f"of {', '.join(SIDES)}; ratios need trl and ours")
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), args.steps, args.device, args.threads)
        return
    peak = "peak RSS MiB" if args.device == "cpu" else "peak GPU MiB"
    print(
        f"{args.device}, {args.threads} thread(s), {PROMPTS} prompts x {GROUP} completions of {RESPONSE} tokens, "
        f"{args.steps} timed steps; medians of {args.repeats} repeats; ratio = ours / TRL"
    )
    print(
        f"{'size':>6} {'side':>13} {'s/step':>8} {'generate':>9} {'score':>7} {'optimise':>9} {'CPU s':>7} "
        f"{peak:>13} {'resp. len':>9}"
    )
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            build_assets(folder, size, PROMPTS * (args.steps + 1))
            runs: dict[str, list[dict[str, float]]] = {side: [] for side in args.sides.split(",")}
            for _ in range(args.repeats):  # alternated, so a slow spell of the machine hits both sides
                for side in runs:
                    runs[side].append(run_child(side, folder, args))
        medians = {side: {k: statistics.median(r[k] for r in rs) for k in FIGURES} for side, rs in runs.items()}
        for side, m in medians.items():
            print(
                f"{size:>6} {side:>13} {m['wall_s']:>8.3f} {m['generation_s']:>9.3f} {m['scoring_s']:>7.3f} "
                f"{m['optimisation_s']:>9.3f} {m['cpu_s']:>7.3f} {m['peak_mb']:>13.0f} {m['response_length']:>9.1f}",
                flush=True,
            )
        if not {"ours", "trl"} <= medians.keys():
            continue
        ours, trl = medians["ours"], medians["trl"]
        print(
            f"{size:>6} {'ratio':>13} {ours['wall_s'] / trl['wall_s']:>8.2f} "
            f"{ours['generation_s'] / trl['generation_s']:>9.2f} {ours['scoring_s'] / max(trl['scoring_s'], 1e-9):>7.2f} "
            f"{ours['optimisation_s'] / trl['optimisation_s']:>9.2f} {ours['cpu_s'] / trl['cpu_s']:>7.2f} "
            f"{ours['peak_mb'] / trl['peak_mb']:>13.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
