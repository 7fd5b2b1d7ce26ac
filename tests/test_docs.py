"""The docs name only what exists: every flag, repository file and atmpipe function or class that README.md,
docs/*.md and benchmarks/README.md name (in backticks, or as a --flag anywhere) is checked against the tree.
A rename that leaves a doc behind fails here."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
from collections import defaultdict
from pathlib import Path

import typer

from atmpipe.cli import app
from atmpipe.sae import SAE_METHODS

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
# Flags of other programs the docs show: torchrun's and pip's.
OTHER_FLAGS = {"--help", "--nproc-per-node", "--nnodes", "--rdzv-endpoint", "--index-url"}
# Output files and directories (what a run writes) are named in the docs without existing in the tree.
OUTPUT_SUFFIXES = (".json", ".jsonl", ".md", ".html", ".safetensors", ".zarr", ".png", ".csv")
SOURCE_DIRS = ("atmpipe/", "stages/", "docs/", "benchmarks/", "tests/", "scripts/")


def backticked(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


def known_flags() -> set[str]:
    """atmpipe's flags, the methods' hyper-parameters (each a flag of `atmpipe train`), and the flags of the
    scripts in benchmarks/, stages/ and scripts/."""
    command = typer.main.get_command(app)
    flags = {opt for sub in command.commands.values() for p in sub.params for opt in p.opts}
    flags |= {
        "--" + f.name.replace("_", "-") for m in SAE_METHODS.values() for f in dataclasses.fields(m.Params)
    }
    for path in [*REPO.glob("benchmarks/*"), *REPO.glob("stages/*"), *REPO.glob("scripts/*")]:
        if path.suffix in (".py", ".sh"):
            flags |= set(re.findall(r"""["'(|\s](--[a-z][a-z0-9-]*)""", path.read_text()))
    return flags


def test_every_flag_the_docs_name_exists():
    flags = known_flags() | OTHER_FLAGS
    missing = {
        (str(doc.relative_to(REPO)), flag)
        for doc in DOCS
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", doc.read_text())
        if flag not in flags
    }
    assert missing == set()


def test_every_file_the_docs_name_exists():
    """A source path (under atmpipe/, stages/, docs/, ...) or a .py/.toml/.sh file: relative to the
    repository, to the doc, or to atmpipe/ (`eval/compute/core.py`); a bare file name anywhere in the tree."""
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=REPO, check=True)
    names = {Path(p).name for p in tracked.stdout.split()}
    missing = set()
    for doc in DOCS:
        for token in backticked(doc.read_text()):
            path = token.split("::")[0].split(":")[0].rstrip("/")
            if " " in path or any(c in path for c in "*{}<>$[]()") or "/." in path:  # patterns, work dirs
                continue
            if not (path.startswith(SOURCE_DIRS) or re.fullmatch(r"[\w./-]+\.(py|toml|sh)", path)):
                continue
            if path.endswith(OUTPUT_SUFFIXES) and not path.startswith(SOURCE_DIRS):
                continue
            here = (REPO / path, doc.parent / path, REPO / "atmpipe" / path)
            if not any(p.exists() for p in here) and not ("/" not in path and path in names):
                missing.add((str(doc.relative_to(REPO)), path))
    assert missing == set()


def python_names() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Module (dotted, without and with `atmpipe.`, and its short name) → its top-level names and its
    classes' members; class → its members (methods, class attributes, attributes set on self)."""
    modules: dict[str, set[str]] = defaultdict(set)
    classes: dict[str, set[str]] = defaultdict(set)
    for path in [*REPO.glob("atmpipe/**/*.py"), *REPO.glob("benchmarks/*.py"), *REPO.glob("stages/*.py")]:
        tree = ast.parse(path.read_text())
        names: set[str] = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names |= {t.id for t in targets if isinstance(t, ast.Name)}
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names |= {(a.asname or a.name).split(".")[0] for a in node.names}
            if isinstance(node, ast.ClassDef):
                members = {
                    n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                }
                for n in ast.walk(node):
                    if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
                        members.add(n.target.id)
                    elif isinstance(n, ast.Assign):
                        members |= {t.id for t in n.targets if isinstance(t, ast.Name)}
                    elif (
                        isinstance(n, ast.Attribute)
                        and isinstance(n.value, ast.Name)
                        and n.value.id == "self"
                    ):
                        members.add(n.attr)
                classes[node.name] |= members
                names |= members  # docs/errors.md names a method by its module (`atmpipe.store._reopen`)
        dotted = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for key in (dotted, dotted.removeprefix("atmpipe."), dotted.rpartition(".")[2]):
            modules[key] |= names
    return modules, classes


def test_every_function_and_class_the_docs_name_exists():
    """`module.name` (`sparse.crossover_density`, `atmpipe.eval.metrics.REGISTRY`) and `Class.member`
    (`SAE.train_pre_acts`) of atmpipe's own; other dotted words (file names, torch's API) are not ours."""
    modules, classes = python_names()
    # Dotted words the source spells as strings (entry-point groups such as `atmpipe.methods`) are names too.
    strings = {
        node.value
        for path in REPO.glob("atmpipe/**/*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    missing = set()
    for doc in DOCS:
        for token in backticked(doc.read_text()):
            match = re.fullmatch(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\(.*\))?", token)
            if (
                not match
                or token.startswith("torch.")
                or token in strings
                or re.search(r"\.(py|json|jsonl|md|sh|toml|html)$", token)
            ):
                continue
            parts = match.group(1).split(".")
            for i in range(len(parts) - 1, 0, -1):
                module = ".".join(parts[:i])
                if module in modules:
                    name, *rest = parts[i:]
                    found = name in modules[module] and (not rest or rest[0] in classes.get(name, set()))
                    break
            else:
                found = parts[0] not in classes or parts[1] in classes[parts[0]]
            if not found:
                missing.add((str(doc.relative_to(REPO)), match.group(1)))
    assert missing == set()
