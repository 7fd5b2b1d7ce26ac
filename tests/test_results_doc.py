"""docs/results.md's experiment section cannot drift from results/gemma-3-270m-l9/results.json: its tables are
the block stages/results_doc.py generates, and every other decimal in the section is a number of results.json
(a stored value, or a comparison's difference or bound) rounded once to the digits shown, or a paper's number."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "stages"))
import results_doc  # noqa: E402

RESULTS = REPO / "results" / "gemma-3-270m-l9"
DOC = REPO / "docs" / "results.md"
SECTION = "## The experiment: `make reproduce`"
DECIMAL = re.compile(r"(?<![\w.])([+−-]?)(\d+\.\d+)(?![\d%]|\.\d| h\b| min\b| s\b|×)")


def section() -> str:
    text = DOC.read_text()
    return text[text.index(SECTION) :]


def leaves(value) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in leaves(v)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    if isinstance(value, str):  # the paper's numbers are stored as text ("ATM 0.5508")
        return [float(x) for x in re.findall(r"\d+\.\d+", value)]
    return []


def test_the_generated_block_is_what_results_json_gives():
    assert results_doc.block(RESULTS) in DOC.read_text()


def unmatched(prose: str, values: list[float]) -> tuple[list[str], int]:
    """The decimals of `prose` that no value rounds to at the digits shown, and how many were checked."""
    found = DECIMAL.findall(prose)
    missing = []
    for sign, digits in found:
        shown = float(digits) * (-1 if sign in ("−", "-") else 1)
        places = len(digits.split(".")[1])
        if not any(round(v, places) == round(shown, places) for v in values):
            missing.append(sign + digits)
    return missing, len(found)


def results_values() -> list[float]:
    """The numbers the section may quote: per series and level, the verdict's metrics, L0 and the masking
    diagnostics (mean, sd, word CI); the comparisons' differences and bounds; the paper's numbers."""
    payload = json.loads((RESULTS / "results.json").read_text())
    quoted = {"core.l0", "core.fvu", "core.ce_loss_score", results_doc.FULL, results_doc.FRAC}
    values = leaves(payload["paper_gemma_2_2b"])
    for levels in payload["summary"].values():
        for cell in levels.values():
            for k, m in cell["metrics"].items():
                if k in quoted or k.startswith("masking."):
                    values += (
                        [m["mean"]] + ([m["sd"]] if m["sd"] is not None else []) + cell["ci95"].get(k, [])
                    )
    for r in payload["comparisons"]:
        values += [r["diff"]] + (r["ci95"] or [])
    return values


def test_every_other_decimal_of_the_section_is_a_number_of_results_json_rounded_once():
    text = section()
    start, end = text.index(results_doc.BEGIN), text.index(results_doc.END)
    prose = text[:start] + text[end:]
    prose = prose[
        : prose.index("**Convergence")
    ]  # the plan's figures are the budget's (stages/reproduce-budget.json)
    missing, checked = unmatched(prose, results_values())
    assert missing == [] and checked > 80


def test_the_check_catches_the_double_rounded_numbers_it_replaced():
    values = results_values()
    # the old text's ATM fraction CI and ATM − TopK full-absorption bound, rounded twice; the stored ones
    assert unmatched("[0.036, 0.053], [−0.43, −0.19]", values)[0] == ["0.036", "−0.43"]
    assert unmatched("[0.035, 0.053], 0.227", values)[0] == []


def test_the_demo_table_says_its_absorption_is_not_reproducible(tmp_path, capsys):
    import experiment

    results = {
        "atm": {"core": {"l0": 64.0, "fvu": 0.2}, "absorption": {"status": "ok", "mean_full_absorption": 0.1}}
    }
    (tmp_path / "results.json").write_text(json.dumps({"results": results}))
    experiment.table(tmp_path)
    assert experiment.DEMO_ABSORPTION not in capsys.readouterr().out  # not a demo: no such line
    (tmp_path / "report.md").write_text("# r\n")
    (tmp_path / "report.html").write_text("<body></body>")
    experiment.label_demo(tmp_path)
    experiment.table(tmp_path)
    assert capsys.readouterr().out.rstrip().endswith(experiment.DEMO_ABSORPTION)


def test_the_block_carries_matryoshka_probing_bias_and_the_claims_where_results_json_has_them(tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    import frontier
    from test_verdict import SCR_MDD, claim_results

    payload = frontier.write(claim_results(tmp_path))
    text = results_doc.block(tmp_path)
    assert "(absorption at 3 eval seeds each, the other metrics at one)" in text
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert "| matryoshka (BatchTopK, nested prefixes)" in rows
    atm = payload["summary"]["atm"]["64"]
    k1 = atm["metrics"]["probing.mean_sae_top_1"]
    lo, hi = atm["ci95"]["probing.mean_sae_top_1"]
    probing_row = next(
        line for line in text.splitlines() if line.startswith("| atm | ") and "unresolved" in line
    )
    assert f"{k1['mean']:.3f} ± {k1['sd']:.2g} [{lo:.3f}, {hi:.3f}]" in probing_row
    assert f"unresolved (MDD {SCR_MDD:.2f})" in probing_row  # SCR: its MDD, never its score
    assert "The frontier" not in text  # no other level here: no frontier table
    for claim in ("probing", "sentiment", "bias"):
        assert f"- {payload['claims'][claim]['claim']}: {payload['claims'][claim]['answer']}" in text
