"""The image loop in numpy: tokenize, schedulers/, the denoising loop (loop.py), tiled VAE decode and
open_pipeline (pipeline.py). No torch, no diffusers."""
