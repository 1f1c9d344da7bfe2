"""Engines behind one generate interface, prompts, the model registry, checkpoints on object storage,
and the sandbox for model-written code (docs/ARCHITECTURE.md, "Layers")."""
