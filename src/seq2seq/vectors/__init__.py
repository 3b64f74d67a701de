"""The seed's face: ``EncoderDecoderRNN``, NumPy arrays of vectors in and out, and its coercion of
NumPy input.

May import: every layer (it trains and predicts).
"""
