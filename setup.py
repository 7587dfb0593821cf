"""Packaging for cp_megatron (console entry point ``cp-megatron``).

Install torch first and explicitly (``pip install torch==2.13.0``): a bare ``torch``
requirement with no torch installed makes pip pull a multi-GB CUDA build.
"""

from setuptools import find_packages, setup

setup(
    name="cp_megatron",
    version="0.1.0",
    description="Context-parallel inference for million-token prompts on Llama 3 (arXiv 2411.01783)",
    packages=find_packages(include=["cp_megatron", "cp_megatron.*"]),
    package_data={"cp_megatron": ["fake_cuda_guard.cpp"]},   # the dry run compiles it (dryrun.py)
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        # 0.17+ declare Python >= 3.12, so pip on 3.11 installs 0.16.1; tested on 0.16.1, 0.19.2
        # and 0.20.0 (docs/megatron.md §7).  0.19+ import triton unguarded (NVIDIA/Megatron-LM#6891),
        # which a CPU build of torch does not bring.
        "megatron-core>=0.16.1,<0.21",
        "triton; python_version >= '3.12' and sys_platform == 'linux'",
        "numpy",
        "safetensors>=0.4",
        "gguf>=0.10",
        "tokenizers>=0.19",
        "tiktoken>=0.7",
        "jinja2>=3.1",
        "pydantic>=2.5",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "prometheus-client>=0.20",
        # its shared-memory CPU all_reduce carries decode's CP collectives on one CPU machine
        # (cp_megatron/shm_collectives.py, JIT-compiled on first use); also the deepspeed launcher
        "deepspeed>=0.16",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "transformers>=4.45", "accelerate>=0.30",
                 "openai>=1.40", "httpx>=0.27"],
    },
    entry_points={"console_scripts": ["cp-megatron=cp_megatron.cli:main"]},
)
