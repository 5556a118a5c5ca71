"""Test setup: 8 virtual CPU devices (set before jax is imported), fast compiles, fp32 matmuls everywhere."""

import os

# Backend optimisation level 0: the suite is dominated by XLA:CPU compile time of tiny models (≈2× faster to
# compile); numerics are unchanged up to fp32 rounding, and every comparison runs under the same flags.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
