"""bitsandbytes stays out of processes that load no 4-bit model, and LoRA and DoRA still work there."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from ftune import lean_imports


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_worker_without_qlora_never_imports_bitsandbytes_and_still_trains_lora_and_dora(tiny_model_dir):
    out = run_python(f"""
        import sys
        from ftune.lean_imports import skip_bitsandbytes
        assert skip_bitsandbytes(quantized=False)
        import torch
        from ftune.adapters import add_adapter
        from ftune.config import LoraConfig, ModelConfig
        from ftune.model import load_base_model
        for dora in (False, True):
            base = load_base_model(ModelConfig(name_or_path={str(tiny_model_dir)!r}), dtype=torch.float32)
            model = add_adapter(base, LoraConfig(use_dora=dora))
            loss = model(input_ids=torch.tensor([[1, 5, 9, 2]]), labels=torch.tensor([[1, 5, 9, 2]])).loss
            loss.backward()
            assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
        from importlib.util import find_spec
        from transformers.utils import is_bitsandbytes_available
        print(sys.modules["bitsandbytes"], find_spec("bitsandbytes"), is_bitsandbytes_available())
        """)
    assert out.split() == ["None", "None", "False"]


def test_qlora_processes_keep_bitsandbytes():
    out = run_python("""
        import sys
        from ftune.lean_imports import skip_bitsandbytes
        print(skip_bitsandbytes(quantized=True), "bitsandbytes" in sys.modules)
        import bitsandbytes
        print(bitsandbytes.__name__)
        """)
    assert out.split() == ["False", "False", "bitsandbytes"]


def test_an_already_imported_bitsandbytes_is_left_alone(monkeypatch):
    pytest.importorskip("bitsandbytes")
    monkeypatch.setitem(sys.modules, lean_imports.BITSANDBYTES, sys.modules["bitsandbytes"])
    assert not lean_imports.skip_bitsandbytes(quantized=False)
    assert sys.modules["bitsandbytes"] is not None
