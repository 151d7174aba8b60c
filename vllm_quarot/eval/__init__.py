"""Evaluation: the pure-PyTorch simulation of a checkpoint (the reference vLLM is tested
against), perplexity through vLLM or transformers, activation statistics."""
