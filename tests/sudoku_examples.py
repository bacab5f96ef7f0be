"""Loads the Sudoku example's modules by path: examples/ is not a package, and its modules
import each other by bare name, so their folder is on sys.path while one loads."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SUDOKU = Path(__file__).resolve().parents[1] / "examples" / "sudoku"


def load(name: str):
    """examples/sudoku/`name`.py as a fresh module."""
    sys.path.insert(0, str(SUDOKU))
    try:
        spec = importlib.util.spec_from_file_location(name, SUDOKU / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SUDOKU))
