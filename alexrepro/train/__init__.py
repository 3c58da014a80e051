"""The `train` stage: its config (importable without torch) and the loop (the paper's SGD recipe, §5)."""
