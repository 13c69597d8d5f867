"""What the benchmark scripts share; each script imports the submodule it needs.

Submodules, not re-exports: ``record`` must stay importable before numpy (``edge_cost`` sets the
BLAS thread variables first), and a script that only writes JSON should not load Redis or Pillow.
"""
