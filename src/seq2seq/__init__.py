"""seq2seq: RNN encoder-decoder models with attention, on PyTorch.

- ``EncoderDecoderRNN``: NumPy arrays in and out, for sequences of vectors.
- ``Translator``: train, load, translate and evaluate translation models.
- ``Seq2Seq``: the PyTorch model core both of them use.
"""

from seq2seq.config import Config, DataConfig, DecodeConfig, ModelConfig, TrainConfig
from seq2seq.model import Seq2Seq
from seq2seq.simple import EncoderDecoderRNN
from seq2seq.translator import Translator

__all__ = [
    "Config", "DataConfig", "DecodeConfig", "EncoderDecoderRNN", "ModelConfig", "Seq2Seq",
    "TrainConfig", "Translator",
]
__version__ = "0.1.0"
