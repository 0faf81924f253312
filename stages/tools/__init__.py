"""Commands the CLI runs in a process of their own (its process never imports torch): the check of the
tokenization contract on the data (``contract_check``), ``rlhf inspect`` (``explain``) and ``rlhf export``
(``export``). They sit above the recipes: they read the backbone and the stages' own budgets and heads."""
