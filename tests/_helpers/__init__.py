"""Helpers shared by several test modules (importable as ``_helpers``: pyproject's pytest
``pythonpath`` puts tests/ on sys.path). Test modules import from here, never from each other."""
