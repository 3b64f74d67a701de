"""The RNN encoder-decoder with attention: encoder, attention, decoder and the model that joins
them, in plain PyTorch (``nn.GRU``/``nn.LSTM``, a step loop, ``F.cross_entropy``)."""
