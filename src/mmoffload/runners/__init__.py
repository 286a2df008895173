"""Ordered parallel maps over lines: a process pool, or Ray Data (the ``ray`` extra). They know no stage:
a stage hands them its per-line function."""
