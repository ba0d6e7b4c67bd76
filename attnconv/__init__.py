"""attnconv: a convolutional layer is a restricted self-attention layer.

Executable form of Cordonnier, Loukas & Jaggi, "On the Relationship between
Self-Attention and Convolutional Layers" (ICLR 2020).
"""

__version__ = "0.1.0"
