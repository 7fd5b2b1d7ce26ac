"""The shape of an eval metric. Each metric is one module in `atmpipe/eval/metrics/` holding one `Metric`
subclass, listed by one line in `atmpipe.eval.metrics.REGISTRY`; `run_eval` and the report loop over it.

A metric declares:
- `name`: its `--metrics` name and its key in results.json (`results[sae][name]`);
- `Options`: a dataclass of its settings; every field (default and `metadata["help"]`) is an `atmpipe eval`
  flag and a key of an eval recipe, so each option is written once;
- `needs`: what the run must open for it, `"store"` (the activation store) and/or `"lm"` (the model);
- `rows`: its lines in the report's side-by-side table, `(label, results key, paper key or None)`;
- `paper`: the paper's own numbers (Gemma-2-2b, SAEBench) for those rows, by paper key, shown beside ours
  and never mixed with them.

and, called in this order by the run (all optional but `compute` and `blocks`):
1. `check()`: the options alone, before any file is opened;
2. `prepare(ctx)`: cheap reads (labelled datasets, logs) before the model is loaded, so bad input fails fast;
3. `collect(ctx)`: the LM-side inputs, once per run (cached per model and layer through `ctx.cached`);
   run-wide numbers go into `ctx.shared` (results.json's `shared`);
4. `compute(ctx, sae)`: one SAE's results, a JSON-able dict (None: nothing to record for this SAE);
5. `blocks(names, results, shared)`: its section of the report, a list of blocks (`("h2", text)`,
   `("p", text)`, `("table", header, rows)`, `("img", file name, caption, png bytes)`).

`atmpipe` builds its eval flags from the metric modules at start-up, so a metric module imports its
computations (torch, sklearn, the LM) inside the methods that use them, never at the top.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from atmpipe.options import option  # noqa: F401  (a metric option is any config option)


@dataclass
class NoOptions:
    """The options of a metric that has none."""


class Metric:
    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    needs: ClassVar[frozenset[str]] = frozenset()
    rows: ClassVar[list[tuple[str, str, str | None]]] = []
    paper: ClassVar[dict[str, str]] = {}

    def __init__(self, opts):
        self.opts = opts

    @classmethod
    def from_config(cls, config) -> Metric:
        """The metric with its options read from an eval config (dataclass or dict); missing keys default."""
        return cls(options_from(cls.Options, config))

    def check(self) -> None:
        pass

    def prepare(self, ctx) -> None:
        pass

    def collect(self, ctx) -> None:
        pass

    def compute(self, ctx, sae) -> dict | None:
        raise NotImplementedError

    def blocks(self, names: list[str], results: dict, shared: dict) -> list[tuple]:
        raise NotImplementedError


def paper_values(metrics) -> dict[str, str]:
    """The paper's own numbers that `metrics` (Metric classes or instances) carry, by paper key."""
    return {key: value for m in metrics for key, value in m.paper.items()}


def options_from(options_cls: type, config) -> Any:
    get = config.get if isinstance(config, dict) else lambda k, d: getattr(config, k, d)
    fields = dataclasses.fields(options_cls)
    return options_cls(**{f.name: get(f.name, f.default) for f in fields})
