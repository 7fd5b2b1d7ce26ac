"""How many LM tokens the probing, SCR and TPP caches cost at given sizes (the tokenizer only, no forward).

    .venv/bin/python benchmarks/probing_tokens.py --train 1000 --test 1000 --context 128

Also prints each SCR pair's split sizes. The cache is built once per model and layer; every SAE then encodes these tokens (probing and TPP) or
reads one per text (SCR). Divide by a measured LM rate for the cache-build time.
"""

from __future__ import annotations

import argparse

from atmpipe.eval import data
from atmpipe.eval.compute.bias import BiasConfig, scr_dataset, usable_pairs
from atmpipe.lm import load_lm


def tokens(tok, texts: list[str], context: int) -> int:
    return int(sum(len(ids) for ids in tok(texts, truncation=True, max_length=context)["input_ids"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--tpp-train", type=int, default=500)
    ap.add_argument("--tpp-test", type=int, default=250)
    a = ap.parse_args()
    tok = load_lm("gemma-3-270m").tokenizer
    per_group: dict[str, int] = {}
    for task in data.TASKS.values():
        sp = data.task_split(task, a.train, a.test, 0)
        n = tokens(tok, sp["train_texts"] + sp["test_texts"], a.context)
        per_group[task.group] = per_group.get(task.group, 0) + n
    tpp = sum(
        tokens(tok, sp["train_texts"] + sp["test_texts"], a.context)
        for sp in (data.class_split(cs, a.tpp_train, a.tpp_test, 0) for cs in data.CLASS_SETS.values())
    )
    cfg = BiasConfig()
    table = data.occupation_gender_table()
    for a_, b_ in usable_pairs(table, data.OCCUPATIONS, 20):
        c = scr_dataset(table, BiasConfig(occupation_a=a_, occupation_b=b_))["construction"]
        print(f"SCR pair {a_}/{b_}: test {c['n_test']}, balanced train {c['n_balanced_train']}, "
              f"biased train {c['n_biased_train']} people")  # fmt: skip
    scr = tokens(tok, [str(t)[-cfg.tail_chars :] for t in table.prompt], cfg.context)
    print(f"probing tokens per family: {per_group}")
    probing = sum(per_group.values())
    print(f"probing {probing}, tpp {tpp}, scr {scr} ({len(table)} people), total {probing + tpp + scr}")


if __name__ == "__main__":
    main()
