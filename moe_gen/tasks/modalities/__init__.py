"""Per-modality preprocessing (raw value → token ids or tensors).

So far: text normalisation, span masking and noise (``text``); box quantisation to location
tokens (``box``). The modality registry with adapters comes with the task plans (issue 3).
"""
