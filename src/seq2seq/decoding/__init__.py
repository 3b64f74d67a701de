"""Decoding: greedy and beam search over a decoding session, ensembles of models (ensemble.py),
the ``Translator`` and scores.

May import: files, config, models, kernels, data. Never ``training`` or ``serving``.
"""
