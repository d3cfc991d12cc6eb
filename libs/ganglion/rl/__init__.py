"""Learned scheduling policies: the observation schema, the network, the gymnasium env and
the training scripts (``ppo``, ``dqn``).

Importing this package is cheap; torch is imported by the modules that need it
(:mod:`ganglion.rl.network`, the trainers, the ``rl`` policy when it first decides).
"""

from ganglion.rl.features import DEFAULT_K, FEATURES, NUM_FEATURES, SCHEMA_VERSION

__all__ = ["DEFAULT_K", "FEATURES", "NUM_FEATURES", "SCHEMA_VERSION"]
