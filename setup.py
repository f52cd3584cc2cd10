"""moraljax: moral alignment of LLM agents with intrinsic rewards, in JAX."""

import setuptools

setuptools.setup(
    name="moraljax",
    version="0.1.0",
    description=(
        "JAX-native PPO fine-tuning of LLM agents on moral intrinsic rewards "
        "in iterated matrix games (Tennant, Hailes & Musolesi, ICLR 2025)."
    ),
    packages=setuptools.find_packages(include=["moraljax", "moraljax.*"]),
    package_data={"moraljax.llm.tiny": ["checkpoint/*"]},
    python_requires=">=3.11",
    # Versions tested together on CPU (Python 3.11). Keep in step with README.
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "chex==0.1.92",
        "transformers>=5.0,<6",
        "tokenizers>=0.22,<1",
        "safetensors>=0.6",
        "absl-py>=2.1",
        "ml_collections>=1.0",
        "numpy>=2.0",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "tqdm>=4.66",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            # CPU build, only for parity checks against transformers' Gemma2.
            "torch==2.13.0",
            "peft>=0.17",
        ],
    },
)
