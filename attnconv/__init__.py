"""attnconv: a convolutional layer is a restricted self-attention layer.

Executable form of Cordonnier, Loukas & Jaggi, "On the Relationship between Self-Attention and
Convolutional Layers" (ICLR 2020): relative-position self-attention (:mod:`attnconv.encodings`,
:mod:`attnconv.attention`, :mod:`attnconv.layers`), the Theorem-1 construction
(:mod:`attnconv.construction`) and its finite-alpha error bound (:mod:`attnconv.bounds`).
"""

from attnconv.bounds import alpha_for_tolerance, softmax_emulation_error_bound
from attnconv.construction import (
  attention_to_conv,
  conv_to_attention,
  convolutions_as_attention,
)
from attnconv.layers import MultiHeadRelativeAttention

__version__ = "0.2.0"

__all__ = [
  "MultiHeadRelativeAttention",
  "alpha_for_tolerance",
  "softmax_emulation_error_bound",
  "attention_to_conv",
  "conv_to_attention",
  "convolutions_as_attention",
]
