"""Seconds per PPO update and peak memory: TRL's own PPOTrainer against our PPO stage, on identical work.

    python bench/ppo_vs_trl.py                        # sizes 1.6m, 31m, 105m; 1 warm-up + 3 timed updates each
    python bench/ppo_vs_trl.py --sizes 105m --updates 5
    python bench/ppo_vs_trl.py --device cuda          # on a GPU: peak GPU memory instead of peak RSS
    python bench/ppo_vs_trl.py --trl-python PATH      # a Python that has trl 1.11 (default: bench/.venv-trl)
    python bench/ppo_vs_trl.py --value-model shared   # ours with ppo.value_model=shared (not identical work)

TRL    ``trl.experimental.ppo.PPOTrainer`` of trl 1.11.0, the last release that has it, in its own virtual
       environment (``bench/.venv-trl``, made on first use with the project's pins for everything else):
       a LoRA policy whose reference is the adapter disabled, a separate reward model and a separate value
       model trained in full, as TRL lays PPO out.
ours   one frozen backbone with four LoRA adapters (reference, policy, reward, value) and two heads; the
       stage's own ``stages.ppo.rollout.rollout_from_ids`` (sampling, then four scoring passes) and ``ppo_update``.

The same work on both sides: the same random-init Llama (saved once per size, loaded by both), batch 8,
16 prompt + 32 sampled response tokens at temperature 1, LoRA r=16 on all seven projections, 1 PPO epoch
x 1 minibatch of 8, fp32, one torch thread on the CPU. Each (side, size) runs in a fresh child process, so
each peak is that side's alone; an update is generation + scoring + optimisation, the first one a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # name: (layers, hidden, intermediate, vocab) -> about 1.6M, 31M and 105M parameters
    "1.6m": (2, 128, 512, 8192),
    "31m": (8, 512, 1376, 11264),
    "105m": (12, 768, 2048, 26000),
}
# Named with --sizes only, never a default (a GPU's size: bench/gpu_check.sh step 6). Qwen2.5-0.5B's shape as a
# Llama: 14 query heads of 64 and 2 KV heads, no q/k/v biases (27,648 parameters fewer than its 494,032,768).
GPU_SIZES = {"0.5b": (24, 896, 4864, 151936)}
KV_HEADS = {"0.5b": 2}  # the other sizes: one KV head per query head
BATCH, PROMPT, RESPONSE, RANK, LEARNING_RATE, KL_COEF = 8, 16, 32, 16, 1e-5, 0.05
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0-3; prompts draw from the other ids
TRL_VENV = Path(__file__).resolve().parent / ".venv-trl"
TRL_PINS = ["trl==1.11.0", "transformers==5.23.0", "peft==0.21.2", "accelerate==1.15.0", "datasets==5.2.0"]


def build_assets(folder: Path, size: str, prompts: int) -> None:
    """A random-init Llama, a word-level tokenizer over its whole vocabulary, and ``prompts`` random prompts."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    layers, hidden, inter, vocab = {**SIZES, **GPU_SIZES}[size]
    words = {token: i for i, token in enumerate(SPECIALS + [f"w{i}" for i in range(len(SPECIALS), vocab)])}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=KV_HEADS.get(size, hidden // 64),
        tie_word_embeddings=True,
        max_position_embeddings=PROMPT + RESPONSE,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    ids = torch.randint(len(SPECIALS), vocab, (prompts, PROMPT), generator=torch.Generator().manual_seed(0))
    (folder / "prompts.json").write_text(json.dumps(ids.tolist()))


class _Clock:
    """Wall and process-CPU seconds between update ends; the first update (warm-up) is not counted."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.marks: list[tuple[float, float]] = []

    def mark(self) -> None:
        if self.device == "cuda":  # GPU kernels finish asynchronously
            import torch

            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), time.process_time()))

    def per_update(self) -> tuple[float, float]:
        (wall0, cpu0), (wall1, cpu1) = self.marks[0], self.marks[-1]
        return (wall1 - wall0) / (len(self.marks) - 1), (cpu1 - cpu0) / (len(self.marks) - 1)


def run_trl(folder: Path, updates: int, device: str, clock: _Clock) -> dict:
    """TRL 1.11's PPOTrainer, untouched, with a callback that marks each update's end."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    class MarkUpdates(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            clock.mark()

    tokenizer = AutoTokenizer.from_pretrained(folder)
    policy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.manual_seed(1)  # the score heads are new: the same on both sides is not needed, a fixed one is
    reward = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
    prompts = json.loads((folder / "prompts.json").read_text())
    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(
            output_dir=out,
            per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=1,
            num_mini_batches=1,
            num_ppo_epochs=1,
            total_episodes=BATCH * (updates + 1),
            local_rollout_forward_batch_size=BATCH,
            response_length=RESPONSE,
            temperature=1.0,
            stop_token=None,
            missing_eos_penalty=1.0,
            learning_rate=LEARNING_RATE,
            kl_coef=KL_COEF,
            num_sample_generations=0,
            report_to=[],
            save_strategy="no",
            logging_steps=10**6,
            disable_tqdm=True,
            seed=0,
            bf16=False,
            use_cpu=device == "cpu",
        )
        trainer = PPOTrainer(
            args=args,
            processing_class=tokenizer,
            model=policy,
            ref_model=None,
            reward_model=reward,
            value_model=value,
            train_dataset=Dataset.from_dict({"input_ids": prompts}),
            peft_config=LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        trainer.add_callback(MarkUpdates())
        clock.mark()
        trainer.train()
    return {"response_length": RESPONSE}  # no stop token: TRL always samples the full length


def run_ours(folder: Path, updates: int, device: str, clock: _Clock, value_model: str = "separate") -> dict:
    """Our stage's code: the models as ``stages.ppo.rollout.build_models`` lays them out (fresh LoRA adapters)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from stages.io.config import load_config
    from stages.model.adapters import set_trainable
    from stages.model.backbone import load_backbone
    from stages.model.heads import new_head
    from stages.model.tokenization import Tokenization
    from stages.ppo.recipe import ppo_update, ppo_updater
    from stages.ppo.rollout import POLICY, VALUE, PPOModels, rollout_from_ids

    cfg = load_config(
        None,
        [
            f"backbone.name={folder}",
            f"backbone.device={device}",
            "backbone.dtype=float32",
            f"ppo.rollout_prompts={BATCH}",
            f"ppo.minibatch_size={BATCH}",
            "ppo.ppo_epochs=1",
            f"ppo.max_new_tokens={RESPONSE}",
            "ppo.temperature=1.0",
            f"ppo.learning_rate={LEARNING_RATE}",
            f"ppo.updates={updates + 1}",
            f"ppo.value_model={value_model}",
        ],
    )
    backbone = load_backbone(cfg.backbone)
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(backbone.model, lora, adapter_name="reference")
    shared = value_model == "shared"
    for name in ("policy", "reward") if shared else ("policy", "reward", "value"):
        model.add_adapter(name, lora)
    model.set_adapter(POLICY)
    hidden, device_ = backbone.model.config.hidden_size, backbone.model.device
    models = PPOModels(
        model,
        Tokenization.of(backbone.tokenizer),
        new_head(hidden, 0, device_),
        new_head(hidden, 1, device_).requires_grad_(True),
        backbone.fingerprint,
        value_adapter=POLICY if shared else VALUE,
    )
    set_trainable(model, models.trainable)
    updater = ppo_updater(models, cfg.ppo)
    generator = torch.Generator().manual_seed(0)
    prompts = json.loads((folder / "prompts.json").read_text())
    lengths = []
    clock.mark()
    for update in range(updates + 1):
        rollout, stats = rollout_from_ids(
            models, prompts[update * BATCH : (update + 1) * BATCH], cfg.ppo, KL_COEF, update
        )
        ppo_update(models, rollout, updater, cfg.ppo, generator)
        lengths.append(stats["response_length"])
        clock.mark()
    return {"response_length": sum(lengths) / len(lengths)}


def child(side: str, folder: Path, updates: int, device: str, threads: int, value_model: str) -> None:
    import torch

    torch.set_num_threads(threads)
    clock = _Clock(device)
    if side == "trl":
        extra = run_trl(folder, updates, device, clock)
    else:
        extra = run_ours(folder, updates, device, clock, value_model)
    clock.marks = clock.marks[1:]  # from the end of the warm-up update
    wall, cpu = clock.per_update()
    if device == "cuda":  # what the layouts differ in lives on the GPU there
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"side": side, "wall_s": wall, "cpu_s": cpu, "peak_mb": peak_mb, **extra}))


def trl_python() -> str:
    """bench/.venv-trl's Python, made on first use: torch first (the local CPU wheel), then TRL 1.11."""
    python = TRL_VENV / "bin" / "python"
    if not python.exists():
        print(f"making {TRL_VENV} with {' '.join(TRL_PINS)} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, *TRL_PINS], check=True)
    return str(python)


def child_env(device: str) -> dict[str, str]:
    """The environment of a bench child: the repository importable, no network, no W&B, and on the CPU no
    visible GPU (TRL's accelerator would take one)."""
    paths = [str(Path(__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths),
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
    }
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_child(python: str, side: str, folder: Path, args: argparse.Namespace) -> dict:
    env = child_env(args.device)
    command = [
        python,
        __file__,
        "--child",
        side,
        str(folder),
        "--updates",
        str(args.updates),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--value-model",
        args.value_model,
    ]
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{side} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--updates", type=int, default=3, help="timed updates, after one warm-up")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    parser.add_argument("--trl-python", help="a Python with trl 1.11 (default: bench/.venv-trl, made on first use)")
    parser.add_argument(
        "--value-model",
        choices=("separate", "shared"),
        default="separate",
        help="ours: ppo.value_model (shared is not TRL's layout: a lever measured on its own)",
    )
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), args.updates, args.device, args.threads, args.value_model)
        return
    pythons = {"trl": args.trl_python or trl_python(), "ours": sys.executable}
    peak = "peak RSS MiB" if args.device == "cpu" else "peak GPU MiB"
    print(
        f"{args.device}, {args.threads} thread(s), {args.updates} timed updates, ours with "
        f"ppo.value_model={args.value_model}; ratio = ours / TRL"
    )
    print(f"{'size':>6} {'side':>6} {'wall s/update':>14} {'CPU s/update':>13} {peak:>13} {'resp. len':>9}")
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            build_assets(folder, size, BATCH * (args.updates + 1))
            results = {side: run_child(python, side, folder, args) for side, python in pythons.items()}
        for side, r in results.items():
            print(
                f"{size:>6} {side:>6} {r['wall_s']:>14.3f} {r['cpu_s']:>13.3f} {r['peak_mb']:>13.0f} "
                f"{r['response_length']:>9.1f}",
                flush=True,
            )
        ours, trl = results["ours"], results["trl"]
        print(
            f"{size:>6} {'ratio':>6} {ours['wall_s'] / trl['wall_s']:>14.2f} {ours['cpu_s'] / trl['cpu_s']:>13.2f} "
            f"{ours['peak_mb'] / trl['peak_mb']:>13.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
