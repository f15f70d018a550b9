"""bond: best-of-N distillation (BOND, J-BOND, iterative BOND, WIND) and its baselines, in JAX."""

__version__ = "0.1.0"
