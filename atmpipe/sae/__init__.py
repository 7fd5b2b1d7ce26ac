"""SAE methods behind one interface (see base.py); add a method with one file and one registry line here, or
from outside the package with an `atmpipe.methods` entry point (atmpipe.plugins)."""

from atmpipe.plugins import add_plugins
from atmpipe.sae.atm import ATMSAE
from atmpipe.sae.base import SAE, SAE_METHODS, SAEConfig, TrainOutput, make_sae
from atmpipe.sae.jumprelu import JumpReLUSAE
from atmpipe.sae.matryoshka import MatryoshkaSAE
from atmpipe.sae.relu import ReLUSAE
from atmpipe.sae.topk import TopKSAE

SAE_METHODS.update(
    relu=ReLUSAE,
    topk=TopKSAE,
    jumprelu=JumpReLUSAE,
    atm=ATMSAE,
    matryoshka=MatryoshkaSAE,
)
add_plugins(SAE_METHODS, "atmpipe.methods")

__all__ = ["SAE", "SAE_METHODS", "SAEConfig", "TrainOutput", "make_sae"]
