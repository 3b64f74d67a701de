"""Serving: the REST app, the worker that batches requests across clients, the results' JSON
and the page.

May import: files, config, models, kernels, data, decoding. Never ``training``.
"""
