"""The public API (``from protperf import ...``) and the model registry (protperf.pretrained)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from lm_models import export_random_model

import protperf
from protperf import pretrained, tokenizer
from protperf.errors import InputError


def test_public_names_are_the_modules_objects():
    from protperf import FastAttention, PerformerConfig, PerformerLM, load_model
    from protperf import tokenizer as exported_tokenizer
    from protperf.attention import FastAttention as module_attention
    from protperf.model import PerformerConfig as module_config
    from protperf.model import PerformerLM as module_model

    assert (FastAttention, PerformerConfig, PerformerLM) == (
        module_attention, module_config, module_model,
    )  # fmt: skip
    assert load_model is pretrained.load_model and exported_tokenizer is tokenizer
    assert set(protperf.__all__) >= {"PerformerLM", "PerformerConfig", "FastAttention",
                                     "load_model", "tokenizer"}  # fmt: skip
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = protperf.nothing


def test_importing_protperf_does_not_import_torch():
    code = "import sys, protperf; print(protperf.__version__, 'torch' in sys.modules)"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == [protperf.__version__, "False"]


def test_batch_encode_wraps_and_pads():
    tokens, padding = tokenizer.batch_encode(["MKT", "mk", np.array([5, 6], dtype=np.uint8)])
    assert tokens.dtype == torch.long and tokens.shape == (3, 5)
    bos, eos, pad = tokenizer.BOS, tokenizer.EOS, tokenizer.PAD
    m, k, t = (int(x) for x in tokenizer.encode("MKT"))
    assert tokens.tolist() == [[bos, m, k, t, eos], [bos, m, k, eos, pad], [bos, 5, 6, eos, pad]]
    assert padding.tolist() == [[False] * 5, [False] * 4 + [True], [False] * 4 + [True]]
    _, none = tokenizer.batch_encode(["MKT", "AAA"])
    assert none is None  # nothing padded


def test_load_model_from_a_path_is_the_exported_model(tmp_path):
    export = export_random_model(tmp_path / "export", seed=3, causal=True)
    model = protperf.load_model(export)
    assert isinstance(model, protperf.PerformerLM) and not model.training
    assert model.config.causal and model.config.dim == 32
    tokens, padding = tokenizer.batch_encode(["MKTAYIAKQR", "MSL"])
    with torch.no_grad():
        out = model(tokens, padding, repr_layers=[model.config.depth])
    assert out["logits"].shape == (2, 12, tokenizer.VOCAB_SIZE)
    again = protperf.load_model(str(export))
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_packaged_models_load_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "PACKAGED_DIR", tmp_path / "models")
    assert pretrained.packaged_models() == {}
    export_random_model(tmp_path / "models" / "tiny-bi", seed=1)
    (tmp_path / "models" / "not-a-model").mkdir()
    assert list(pretrained.packaged_models()) == ["tiny-bi"]
    model = protperf.load_model("tiny-bi")
    assert not model.config.causal
    with pytest.raises(
        InputError, match=r"nothing-here: .* not a packaged model \(packaged: tiny-bi\)"
    ):
        protperf.load_model("nothing-here")


def _touch(path, when: float) -> None:
    os.utime(path / "model.safetensors", (when, when))


def test_the_default_model_is_the_most_recent_export(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "PACKAGED_DIR", tmp_path / "models")
    runs = tmp_path / "runs"
    with pytest.raises(InputError, match="no --model given and no model exported under"):
        pretrained.default_model(runs=runs)
    old = export_random_model(runs / "old-uni" / "export", causal=True)
    new = export_random_model(runs / "group" / "new-bi" / "export")
    _touch(old, 1_000_000)
    _touch(new, 2_000_000)
    assert pretrained.local_exports(runs) == [new, old]
    assert pretrained.default_model(runs=runs) == new
    assert pretrained.default_model(runs=runs, causal=True) == old  # generate needs a causal one
    _touch(old, 3_000_000)
    assert pretrained.default_model(runs=runs) == old
    with pytest.raises(InputError, match=r"no causal \(unidirectional\) model exported"):
        pretrained.default_model(runs=runs / "group", causal=True)
    packaged = export_random_model(tmp_path / "models" / "packaged-uni", causal=True)
    assert pretrained.default_model(runs=tmp_path / "no-runs") == packaged  # the fallback
    assert pretrained.default_model(runs=runs / "group", causal=True) == packaged
