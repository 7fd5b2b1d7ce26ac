"""`atmpipe eval`'s config: the run's own options, then every registered metric's (`atmpipe.eval.metric`),
each declared once in its metric's `Options` and turned into a flag by `atmpipe.options`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from atmpipe.eval.metric import Metric
from atmpipe.eval.metrics import REGISTRY
from atmpipe.options import device_option, option


@dataclass
class RunOptions:
    """The options of the run itself; each metric adds its own (`config_class`)."""

    sae: list[str] = option(help="SAE directory (atmpipe or SAELens format); repeat for several.")
    out: str = option("reports/eval", "Report directory.")
    store: str | None = option(None, "Activation store (default: the one the SAEs were trained on).")
    model: str | None = option(None, "Model (default: the SAEs' model).")
    layer: int | None = option(None, "Layer (default: the SAEs' layer).")
    metrics: str = option(",".join(REGISTRY), "Comma list of metrics.")
    device: str = device_option()
    dtype: str | None = option(
        None, "LM dtype: float32 | bfloat16 | float16 (default bfloat16 where the device has bf16 units)."
    )
    seed: int = option(0, "Seed of every sample and probe.")
    batch_size: int = option(16, "LM batch size (prompts).")
    # What ran, recorded in results.json: the recipe files in order and the flags given (config.load_recorded).
    recipe: list = field(default_factory=list)
    overrides: dict = field(default_factory=dict)


def config_class(registry: dict[str, type[Metric]] | None = None) -> type:
    """The eval config: the run's options, then every registered metric's (an option shared by two metrics,
    such as the text context of probing and bias, is declared once in a common base and appears once)."""
    fields: dict[str, dataclasses.Field] = {}
    for metric in (registry or REGISTRY).values():
        for f in dataclasses.fields(metric.Options):
            fields.setdefault(f.name, f)
    spec = [
        (
            f.name,
            f.type,
            field(default=f.default, default_factory=f.default_factory, metadata=f.metadata),
        )
        for f in fields.values()
    ]
    return dataclasses.make_dataclass("EvalConfig", spec, bases=(RunOptions,))


EvalConfig = config_class()
