"""The K2 / DeepSeek-V3 network in flax.linen."""

from k2jax.model.transformer import (
    Transformer,
    abstract_variables,
    init_variables,
    logical_axes,
)

__all__ = ["Transformer", "abstract_variables", "init_variables", "logical_axes"]
