"""seq2seq: RNN encoder-decoder models with attention, on PyTorch."""

from seq2seq.config import Config, DataConfig, DecodeConfig, ModelConfig, TrainConfig
from seq2seq.model import Seq2Seq
from seq2seq.simple import EncoderDecoderRNN

__all__ = [
    "Config", "DataConfig", "DecodeConfig", "EncoderDecoderRNN", "ModelConfig", "Seq2Seq", "TrainConfig",
]
__version__ = "0.1.0"
