"""The chain's stages, one folder each (``sft``, ``reward``, ``rrhf``, ``ppo``, ``dpo``, ``grpo``: a torch-free
``spec.py`` and a ``recipe.py``), found by ``registry``, built on the shared floors ``training``,
``model``, ``objectives``, ``memory`` and ``io``; ``tools`` runs beside the CLI (docs/architecture.md)."""
