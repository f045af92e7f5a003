"""What ``protperf probe`` is built from, usable on its own from Python.

- :mod:`~protperf.probing.features`: a protein's features, the pooled states of a model (or of
  an embeddings file that ``protperf embed`` wrote), and the composition baseline's;
- :mod:`~protperf.probing.predictor`: the linear predictor, fitted by scikit-learn with its
  regularisation chosen by cross-validation, saved without pickle and applied with numpy;
- :mod:`~protperf.probing.figures`: test figures with bootstrap intervals.

The verb itself, labels and reports, is :mod:`protperf.probe`.
"""
