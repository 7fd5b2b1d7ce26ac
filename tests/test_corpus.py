"""corpus.py: the embedded corpus, local sources, packing into BOS-led windows, held-out eval documents."""

import json

import numpy as np
import pytest

from atmpipe.corpus import Document, build_corpus, embedded_documents, load_documents
from atmpipe.errors import UserError

BOS = 2


class DocTokenizer:
    """Maps the text "d<k> x <n>" to n copies of token 10+k, so every token tells its document."""

    def __init__(self):
        self.calls = 0
        self.tokenised = 0

    def __call__(self, texts, add_special_tokens=True):
        assert add_special_tokens is False
        self.calls += 1
        self.tokenised += len(texts)
        ids = []
        for t in texts:
            k, n = t.split(" x ")
            ids.append([10 + int(k[1:])] * int(n))
        return {"input_ids": ids}


def _docs(n=200, seed=0):
    lengths = np.random.default_rng(seed).integers(1, 40, n)
    return [Document(f"doc{k}", f"d{k} x {lengths[k]}") for k in range(n)]


def _build(docs, tok=None, **kw):
    args = dict(context_size=16, train_tokens=16 * 40, eval_tokens=16 * 10, seed=3, documents=docs)
    return build_corpus(tok or DocTokenizer(), BOS, **{**args, **kw})


def test_windows_start_with_bos_and_pack_documents_in_order():
    docs = _docs()
    c = _build(docs)
    assert c.train.shape == (40, 16) and c.eval.shape == (10, 16) and c.train.dtype == np.int32
    assert (c.train[:, 0] == BOS).all() and (c.eval[:, 0] == BOS).all()
    # The eval split (not shuffled) is the BOS-separated stream of its documents, cut into pieces of 15.
    stream = []
    for doc_id in c.eval_documents:
        k = int(doc_id[3:])
        stream += [BOS] + [10 + k] * int(docs[k].text.split(" x ")[1])
    assert c.eval[:, 1:].ravel().tolist() == stream[: 10 * 15]


def test_eval_documents_are_held_out_and_recorded():
    docs = _docs()
    c = _build(docs)
    eval_docs = {int(t) - 10 for t in np.unique(c.eval) if t != BOS}
    train_docs = {int(t) - 10 for t in np.unique(c.train) if t != BOS}
    assert eval_docs.isdisjoint(train_docs)
    assert {f"doc{k}" for k in eval_docs} <= set(c.eval_documents)
    assert len(c.eval_documents) == len(eval_docs)  # every recorded document contributes
    prov = c.provenance()
    assert prov["eval_documents"] == c.eval_documents and prov["n_documents"] == 200
    assert prov["train_documents_used"] == len(train_docs)


def test_deterministic_from_seed():
    a, b, other = _build(_docs()), _build(_docs()), _build(_docs(), seed=4)
    assert np.array_equal(a.train, b.train) and a.eval_documents == b.eval_documents
    assert a.provenance() == b.provenance()
    assert not np.array_equal(a.train, other.train) and a.eval_documents != other.eval_documents


def test_tokenises_only_what_it_needs():
    tok = DocTokenizer()
    _build(_docs(5000), tok, train_tokens=16 * 5, eval_tokens=16)
    assert tok.tokenised <= 64 * 2  # one or two tokenizer batches, not 5000 documents


def test_corpus_smaller_than_asked_is_noted():
    c = _build(_docs(20), train_tokens=16 * 1000, eval_tokens=16)
    assert 0 < len(c.train) < 1000
    assert "the corpus ran out" in c.notes[0]


def test_bad_inputs():
    with pytest.raises(UserError, match="context size must be at least 2"):
        _build(_docs(), context_size=1)
    with pytest.raises(UserError, match="yields no training window of 16 tokens"):
        _build(_docs(3, seed=1), eval_tokens=16 * 100)
    with pytest.raises(UserError, match="dataset path /nonexistent does not exist"):
        build_corpus(
            DocTokenizer(), BOS, context_size=16, train_tokens=64, eval_tokens=0, seed=0, spec="/nonexistent"
        )


def test_local_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": f"text {i}", "n": i}) for i in range(5)))
    docs = load_documents(str(tmp_path / "a.jsonl"), text_column="body")
    assert [d.text for d in docs] == [f"text {i}" for i in range(5)]
    with pytest.raises(UserError, match=r"has no column 'text' \(it has body, n\); pass --text-column"):
        load_documents(str(tmp_path / "a.jsonl"))
    (tmp_path / "b.txt").write_text("First paragraph.\nstill first.\n\nSecond paragraph.\n\n\n")
    assert [d.text.strip() for d in load_documents(str(tmp_path / "b.txt"))] == [
        "First paragraph.\nstill first.",
        "Second paragraph.",
    ]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UserError, match="has no text"):
        load_documents(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(UserError, match="cannot read the corpus at"):
        load_documents(str(tmp_path / "bad.parquet"))
    with pytest.raises(UserError, match="dataset path ./missing.jsonl does not exist"):
        load_documents("./missing.jsonl")


def test_hub_dataset_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="cannot reach the Hugging Face hub to load dataset 'wikitext'"):
        load_documents("wikitext")


def test_embedded_corpus_is_real_merged_and_deduplicated():
    docs = embedded_documents()
    sources = {}
    for d in docs:
        sources.setdefault(d.id.split(":")[0], []).append(d)
    assert sorted(sources) == ["bbc", "sae-probes", "wiki"]
    assert len(sources["wiki"]) == 10033 and len(sources["bbc"]) > 2000 and len(sources["sae-probes"]) > 10000
    assert len({d.id for d in docs}) == len(docs) == len({d.text for d in docs})
    assert [d.id for d in docs[:2]] == [d.id for d in embedded_documents()[:2]]
    agnews = [d.text for d in sources["sae-probes"] if "agnews" in d.id]
    assert agnews and not any("GNU General Public License" in t for t in agnews)  # news only, no code


def test_real_tokenizer_packing(tiny_checkpoints):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoints["gemma3"])
    c = build_corpus(tok, tok.bos_token_id, context_size=32, train_tokens=32 * 20, eval_tokens=32 * 4, seed=0)
    assert c.train.shape == (20, 32) and c.eval.shape == (4, 32)
    assert (c.train[:, 0] == tok.bos_token_id).all()
    assert c.eval_documents and all(":" in d for d in c.eval_documents)
