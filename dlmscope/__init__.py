"""dlmscope: fast Top-K sparse-autoencoder interpretability for diffusion language models."""
from . import reference
from .ops import available_backends, decoder_norm_step, set_value_checks, sparse_decode, topk_encode, value_checks

__version__ = "0.1.0"
__all__ = [
    "topk_encode",
    "sparse_decode",
    "decoder_norm_step",
    "available_backends",
    "set_value_checks",
    "value_checks",
    "reference",
]
