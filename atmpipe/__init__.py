"""atmpipe: harvest LM residual streams into Zarr, train SAEs (ATM and its baselines), evaluate and browse them."""

__version__ = "0.1.0"
