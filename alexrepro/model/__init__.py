"""The paper's network, where it runs (devices and torch.distributed ranks), its checkpoints and inference."""
