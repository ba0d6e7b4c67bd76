"""Experiments: the trainer, configs, evaluation and plots (forkable; depends on attnconv)."""
