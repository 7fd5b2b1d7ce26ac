"""Print the table `make reliability` ends with: the figures the reliability tests counted (a JSON file of
name -> count, tests/reliability_helpers.tally), grouped, and the tests that failed (each failure is a
traceback or a difference from an uninterrupted run, since every test asserts both).

Usage: python scripts/reliability_table.py COUNTS.json JUNIT.xml SECONDS
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET

GROUPS = [  # (heading, words that put a figure in it), first match wins
    ("fuzzed inputs per target (Hypothesis, seeded)", ("fuzzed",)),
    ("kills per stage (SIGKILL at seeded random points, then resumed)", ("kill", "SIGKILL")),
    ("object-store faults (moto server behind a fault injector)", ("object-store",)),
    ("concurrency", ("concurrent", "lock", "reads of a store", "partial-store")),
    ("disk full (a real size-limited tmpfs)", ("disk-full",)),
    ("signals, corruption, bad input, errors, safety", ("",)),
]


def main(counts_path: str, junit_path: str, seconds: str) -> int:
    counts = json.load(open(counts_path))
    suite = ET.parse(junit_path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    grouped: dict[str, list[tuple[str, int]]] = {}
    for name, n in sorted(counts.items()):
        heading = next(h for h, words in GROUPS if any(w in name for w in words))
        grouped.setdefault(heading, []).append((name, n))
    faults = sum(n for name, n in counts.items() if name.startswith("object-store faults injected"))
    print(f"\nreliability: {suite.get('tests')} tests in {float(seconds) / 60:.1f} min; what they counted:\n")
    print("| what | count |\n|---|---|")
    for heading, _ in GROUPS:
        if heading in grouped:
            print(f"| **{heading}** | |")
            for name, n in grouped[heading]:
                print(f"| {name} | {n:,} |")
    print(f"| **object-store faults injected, all kinds** | {faults:,} |")
    print(f"| **tests failed: a traceback or a difference from an uninterrupted run** | {failed} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
