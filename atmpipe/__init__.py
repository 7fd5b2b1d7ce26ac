"""atmpipe: harvest LM residual streams into Zarr, train ATM / TopK / JumpReLU / ReLU SAEs, evaluate them."""

__version__ = "0.1.0"
