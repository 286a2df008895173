"""The architecture the README draws is the one the code has: layers, and no import cycle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp", reason="import-linter (the dev extra) brings grimp")

REPO = Path(__file__).resolve().parent.parent


def test_the_import_contracts_hold() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def test_no_module_imports_itself_through_others() -> None:
    graph = grimp.build_graph("mmoffload", "mmoffload_cli", exclude_type_checking_imports=True)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            # A package importing its own submodules (an __init__'s re-exports) is no cycle.
            if imported.startswith(module + "."):
                continue
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain and not module.startswith(imported + "."):
                cycles.append(" -> ".join((module, *chain)))
    assert cycles == []
