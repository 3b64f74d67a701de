"""``metrics.jsonl``: one JSON object per line, appended by rank 0 while a run trains."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from seq2seq.config import quote
from seq2seq.data.text import DataError
from seq2seq.files import atomic_write_text, read_regular_file

# A line per logging step and validation, ~200 bytes: a million steps fit many times over.
MAX_METRICS_BYTES = 256 << 20


class MetricsLog:
    """Appends lines to ``path``; a resume drops the lines logged after its checkpoint."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled  # only rank 0 writes

    def append(self, entry: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")  # one write: a kill leaves no torn line

    def clear(self) -> None:
        if self.enabled:
            self.path.unlink(missing_ok=True)

    def truncate(self, step: int) -> None:
        """Keep the lines up to ``step`` (the checkpoint's); the later ones are logged again.

        A torn line (a killed process's last) is dropped. A whole line whose ``step`` is not an
        integer was not written by a run: a ``DataError`` names the file, line and field, and
        the file is left as it is. The file is read within a bound, never from a FIFO or device.
        """
        if not self.enabled or not self.path.is_file():
            return
        try:
            text = read_regular_file(self.path, MAX_METRICS_BYTES).decode("utf-8", errors="replace")
        except ValueError as error:  # a FIFO, a device or a file past the bound
            raise DataError(f"{error}: move it away to resume") from None
        kept = []
        for number, line in enumerate(text.splitlines(), start=1):
            try:
                entry = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                continue  # a torn line from a killed process
            if not isinstance(entry, dict):
                continue
            logged = entry.get("step", 0)
            if type(logged) is not int:
                raise DataError(f"{self.path}:{number}: field 'step' must be an integer, got "
                                f"{quote(logged)}: the file was not written by a run; fix or remove "
                                f"the line to resume")
            if logged <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))
