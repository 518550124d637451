"""Declared dependencies: the library needs only torch, pyro and tqdm; the study's packages are the
``eval`` extra. Checked against the imports in the source, so a new import fails here first."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")

ROOT = Path(__file__).resolve().parents[1]
CORE = {"torch", "pyro-ppl", "tqdm"}
# import name -> distribution name, where they differ
DISTRIBUTION = {"pyro": "pyro-ppl", "sklearn": "scikit-learn"}
LOCAL = {"bayes_kfoc", "evaluation", "datasets"}
OPTIONAL_PEERS = {"laplace", "curvlinops"}  # imported inside try / find_spec guards only


def _project() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower() for r in requirements}


def _third_party_imports(package: str) -> set[str]:
    found: set[str] = set()
    stdlib = set(sys.stdlib_module_names)
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            found.update(t for t in tops if t not in stdlib and t not in LOCAL)
    return {DISTRIBUTION.get(t, t) for t in found}


def test_core_dependencies_are_torch_pyro_and_tqdm() -> None:
    declared = _names(_project()["dependencies"])  # type: ignore[arg-type]
    assert declared == CORE, f"core dependencies {sorted(declared)}; expected {sorted(CORE)}"
    assert _third_party_imports("bayes_kfoc") <= CORE


def test_eval_extra_covers_the_study_and_the_data_readers() -> None:
    extras = _project()["optional-dependencies"]
    eval_deps = _names(extras["eval"])  # type: ignore[index]
    assert not eval_deps & {"pytest", "ruff", "mypy", "netcal"}, "tools belong in dev"
    zoo_deps = _names(extras["zoo"])  # type: ignore[index]  # the HF benchmark's models
    needed = _third_party_imports("evaluation") | _third_party_imports("datasets")
    missing = needed - CORE - eval_deps - zoo_deps - OPTIONAL_PEERS
    assert not missing, f"evaluation/ or datasets/ import {sorted(missing)}, not in [eval]"


def test_licence_is_an_spdx_string() -> None:
    assert _project()["license"] == "MIT"
