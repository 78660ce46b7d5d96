"""Activations from a language model: ``noise`` (the paper's corruption process), ``activations`` (harvesting under
a mask policy, truncated forward), ``cache`` (the on-disk activation cache), ``shuffle`` (the shuffle buffer),
``ranks`` (each data rank's slice under torchrun), ``text`` (text sources: files and Hugging Face datasets)."""
