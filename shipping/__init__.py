"""Shipping: self-contained bundles (pack / unpack / verify) and Triton model repositories.

numpy/json/tarfile only at import time: a target machine can verify and unpack a bundle
without torch, diffusers or onnxruntime.
"""
