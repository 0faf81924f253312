"""The built-in backbones: a tokenizer and a tiny Llama, pretrained on the task's corpus.

No hub is reachable in CI, so the project builds its own real (if small) pretrained base model. The
build is a pure function of ``TinySpec`` (seeded; torch runs deterministic kernels on CPU), is cached
under ``$RLHF_HOME/backbones/`` by the digest of the spec and this file, and is published atomically.

Two names share the one set of weights:

* ``builtin:tiny`` (the default): a simple tokenizer that adds no BOS, has a pad token and no chat template;
* ``builtin:tiny-chat``: the same vocabulary packaged like a modern chat model's tokenizer (Llama-3,
  Qwen): it adds BOS, has no pad token, and has a chat template with special role tokens whose assistant
  turns end with ``<|end|>``, not EOS. A quarter of the pretraining streams are rendered in that
  template, so the base model knows it, as a real chat model does.

    python -m stages.model.builtin_backbone      # or: rlhf build-backbone
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from stages.io import artifacts, paths
from stages.io.arithmetic import EQUATION_SEPARATOR, Problem, pretraining_lines

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SYSTEM, USER, ASSISTANT, END_OF_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
# The chat variant's template: BOS as text (as Llama-3's does), then role token, content, end of turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Every knob of the built-in backbone; its digest names the cached folder."""

    seed: int = 0
    max_operand: int = 19  # pretraining covers every sum a+b with a, b <= 19
    vocab_size: int = 300
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 128
    equations_per_line: int = 8
    batch_size: int = 32
    steps: int = 800  # ~2 min on 2 CPU cores; greedy accuracy on all sums reaches 100%
    learning_rate: float = 3e-3
    chat_every: int = 4  # every 4th pretraining stream is a chat conversation (CHAT_TEMPLATE)

    def digest(self) -> str:
        # This module plus the corpus generator: editing the rest of stages/io/arithmetic.py keeps the cached build.
        source = Path(__file__).read_text() + inspect.getsource(pretraining_lines) + inspect.getsource(Problem)
        payload = (json.dumps(asdict(self), sort_keys=True) + source).encode()
        return hashlib.sha256(payload).hexdigest()[:16]


def builtin_dir(spec: TinySpec = TinySpec(), chat: bool = False) -> Path:
    return paths.rlhf_home() / "backbones" / f"builtin-tiny{'-chat' if chat else ''}-{spec.digest()}"


def ensure_builtin_backbone(spec: TinySpec = TinySpec(), chat: bool = False) -> Path:
    """Return the folder of the built backbone (``chat``: its chat-tokenizer variant), building it first
    if no finished build exists."""
    target = builtin_dir(spec, chat)
    if artifacts.is_finished(target):
        return target
    if chat:
        return _package_chat_variant(ensure_builtin_backbone(spec), target)
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # two first runs at once build it once
        if not artifacts.is_finished(target):
            print(f"building the built-in backbone (first use, about 2 minutes on 2 cores) -> {target}", flush=True)
            started = time.time()
            with artifacts.staging(target) as tmp:
                loss = _build(spec, tmp)
                artifacts.publish(
                    tmp, target, {"kind": "builtin-backbone", "spec": asdict(spec), "final_loss": loss,
                                  "seconds": round(time.time() - started, 1)}
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
        messages += [{"role": "user", "content": prompt + "="}, {"role": "assistant", "content": answer + "".join(turn[1:])}]
    return messages


def chat_stream(line: str) -> str:
    """A pretraining stream as one chat conversation (``chat_messages``), exactly as CHAT_TEMPLATE renders
    it (tests check the match)."""
    return BOS + "".join(f"{ROLE_TOKENS[m['role']]}{m['content']}{END_OF_TURN}" for m in chat_messages(line))


def _package_chat_variant(base: Path, target: Path) -> Path:
    """The base weights (hard links) with the chat-model tokenizer; published atomically."""
    import os
    import shutil

    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    with artifacts.staging(target) as tmp:
        for path in base.iterdir():
            if path.name in ("config.json", "generation_config.json") or path.suffix == ".safetensors":
                try:
                    os.link(path, tmp / path.name)
                except OSError:  # another file system
                    shutil.copy2(path, tmp / path.name)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
        tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tokenizer.bos_token_id)])
        tokenizer.pad_token = None
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(tmp)
        artifacts.publish(tmp, target, {"kind": "builtin-backbone", "variant": "chat", "base": base.name})
    return target


def _train_tokenizer(lines: list[str], spec: TinySpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    # Digits one by one: numbers stay compositional, which is what lets a tiny model learn to add.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size, special_tokens=[PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END_OF_TURN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   extra_special_tokens=[SYSTEM, USER, ASSISTANT, END_OF_TURN])


def _build(spec: TinySpec, out: Path) -> float:
    """Train the tokenizer and pretrain the model; save both into ``out``. Returns the final loss."""
    import torch
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    # Each line ends in EOS (a chat line in END_OF_TURN), so the base knows the token (a real pretrained
    # model does), but never right after an answer: stopping there is what SFT has to teach.
    streams = pretraining_lines(spec.max_operand, spec.seed, spec.steps * spec.batch_size, spec.equations_per_line)
    lines = [chat_stream(line) if n % spec.chat_every == spec.chat_every - 1 else line + EOS
             for n, line in enumerate(streams)]
    tokenizer = _train_tokenizer(lines[:20000], spec)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
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
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    print(ensure_builtin_backbone())


if __name__ == "__main__":
    main()
