"""Every YAML under configs/ (table2/ included) parses against `protperf train` and builds its model.

The models are built for real (about 2 s for a 36-layer one): the attention engine draws its
random features with numpy, which the meta device cannot do.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from protperf import train
from protperf.lit import BidirectionalLM, UnidirectionalLM

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))
PAPER_36 = {"depth": 36, "heads": 8, "dim": 512, "ff_dim": 1024, "max_length": 1024}
CONCAT = {"depth": 6, "heads": 8, "dim": 512, "ff_dim": 2048, "max_length": 8192}


def _parameters(config) -> int:
    """Analytic count: per block qkv (Reformer: shared qk and v) + out + two LayerNorms + MLP
    (+ the local convolution's depthwise kernel, + Linformer's two n x k projections); tied
    embedding; final norm."""
    dim, ff_dim = config.dim, config.ff_dim
    projections = 2 if config.kernel == "reformer" else 3
    block = (
        (projections * (dim * dim + dim)) + (dim * dim + dim) + 4 * dim
        + (2 * dim * ff_dim + ff_dim + dim) + dim * config.local_conv
    )  # fmt: skip
    if config.kernel == "linformer":
        block += 2 * config.max_length * config.linformer_k
    return config.depth * block + config.vocab_size * dim + 2 * dim


def _build(path: Path):
    cfg = train.parse(["--config", str(path), "--data", "unused"])
    cls = BidirectionalLM if cfg["bidirectional"] else UnidirectionalLM
    kwargs = {"masking": cfg["masking"]} if cfg["bidirectional"] else {}
    module = cls(cfg["model"], cfg["optim"], redraw_every=cfg["redraw_every"], **kwargs)
    return cfg, module


def test_the_expected_configs_exist():
    names = {path.stem for path in CONFIGS}
    assert {
        "performer-uni-36", "performer-bi-36", "performer-bi-36-softmax", "transformer-uni-36",
        "transformer-bi-36", "performer-concat", "transformer-concat", "tiny-cpu",
    } <= names  # fmt: skip


@pytest.mark.parametrize(
    "path", CONFIGS, ids=[str(path.relative_to(CONFIG_DIR)) for path in CONFIGS]
)
def test_config_builds(path):
    cfg, module = _build(path)
    config = module.model.config
    assert module.model.num_parameters() == _parameters(config)
    assert config.causal == (not cfg["bidirectional"])
    if path.stem.endswith("-36") or "-36-" in path.stem:
        assert {key: getattr(config, key) for key in PAPER_36} == PAPER_36
        optim = cfg["optim"]
        assert (optim.lr, tuple(optim.betas), optim.eps, optim.weight_decay) == (
            1e-3, (0.9, 0.98), 1e-9, 0.1,
        )  # fmt: skip
        assert cfg["trainer"]["gradient_clip_val"] == 0.5 and config.dropout == 0.1
        assert cfg["bidirectional"] == ("-bi-" in path.stem)
    if "concat" in path.stem and path.parent == CONFIG_DIR:
        assert cfg["concat"] and {key: getattr(config, key) for key in CONCAT} == CONCAT
        # The preset behind --concat agrees with the config file.
        for group, values in train.CONCAT_PRESET.items():
            for field, value in values.items():
                actual = getattr(cfg[group], field)
                assert actual == value or (group, field) == ("loader", "batch_size"), field
    if path.stem.startswith("transformer") and path.parent == CONFIG_DIR:
        assert config.kernel == "exact"
    elif path.stem.startswith("performer") and path.parent == CONFIG_DIR:
        assert config.kernel == (
            "softmax" if "softmax" in path.stem or "concat" in path.stem else "relu"
        )


def test_tiny_config_is_small():
    cfg, module = _build(next(path for path in CONFIGS if path.stem == "tiny-cpu"))
    assert module.model.num_parameters() < 2_000_000
    assert cfg["trainer"]["accelerator"] == "cpu" and cfg["trainer"]["max_steps"] <= 5000
