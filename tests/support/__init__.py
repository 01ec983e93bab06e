"""What the tests share that is not a test: fixtures, harnesses, generators, oracles.

tests/ is on sys.path when pytest runs (rootdir conftest), so tests import ``from support.demo import ...``.
:mod:`support.serve` is the one way to run ``python -m proxy serve`` in a test.
"""
