"""The ppo stage: ``spec.py`` declares it (torch-free), ``recipe.py`` trains it."""
