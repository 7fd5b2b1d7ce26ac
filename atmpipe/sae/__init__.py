"""SAE methods behind one interface (see base.py); add a method with one file and one registry line."""

from atmpipe.errors import UserError
from atmpipe.sae.atm import ATMSAE
from atmpipe.sae.base import SAE, SAEConfig, TrainOutput
from atmpipe.sae.jumprelu import JumpReLUSAE
from atmpipe.sae.matryoshka import MatryoshkaSAE
from atmpipe.sae.relu import ReLUSAE
from atmpipe.sae.topk import TopKSAE

SAE_METHODS: dict[str, type[SAE]] = {
    "relu": ReLUSAE,
    "topk": TopKSAE,
    "jumprelu": JumpReLUSAE,
    "atm": ATMSAE,
    "matryoshka": MatryoshkaSAE,
}


def make_sae(cfg: SAEConfig) -> SAE:
    if cfg.method not in SAE_METHODS:
        raise UserError(f"unknown method {cfg.method!r}; known methods: {', '.join(sorted(SAE_METHODS))}")
    return SAE_METHODS[cfg.method](cfg)


__all__ = ["SAE", "SAE_METHODS", "SAEConfig", "TrainOutput", "make_sae"]
