"""The schedulers of the numpy sampler, one file per scheduler as diffusers has one per class."""
