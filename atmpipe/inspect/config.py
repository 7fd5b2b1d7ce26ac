"""`atmpipe inspect`'s options with their help text (light: the CLI reads the help without torch)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class InspectConfig:
    sae: list[str] = field(metadata={"help": "SAE directory; repeat it to compare SAEs side by side."})
    store: str | None = field(
        default=None, metadata={"help": "Activation store (default: the one the SAEs were trained on)."}
    )
    model: str | None = field(
        default=None, metadata={"help": "Model for tokens and logit effects (default: the SAEs')."}
    )
    latents: str | None = field(
        default=None, metadata={"help": "Comma list of latents to give pages, e.g. 12,407 (default: all)."}
    )
    top: int | None = field(default=None, metadata={"help": "Give pages to the N most often firing latents."})
    out: str = field(default="reports/inspect/features", metadata={"help": "Browser directory."})
    eval: str | None = field(
        default=None,
        metadata={"help": "An `atmpipe eval` results.json (default: the one beside --out, if any)."},
    )
    absorption: bool = field(
        default=False, metadata={"help": "Compute the absorption view (LM on the first-letter prompts)."}
    )
    absorption_config: str | None = field(
        default=None,
        metadata={"help": "An eval recipe whose absorption settings (word sample, ICL) --absorption uses."},
    )
    text: str | None = field(
        default=None,
        metadata={
            "help": "A text file (paragraphs split by blank lines): run through the LM, shown token by token."
        },
    )
    serve: bool = field(
        default=False,
        metadata={
            "help": "After the build, serve the browser on 127.0.0.1 with a live text box (Ctrl-C stops)."
        },
    )
    port: int = field(default=8000, metadata={"help": "Port for --serve (0: any free port)."})
    max_tokens: int = field(default=65536, metadata={"help": "Held-out tokens to read (default 65,536)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random contexts and the absorption task."})
