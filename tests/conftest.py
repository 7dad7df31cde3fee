import os

import pytest

# 8 emulated CPU devices for the sharding tests, and a cheaper XLA backend pass pipeline: the
# tiny test models are compile-bound (about 5x faster compiles), results stay within tolerance.
# Must be set before JAX starts; benchmarks do not use these flags.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def private_xla_cache(tmp_path_factory):
    """The CLI commands' persistent compilation cache in a temporary folder, not ~/.cache; the
    process-wide cache they turn on is switched off again for later tests."""
    from jax.experimental.compilation_cache import compilation_cache
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JBLIP_CACHE_DIR", str(tmp_path_factory.mktemp("xla-cache")))
        yield
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()
