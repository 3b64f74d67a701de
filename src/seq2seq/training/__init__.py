"""Training: run setup (model folder, lock, data), the loop, the schedule, distributed ranks and
the metrics log.

May import: every layer below it (files, config, models, kernels, data) and ``decoding`` for
validation. Nothing imports training but the faces (``cli``, ``demo``, ``vectors``).
"""
