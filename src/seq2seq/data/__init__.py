"""Data: text files, tokenizers, training batches, prepared corpora, downloads and toy tasks.

May import: ``seq2seq.files``, ``seq2seq.config``, ``seq2seq.model_dir``. No model, no kernel.
"""
