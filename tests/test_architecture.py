"""The dependency direction of DESIGN.md §1 / STYLE.md §3.1, checked on every run."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "offpg_offline"
STDLIB = set(sys.stdlib_module_names)
MODULES = sorted(PKG.rglob("*.py"))


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: use absolute imports"
            names.add(node.module or "")
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _third_party_roots(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names} - STDLIB


def _ours(names: set[str]) -> set[str]:
    return {n for n in names if n.startswith("offpg_offline")}


@pytest.mark.parametrize("path", sorted((PKG / "estimators").glob("*.py")), ids=lambda p: p.name)
def test_estimators_import_only_torch_stdlib_and_themselves(path: Path) -> None:
    imported = _imported(path)
    assert _third_party_roots(imported) <= {"torch", "offpg_offline"}
    assert all(n.startswith("offpg_offline.estimators") for n in _ours(imported)), path.name


def test_config_imports_only_the_standard_library() -> None:
    # so that `offpg --help` does not load torch
    assert _third_party_roots(_imported(PKG / "config.py")) == set()


def test_policies_import_no_project_module_but_config() -> None:
    imported = _imported(PKG / "policies.py")
    assert _third_party_roots(imported) <= {"torch", "numpy", "offpg_offline"}
    assert all(n.startswith("offpg_offline.config") for n in _ours(imported))


def test_train_never_imports_tracking_or_mlflow() -> None:
    imported = _imported(PKG / "train.py")
    assert not any(n.startswith("offpg_offline.tracking") for n in imported)
    assert "offpg_offline.tracking" not in {f"offpg_offline.{n.split('.')[-1]}" for n in imported}


def test_only_data_minari_imports_minari() -> None:
    importers = {
        p.relative_to(PKG).as_posix()
        for p in MODULES
        if "minari" in _third_party_roots(_imported(p))
    }
    assert importers <= {"data/minari.py"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PKG).as_posix())
def test_mlflow_and_cli_boundaries(path: Path) -> None:
    imported = _imported(path)
    if path.relative_to(PKG).parts[0] != "tracking":
        assert "mlflow" not in _third_party_roots(imported), f"{path.name} imports mlflow"
    assert "offpg_offline.cli" not in imported, f"{path.name} imports the CLI"


def test_help_does_not_import_torch_or_mlflow() -> None:
    import subprocess

    code = (
        "import sys; from typer.testing import CliRunner; from offpg_offline.cli import app; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0; "
        "print(sorted(m for m in ('torch', 'mlflow', 'pyarrow', 'minari') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
