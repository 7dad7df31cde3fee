import os

# 8 emulated CPU devices for the sharding tests, and a cheaper XLA backend pass pipeline: the
# tiny test models are compile-bound (about 5x faster compiles), results stay within tolerance.
# Must be set before JAX starts; benchmarks do not use these flags.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
