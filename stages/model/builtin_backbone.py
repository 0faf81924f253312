"""The built-in backbones: a tokenizer and a tiny Llama, pretrained on the task's corpus.

No hub is reachable in CI, so the project builds its own real (if small) pretrained base model. The
build is a pure function of ``TinySpec`` (seeded; torch runs deterministic kernels on CPU), is cached
under ``$RLHF_HOME/backbones/`` by the digest of the spec and this file (``stages.io.builtin_spec``: the
flow finds the build without importing this module), and is published atomically.

Two names share the one set of weights:

* ``builtin:tiny`` (the default): a simple tokenizer that adds no BOS, has a pad token and no chat template;
* ``builtin:tiny-chat``: the same vocabulary packaged like a modern chat model's tokenizer (Llama-3,
  Qwen): it adds BOS, has no pad token, and has a chat template with special role tokens whose assistant
  turns end with ``<|end|>``, not EOS. A quarter of the pretraining streams are rendered in that
  template, so the base model knows it, as a real chat model does.

    python -m stages.model.builtin_backbone [--chat]     # or: rlhf build-backbone
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from stages.io import artifacts
from stages.io.arithmetic import EQUATION_SEPARATOR, pretraining_lines
from stages.io.builtin_spec import (
    ASSISTANT,
    BOS,
    CHAT_TEMPLATE,
    END_OF_TURN,
    EOS,
    PAD,
    ROLE_TOKENS,
    SYSTEM,
    USER,
    TinySpec,
    builtin_dir,
)


def ensure_builtin_backbone(spec: TinySpec = TinySpec(), chat: bool = False) -> Path:
    """Return the folder of the built backbone (``chat``: its chat-tokenizer variant), building it first
    if no finished build exists."""
    target = builtin_dir(spec, chat)
    if artifacts.is_finished(target):
        return target
    if chat:
        return _package_chat_variant(ensure_builtin_backbone(spec), target)

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # two first runs at once build it once
        if not artifacts.is_finished(target):
            print(f"building the built-in backbone (first use, about 2 minutes on 2 cores) -> {target}", flush=True)
            started = time.time()
            with artifacts.staging(target) as tmp:
                loss = _build(spec, tmp)
                artifacts.publish(
                    tmp,
                    target,
                    {
                        "kind": "builtin-backbone",
                        "spec": asdict(spec),
                        "final_loss": loss,
                        "seconds": round(time.time() - started, 1),
                    },
                )
    return target


def chat_messages(line: str, equations_per_turn: int = 2) -> list[dict[str, str]]:
    """A pretraining stream as a conversation: each user turn asks one equation's prompt, and the
    assistant answers it and rambles on with the next equations of its turn, ending after a ``;`` (never
    right after an answer: stopping there is what SFT teaches, as in the plain streams).

    Several turns per stream, not one: the skill that matters in chat form is the answer right after
    ``=<|end|><|assistant|>``, and one such answer per chat stream left it marginal, learned on one
    CPU's kernels and not on another's (issue 27: P(answer) at T=1 0.59 on an AMX build, 0.97 on an
    AVX2 build, with the plain format at 0.99 on both)."""
    equations = [e + EQUATION_SEPARATOR for e in line.split(EQUATION_SEPARATOR) if e]
    messages: list[dict[str, str]] = []
    for start in range(0, len(equations), equations_per_turn):
        turn = equations[start : start + equations_per_turn]
        prompt, _, answer = turn[0].partition("=")
        messages += [
            {"role": "user", "content": prompt + "="},
            {"role": "assistant", "content": answer + "".join(turn[1:])},
        ]
    return messages


def chat_stream(line: str) -> str:
    """A pretraining stream as one chat conversation (``chat_messages``), exactly as CHAT_TEMPLATE renders
    it (tests check the match)."""
    return BOS + "".join(f"{ROLE_TOKENS[m['role']]}{m['content']}{END_OF_TURN}" for m in chat_messages(line))


def _package_chat_variant(base: Path, target: Path) -> Path:
    """The base weights (hard links) with the chat-model tokenizer; published atomically."""
    import os
    import shutil

    with artifacts.staging(target) as tmp:
        for path in base.iterdir():
            if path.name in ("config.json", "generation_config.json") or path.suffix == ".safetensors":
                try:
                    os.link(path, tmp / path.name)
                except OSError:  # another file system
                    shutil.copy2(path, tmp / path.name)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
        tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tokenizer.bos_token_id)]
        )
        tokenizer.pad_token = None
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(tmp)
        artifacts.publish(tmp, target, {"kind": "builtin-backbone", "variant": "chat", "base": base.name})
    return target


def _train_tokenizer(lines: list[str], spec: TinySpec):
    tok = Tokenizer(models.BPE(unk_token=None))
    # Digits one by one: numbers stay compositional, which is what lets a tiny model learn to add.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=[PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END_OF_TURN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens=[SYSTEM, USER, ASSISTANT, END_OF_TURN],
    )


def _build(spec: TinySpec, out: Path) -> float:
    """Train the tokenizer and pretrain the model; save both into ``out``. Returns the final loss."""
    torch.manual_seed(spec.seed)
    # Each line ends in EOS (a chat line in END_OF_TURN), so the base knows the token (a real pretrained
    # model does), but never right after an answer: stopping there is what SFT has to teach.
    streams = pretraining_lines(spec.max_operand, spec.seed, spec.steps * spec.batch_size, spec.equations_per_line)
    lines = [
        chat_stream(line) if n % spec.chat_every == spec.chat_every - 1 else line + EOS
        for n, line in enumerate(streams)
    ]
    tokenizer = _train_tokenizer(lines[:20000], spec)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=spec.learning_rate, total_steps=spec.steps)
    model.train()
    loss_value = math.nan
    bar = tqdm(range(spec.steps), desc="pretraining built-in backbone", unit="step")
    for step in bar:
        batch = lines[step * spec.batch_size : (step + 1) * spec.batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)  # (B, T)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return loss_value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--chat", action="store_true", help="also package the chat-tokenizer variant (builtin:tiny-chat)"
    )
    print(ensure_builtin_backbone(chat=parser.parse_args(argv).chat))


if __name__ == "__main__":
    main()
