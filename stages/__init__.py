"""The chain's stages: one recipe module each (``sft``, ``reward``, ``rrhf``, ``ppo``), declared in
``registry``, built from the shared pieces in ``model``, ``objectives``, ``training``, ``io`` and ``memory``."""
