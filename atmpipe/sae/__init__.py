"""SAE methods behind one interface (see base.py); add a method with one file and one registry line."""

from atmpipe.sae.atm import ATMSAE
from atmpipe.sae.base import SAE, SAE_METHODS, SAEConfig, TrainOutput, make_sae
from atmpipe.sae.jumprelu import JumpReLUSAE
from atmpipe.sae.relu import ReLUSAE
from atmpipe.sae.topk import TopKSAE

SAE_METHODS.update(
    relu=ReLUSAE,
    topk=TopKSAE,
    jumprelu=JumpReLUSAE,
    atm=ATMSAE,
)

__all__ = ["SAE", "SAE_METHODS", "SAEConfig", "TrainOutput", "make_sae"]
