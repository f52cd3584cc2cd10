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
