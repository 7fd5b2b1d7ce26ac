"""Plug-ins from outside the package: an installed distribution adds an SAE method or an eval metric by
declaring an entry point, with no edit to atmpipe.

    [project.entry-points."atmpipe.methods"]
    density_l1 = "my_package.sae:DensityL1SAE"      # an atmpipe.sae.base.SAE subclass
    [project.entry-points."atmpipe.metrics"]
    decoder_norms = "my_package.metric:DecoderNorms"  # an atmpipe.eval.metric.Metric subclass

`atmpipe.sae` and `atmpipe.eval.metrics` add them to their registries beside the built-in ones, so the
command line, data-parallel training (each rank imports the registry) and the eval all see them. A plug-in
may not take a built-in's name. Keep a method and a metric in separate modules: a metric module is imported
when the command line starts (its options are flags), so it stays light, as `atmpipe.eval.metric` says.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from atmpipe.errors import UserError


def add_plugins(registry: dict[str, Any], group: str) -> None:
    """Add every installed entry point of `group` to `registry` (name → the object it names)."""
    for point in sorted(entry_points(group=group), key=lambda p: p.name):
        if point.name in registry:
            raise UserError(
                f"plug-in {point.value} takes the name {point.name!r} of a built-in ({group}); rename its entry point"
            )
        registry[point.name] = point.load()
