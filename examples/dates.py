"""Dates as people write them -> ISO dates: ``seq2seq demo`` in a few lines of the Python API.

    python examples/dates.py      # about a minute on two CPU cores; a second run reuses the model
"""

import os
from pathlib import Path

from seq2seq.data.tasks import make_task, write_task
from seq2seq.decoding.translator import Translator
from seq2seq.demo import demo_config
from seq2seq.training.loop import train_translator

work = Path("dates-example")

# 20,000 generated training pairs such as ("3rd of March 2021", "2021-03-03"); 2,000 held out:
# valid.* (1,000) picks the best checkpoint, test.* (1,000) is never seen before the end.
data = make_task("dates", n_train=20_000, n_test=2_000, seed=1)
files = write_task(data, work / "data", valid_size=1_000)

# The demo's Config: characters as tokens, a bidirectional GRU encoder (128 per direction),
# Luong attention, Adam at 3e-3, two epochs or one minute, whichever ends first.
# SEQ2SEQ_EXAMPLE_SECONDS shortens the budget (tests/test_examples.py runs this file in seconds).
config = demo_config("dates", max_seconds=float(os.environ.get("SEQ2SEQ_EXAMPLE_SECONDS", 60)))
for key, name in files.items():
    setattr(config.data, key, name)
if (work / "model" / "best.safetensors").is_file():
    translator = Translator.load(work / "model")
else:
    translator = train_translator(config, work / "model", data_dir=work / "data")

test = data.test[1_000:]
predictions = translator.translate([source for source, _ in test], beam=1)
correct = sum(prediction == target for prediction, (_, target) in zip(predictions, test))
print(f"exact match on {len(test):,} held-out dates: {correct / len(test):.1%}")

for text in ("3rd of March 2021", "Mar 3, 21", "03.03.2021", "Saturday 14 September 1985"):
    print(f"{text!r:30} -> {translator.translate([text])[0]}")
print(translator.plot_attention("Saturday 14 September 1985", work / "attention.png"))
