"""Interoperability with other tools' checkpoint formats (compressed-tensors)."""
