"""Test setup shared by every test file.

Eight fake CPU devices let the sharding tests run the same programs on a
mesh; every other test still runs on the default (first) device.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import tempfile  # noqa: E402

import jax  # noqa: E402

# Several tests build the same training program (e.g. a run and its resumed
# twin); the persistent cache compiles each distinct program once per session.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "moraljax_test_jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _assert_close_to_scale(actual, expected, *, err_msg: str = "", rel: float = 1e-4) -> None:
    """Compares results of two DIFFERENT compiled programs (learner counts, shardings, processes).

    XLA may order float reductions differently in each, so values agree to
    float32 noise on the scale of the terms they are computed from, not
    bit for bit. A per-episode metric (loss, KL, advantage statistic,
    reward) is built from terms of order one or larger, even when the result
    itself cancels to ~1e-7 (a policy loss over whitened advantages), so the
    absolute tolerance is `rel` times max(1, the largest magnitude seen);
    `rel` = 1e-4 is about 1000 float32 ulps at that scale. A wrong learner
    mapping or a real change of results differs by far more.
    """
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    finite = np.abs(expected[np.isfinite(expected)])
    scale = max(1.0, float(finite.max()) if finite.size else 1.0)
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * scale, err_msg=err_msg)


@pytest.fixture
def assert_close_to_scale():
    """The comparison for results of two different compiled programs (see `_assert_close_to_scale`)."""
    return _assert_close_to_scale
