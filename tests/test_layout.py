"""The module map holds together: every name the project imports from itself exists (a local
import inside a function is only resolved when that function runs, so a refactor that moves
a name can break a rarely used command without any other test noticing)."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_every_internal_import_resolves():
    missing = []
    for path in sorted([*ROOT.joinpath("wss_ray").rglob("*.py"), *ROOT.joinpath("tests").glob("*.py"),
                        *ROOT.joinpath("benchmarks").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("wss_ray")):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if hasattr(module, alias.name):
                    continue
                try:  # a submodule named in the import list
                    importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{alias.name}")
    assert not missing, missing
