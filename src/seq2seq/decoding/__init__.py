"""Decoding: greedy and beam search over a decoding session, the ``Translator`` and scores.

May import: files, config, models, kernels, data. Never ``training`` or ``serving``.
"""
