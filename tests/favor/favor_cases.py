"""What the FAVOR+ op tests share (imported by name, as tests/lm_data.py is)."""

from __future__ import annotations

import pytest

#: The FAVOR+ feature maps under test: (kernel, feature_type) of FastAttention.
KERNEL_SETUPS = [
    pytest.param("softmax", "orthogonal", id="softmax"),
    pytest.param("relu", "deterministic", id="relu"),
    pytest.param("relu", "orthogonal", id="relu-projected"),
]
