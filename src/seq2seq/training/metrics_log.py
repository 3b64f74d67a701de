"""``metrics.jsonl``: one JSON object per line, appended by rank 0 while a run trains."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from seq2seq.files import atomic_write_text


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
        """Keep the lines up to ``step`` (the checkpoint's); the later ones are logged again."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text("utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line from a killed process
            if isinstance(entry, dict) and entry.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))
