"""The Transformer (Vaswani et al., 2017): ``model.py`` (its layers, encoder and decoder, in
plain PyTorch on ``scaled_dot_product_attention``) and ``session.py`` (its decoding session,
whose state is the key/value cache)."""
