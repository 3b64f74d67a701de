"""CPU kernels applied from outside the models: the policy that picks them for a device, the
fused GRU, the step-wise decoder, the fused loss and small ops.

May import: ``seq2seq.files``, ``seq2seq.config``, ``seq2seq.models``.
"""
