"""Evaluation: sampling and generation, perplexity, in-context learning, lm-eval harness."""
