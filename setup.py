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
        "etils==1.15.0",  # epath, imported by moraljax.checkpointing.
        "chex==0.1.92",
        "transformers==5.24.0",
        "Jinja2==3.1.6",  # transformers renders chat templates with it.
        "tokenizers==0.23.3",
        "safetensors==0.8.0",
        "absl-py==2.5.1",
        "ml_collections==1.1.0",
        "numpy==2.4.6",
        "tensorboardX==2.6.5",
        "matplotlib==3.11.2",
        "tqdm==4.70.1",
    ],
    extras_require={
        "test": [
            "pytest==9.0.3",
            "pytest-xdist==3.8.0",
            # CPU build, only for parity checks against transformers' Gemma2.
            "torch==2.13.0",
            "peft==0.21.2",
            "ruff==0.17.6",  # Lint (ruff.toml), run by .ci/run.
        ],
    },
)
