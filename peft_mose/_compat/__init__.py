"""Every touch of a dependency's internals, one module per library (see docs/versions.md).

Each module names the releases it was checked against; ``tests/test_compat.py`` fails loudly when one changes.
"""
