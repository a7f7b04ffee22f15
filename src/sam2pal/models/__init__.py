"""SAM2 models: building them, the registry of checkpoints, downloads, LoRA adapters, GPU claims."""
