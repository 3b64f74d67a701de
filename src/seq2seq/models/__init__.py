"""The models: plain PyTorch modules (``rnn/``), their checkpoints' weights, and the builder.

May import: ``seq2seq.files``, ``seq2seq.config``. Never a kernel: the fast twins in
``seq2seq.kernels`` are applied to these modules from outside.
"""
