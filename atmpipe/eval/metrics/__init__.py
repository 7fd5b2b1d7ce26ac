"""The eval metrics, one plug-in module each (the shape is described in `atmpipe.eval.metric`).

REGISTRY lists them in report order, one line per metric: adding a metric is one module and one line here,
or, from outside the package, an `atmpipe.metrics` entry point (atmpipe.plugins; listed after these).
"""

from __future__ import annotations

from atmpipe.eval.metric import Metric
from atmpipe.eval.metrics.absorption import Absorption
from atmpipe.eval.metrics.bias import Bias
from atmpipe.eval.metrics.core import Core
from atmpipe.eval.metrics.masking import Masking
from atmpipe.eval.metrics.probing import Probing
from atmpipe.eval.metrics.tpp import Tpp
from atmpipe.eval.metrics.training import Training
from atmpipe.plugins import add_plugins

REGISTRY: dict[str, type[Metric]] = {
    "core": Core,
    "absorption": Absorption,
    "probing": Probing,
    "bias": Bias,
    "tpp": Tpp,
    "training": Training,
    "masking": Masking,  # after absorption: it reads absorption's main latents
}
add_plugins(REGISTRY, "atmpipe.metrics")
