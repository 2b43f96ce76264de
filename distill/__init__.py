"""Knowledge distillation: a teacher causal LM becomes a compact student (see distill/cli.py)."""
