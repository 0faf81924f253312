"""Peak RSS and seconds per PPO update: our one-backbone layout vs the separate-copies layout.

    python bench/ppo_memory.py                      # sizes 1.6m, 31m, 105m; 3 timed updates each
    python bench/ppo_memory.py --sizes 105m --updates 5
    python bench/ppo_memory.py --device cuda         # on a GPU: peak GPU memory instead of peak RSS

ours      one frozen Llama + four LoRA adapters (reference, policy, reward, value) + two small heads;
          the real ``stages.ppo.rollout.score_rollout`` and ``stages.ppo.recipe.ppo_update``.
separate  the layout of TRL's last PPO: a LoRA policy whose reference is the adapter disabled, a
          separate frozen reward model, and a separate value model trained in full (+ heads).

Identical random-init Llama configs, batch 8, 16 prompt + 32 response tokens, LoRA r=16, one torch
thread, the default PPO settings (2 epochs x minibatches of 4). Each (layout, size) runs in a fresh
child process of this script, so each peak RSS is that layout's alone; the table prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SIZES = {  # name: (layers, hidden, intermediate, vocab) -> about 1.6M, 31M and 105M parameters
    "1.6m": (2, 128, 512, 8192),
    "31m": (8, 512, 1376, 11264),
    "105m": (12, 768, 2048, 26000),
}
BATCH, PROMPT, RESPONSE, RANK = 8, 16, 32, 16
DEVICE = "cpu"  # --device: where the child puts every model, head and batch


def _llama(size: str, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, inter, vocab = SIZES[size]
    torch.manual_seed(seed)  # every copy starts from identical weights, as copies of one checkpoint would
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        tie_word_embeddings=True,
        max_position_embeddings=PROMPT + RESPONSE,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
    )
    return LlamaForCausalLM(config).eval().to(DEVICE)


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", task_type="CAUSAL_LM")


def _sample(policy, vocab: int, generator):
    """Fixed-length sampling (EOS suppressed) so both layouts see the same shapes."""
    import torch

    from stages.model.sequences import from_token_ids

    prompts = torch.randint(3, vocab, (BATCH, PROMPT), generator=generator, device="cpu").to(DEVICE)
    with torch.no_grad():
        out = policy.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=True,
            top_k=0,
            min_new_tokens=RESPONSE,
            max_new_tokens=RESPONSE,
            pad_token_id=0,
        )
    rows = [(p.tolist(), r.tolist()) for p, r in zip(prompts, out[:, PROMPT:])]
    return from_token_ids(rows, pad_id=0, device=DEVICE), torch.ones(BATCH, dtype=torch.bool, device=DEVICE)


def run_ours(size: str, updates: int) -> float:
    import torch
    from peft import get_peft_model

    from stages.io.config import load_config
    from stages.model.adapters import active_adapter, set_trainable
    from stages.model.backbone import freeze
    from stages.model.heads import new_head
    from stages.ppo.recipe import ppo_update, ppo_updater
    from stages.ppo.rollout import POLICY, PPOModels, score_rollout

    base = _llama(size, seed=0)
    freeze(base)
    model = get_peft_model(base, _lora(), adapter_name="reference")
    for name in ("policy", "reward", "value"):
        model.add_adapter(name, _lora())
    model.set_adapter(POLICY)
    set_trainable(model, ["policy", "value"])
    hidden = base.config.hidden_size
    value_head = new_head(hidden, 1, DEVICE).requires_grad_(True)
    models = PPOModels(model, None, new_head(hidden, 0, DEVICE), value_head, "bench")  # type: ignore[arg-type]  # no tokenizer
    cfg = load_config(None, ["ppo.minibatch_size=4", "ppo.learning_rate=1e-5"])
    updater = ppo_updater(models, cfg.ppo)
    generator = torch.Generator().manual_seed(0)

    def one_update() -> None:
        with active_adapter(model, POLICY):
            batch, finished = _sample(model, base.config.vocab_size, generator)
        rollout, _ = score_rollout(models, batch, finished, cfg.ppo, kl_coef=0.1)
        ppo_update(models, rollout, updater, cfg.ppo, generator)

    return _timed(one_update, updates)


def run_separate(size: str, updates: int) -> float:
    import torch
    from peft import get_peft_model

    from stages.io.config import load_config
    from stages.model.backbone import freeze
    from stages.model.heads import new_head, sequence_scores
    from stages.model.sequences import token_logprobs, token_logprobs_and_entropy, token_values
    from stages.objectives.losses import ppo_policy_loss, ppo_value_loss
    from stages.ppo.rollout import shape_rollout

    policy_base = _llama(size, seed=0)
    freeze(policy_base)
    policy = get_peft_model(policy_base, _lora())
    reward_model = _llama(size, seed=0)
    freeze(reward_model)
    value_model = _llama(size, seed=0).train()  # trained in full, as TRL's last PPO did
    hidden = policy_base.config.hidden_size
    reward_head, value_head = new_head(hidden, 0, DEVICE), new_head(hidden, 1, DEVICE)
    params = [p for p in policy.parameters() if p.requires_grad]
    params += list(value_model.parameters()) + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    cfg = load_config(None, ["ppo.minibatch_size=4"])
    generator = torch.Generator().manual_seed(0)

    def one_update() -> None:
        batch, finished = _sample(policy, policy_base.config.vocab_size, generator)
        with torch.no_grad():
            logprobs = token_logprobs(policy, batch)
            with policy.disable_adapter():
                ref_logprobs = token_logprobs(policy, batch)
            scores = sequence_scores(reward_model, reward_head, batch)
            values = token_values(value_model, value_head, batch)
        rollout, _ = shape_rollout(batch, finished, scores, logprobs, ref_logprobs, values, cfg.ppo, kl_coef=0.1)
        for _ in range(cfg.ppo.ppo_epochs):
            order = torch.randperm(BATCH, generator=generator)
            for start in range(0, BATCH, cfg.ppo.minibatch_size):
                mb = rollout.select(order[start : start + cfg.ppo.minibatch_size])
                new_logprobs, _ = token_logprobs_and_entropy(policy, mb.batch)
                policy_loss, _ = ppo_policy_loss(new_logprobs, mb.old_logprobs, mb.advantages, mb.response_mask, 0.2)
                new_values = token_values(value_model, value_head, mb.batch)
                value_loss, _ = ppo_value_loss(new_values, mb.old_values, mb.returns, mb.response_mask, 0.2)
                (policy_loss + 0.5 * value_loss).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    return _timed(one_update, updates)


def _timed(one_update, updates: int) -> float:
    import torch

    one_update()  # warm-up: allocator, optimizer state
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)  # GPU kernels finish asynchronously
    sync()
    started = time.perf_counter()
    for _ in range(updates):
        one_update()
    sync()
    return (time.perf_counter() - started) / updates


def child(layout: str, size: str, updates: int, device: str) -> None:
    import torch

    global DEVICE
    DEVICE = device
    torch.set_num_threads(1)
    seconds = {"ours": run_ours, "separate": run_separate}[layout](size, updates)
    if device == "cuda":  # what the layouts differ in lives on the GPU there; the host holds the same process
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"layout": layout, "size": size, "seconds_per_update": seconds, "peak_rss_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--child", nargs=2, metavar=("LAYOUT", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.updates, args.device)
        return
    peak = "peak RSS MB" if args.device == "cpu" else "peak GPU MB"
    print(f"{'size':>6} {'layout':>9} {peak:>12} {'s/update':>9}")
    for size in args.sizes.split(","):
        results = {}
        for layout in ("ours", "separate"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    layout,
                    size,
                    "--updates",
                    str(args.updates),
                    "--device",
                    args.device,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            results[layout] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[layout]
            print(f"{size:>6} {layout:>9} {r['peak_rss_mb']:>12.0f} {r['seconds_per_update']:>9.2f}", flush=True)
        ours, separate = results["ours"], results["separate"]
        print(
            f"{size:>6} {'ratio':>9} {ours['peak_rss_mb'] / separate['peak_rss_mb']:>12.2f} "
            f"{ours['seconds_per_update'] / separate['seconds_per_update']:>9.2f}   (ours / separate)",
            flush=True,
        )


if __name__ == "__main__":
    main()
