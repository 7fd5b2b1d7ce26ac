"""Training curves: what each SAE's run logged while it trained (`metrics.jsonl` in its run directory, one
JSON object per logged step, written by `atmpipe train`), plotted for all SAEs side by side.

Nothing is recomputed: results.json holds the logged values themselves, at most `--training-max-points`
evenly spaced records per SAE (the first and the last always kept).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atmpipe.errors import UserError
from atmpipe.eval.metric import Metric, option

LOG_FILE = "metrics.jsonl"  # atmpipe.train.METRICS
# The total and the loss terms the methods log (sae/*.py), each under its own name.
LOSS_KEYS = ("loss", "mse", "l1", "sparsity", "aux")
SPARSITY_KEYS = ("fvu", "l0", "dead")
ATM_KEYS = ("masked_frac", "threshold")  # ATM's mean mask probability and its threshold θ
LABELS = {
    "loss": "total loss",
    "mse": "reconstruction (MSE)",
    "l1": "L1 penalty",
    "sparsity": "sparsity term (JumpReLU)",
    "aux": "AuxK loss",
    "fvu": "FVU",
    "l0": "L0",
    "dead": "dead latents",
    "masked_frac": "masked fraction (mean p)",
    "threshold": "threshold θ",
}


@dataclass
class TrainingOptions:
    training_max_points: int = option(
        1000, "Most records per SAE's training curves kept in results.json (evenly spaced)."
    )


class Training(Metric):
    name = "training"
    Options = TrainingOptions

    def check(self) -> None:
        if self.opts.training_max_points < 2:
            raise UserError(
                f"--training-max-points must be at least 2 (got {self.opts.training_max_points}); "
                "pass e.g. --training-max-points 1000"
            )

    def prepare(self, ctx) -> None:
        """Every SAE's log is read before the model loads: a broken line fails the eval at once."""
        self.logs = {s.name: read_log(s.path / LOG_FILE) for s in ctx.saes if (s.path / LOG_FILE).is_file()}

    def compute(self, ctx, sae) -> dict | None:
        records = self.logs.get(sae.name)
        if not records:
            return None
        keep = np.unique(np.linspace(0, len(records) - 1, self.opts.training_max_points).round().astype(int))
        kept = [records[i] for i in keep]
        keys = dict.fromkeys(k for r in records for k in r if k != "step" and is_number(r[k]))
        return {
            "log": str(sae.path / LOG_FILE),
            "method": sae.info["method"],
            "records": len(records),
            "last": records[-1],
            "curves": {"step": [r["step"] for r in kept], **{k: [r.get(k) for r in kept] for k in keys}},
        }

    def blocks(self, names, results, shared) -> list[tuple]:
        curves = {n: results[n]["training"]["curves"] for n in names if results[n].get("training")}
        missing = [n for n in names if n not in curves]
        blocks: list[tuple] = [("h2", "Training curves")]
        if missing:
            blocks.append(
                ("p", f"No training log ({LOG_FILE}) beside {', '.join(missing)}: trained elsewhere or "
                      "converted, so no curves.")
            )  # fmt: skip
        if not curves:
            return blocks
        note = (
            "As logged by `atmpipe train`, against training tokens; losses on a log scale where all positive."
        )
        blocks.append(("p", note))
        atm = {n: c for n, c in curves.items() if results[n]["training"]["method"] == "atm"}
        colors = {n: f"C{i}" for i, n in enumerate(curves)}  # one colour per SAE in every figure
        for file, keys, title, subset in (
            ("training_losses.png", LOSS_KEYS, "Loss terms", curves),
            ("training_sparsity.png", SPARSITY_KEYS, "Reconstruction, sparsity and dead latents", curves),
            ("training_atm.png", ATM_KEYS, "ATM masking", atm),
        ):
            present = [k for k in keys if any(k in c for c in subset.values())]
            if present:
                png = curve_panels(subset, present, title, colors, log_scale=keys is LOSS_KEYS)
                blocks.append(("img", file, f"training curves: {title}", png))
        header = [
            "SAE",
            "records",
            "step",
            "tokens",
            *[LABELS[k] for k in (*LOSS_KEYS, *SPARSITY_KEYS, *ATM_KEYS)],
        ]
        rows = [last_row(n, results[n]["training"]) for n in curves]
        blocks.append(("table", header, rows))
        return blocks


def read_log(file: Path) -> list[dict]:
    records = []
    for i, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            record = e.msg
        if not isinstance(record, dict) or not is_number(record.get("step")):
            raise UserError(
                f"training log {file} line {i} is not a logged step ({str(record)[:60]}); "
                "remove that line, or drop 'training' from --metrics"
            )
        records.append(record)
    return records


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def last_row(name: str, section: dict) -> list[str]:
    from atmpipe.eval.report import fmt  # lazy (eval/metric.py)

    last = section["last"]
    keys = (*LOSS_KEYS, *SPARSITY_KEYS, *ATM_KEYS)
    return [
        name,
        str(section["records"]),
        fmt(last["step"]),
        fmt(last.get("tokens")),
        *[fmt(last.get(k)) for k in keys],
    ]


def curve_panels(
    curves: dict[str, dict], keys: list[str], title: str, colors: dict, log_scale: bool
) -> bytes:
    """One panel per key, one line per SAE, against training tokens (steps when tokens were not logged)."""
    from atmpipe.eval.report import FIG_SIZE, plt, png  # lazy (eval/metric.py)

    fig, axes = plt.subplots(1, len(keys), figsize=FIG_SIZE, squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        values = []
        for name, c in curves.items():
            if key not in c:
                continue
            x = c.get("tokens", c["step"])
            pts = [(a, b) for a, b in zip(x, c[key], strict=True) if b is not None]
            ax.plot([a for a, _ in pts], [b for _, b in pts], label=name, color=colors[name])
            values += [b for _, b in pts]
        if log_scale and values and min(values) > 0:
            ax.set_yscale("log")
        ax.set_title(LABELS.get(key, key), fontsize=10)
        ax.set_xlabel("tokens", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return png(fig)
