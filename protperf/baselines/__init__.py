"""The paper's other efficient attentions, as ops beside FAVOR+ (:mod:`protperf.favor`).

* :mod:`~protperf.baselines.lsh`: Reformer's LSH attention (Kitaev et al. 2020);
* :mod:`~protperf.baselines.linformer`: Linformer (Wang et al. 2020).

:class:`protperf.attention.FastAttention` runs them as the ``"reformer"`` and ``"linformer"``
kernels; their naive forms, which the tests compare them with, are in
:mod:`protperf.baselines.reference` (not imported here).
"""

from protperf.baselines.linformer import init_projection, linformer_attention
from protperf.baselines.lsh import bucket_counts, draw_rotations, lsh_attention

__all__ = [
    "bucket_counts",
    "draw_rotations",
    "init_projection",
    "linformer_attention",
    "lsh_attention",
]
