"""Commands the CLI runs in a process of their own (its process never imports torch): the check of the
tokenization contract on the data (``contract_check``), ``rlhf inspect`` (``explain``) and ``rlhf export``
(``export``). They sit above the recipes: they read the backbone and the stages' own budgets and heads.

None of them computes with bitsandbytes' 4-bit kernels (export dequantizes QLoRA weights once), so the
library's hint about its optional CPU kernels is dropped before their imports load it."""

from stages.io.noise import silence_known_noise

silence_known_noise(quantized=False)
