"""The built-in backbones' specification and where their builds live, torch-free.

The flow needs the build's folder (its fingerprint is in every cache key) without importing the code
that trains it (``stages.model.builtin_backbone``, which builds it on first use: ``rlhf build-backbone``,
and the pre-flight of ``rlhf run``). The folder is named by the digest of ``TinySpec``, this file, the
build code and the corpus generator, so any edit to how the backbone is made names a new build.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from stages.io import paths
from stages.io.arithmetic import Problem, pretraining_lines

BUILD_CODE = Path(__file__).parents[1] / "model" / "builtin_backbone.py"

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
        # This spec, the build (read as text, never imported: this module is torch-free) and the corpus
        # generator: editing the rest of stages/io/arithmetic.py keeps the cached build.
        source = "".join(path.read_text() for path in (Path(__file__), BUILD_CODE))
        source += inspect.getsource(pretraining_lines) + inspect.getsource(Problem)
        payload = (json.dumps(asdict(self), sort_keys=True) + source).encode()
        return hashlib.sha256(payload).hexdigest()[:16]


def builtin_dir(spec: TinySpec = TinySpec(), chat: bool = False) -> Path:
    """The folder of the build of ``spec`` (``chat``: its chat-tokenizer variant), built or not."""
    return paths.rlhf_home() / "backbones" / f"builtin-tiny{'-chat' if chat else ''}-{spec.digest()}"
