"""The view of a translation: its JSON (the API's result for one sentence) and its page.

``page.html`` is one self-contained file, with no CDN, fonts or scripts from elsewhere, so it
works offline. ``seq2seq serve`` sends it at ``GET /``, where it calls the API;
``seq2seq attention --html`` writes it with one result inside, drawn with no server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from importlib import resources
from typing import Any

import numpy as np

from seq2seq.decoding.search import Hypothesis
from seq2seq.decoding.translator import Translator

PAGE_FILE = "page.html"
EOS_PIECE = "</s>"
_STATIC_SLOT = '<script id="static-result" type="application/json">null</script>'


def page_html(static: dict[str, Any] | None = None) -> str:
    """The page; with ``static`` ({"model", "source", "result"}) it shows that result alone."""
    html = resources.files("seq2seq.serving").joinpath(PAGE_FILE).read_text(encoding="utf-8")
    if static is None:
        return html
    data = json.dumps(static, ensure_ascii=True).replace("<", "\\u003c")  # no "</script>" inside
    filled = html.replace(_STATIC_SLOT, _STATIC_SLOT.replace(">null<", f">{data}<"))
    assert filled != html, f"{PAGE_FILE} lacks its static-result slot"
    return filled


def content_security_policy(html: str) -> str:
    """A Content-Security-Policy that lets ``html``'s inline scripts and styles run, by their
    SHA-256, and nothing else: no other script or style, no frames (``frame-ancestors``), no
    forms, no plugins; ``fetch`` to the same origin only. JSON data blocks (``<script
    type="application/json">``) are not run, so they need no hash."""
    scripts = [body for attributes, body in re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
               if "type=" not in attributes or "javascript" in attributes]
    styles = re.findall(r"<style[^>]*>(.*?)</style>", html, re.S)

    def hashes(bodies: list[str]) -> str:
        digests = (base64.b64encode(hashlib.sha256(b.encode("utf-8")).digest()).decode() for b in bodies)
        return " ".join(f"'sha256-{d}'" for d in digests) or "'none'"

    return (f"default-src 'none'; script-src {hashes(scripts)}; style-src {hashes(styles)}; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


def attention_page(translator: Translator, text: str, beam: int = 1, model: str = "") -> str:
    """The page with the translation of ``text`` and its attention, to open with no server."""
    if translator.config.model.attention is None:
        raise ValueError("this model has no attention (model.attention is none)")
    hypotheses = translator.hypotheses([text], beam=beam, return_attention=True)[0]
    result = sentence_result(translator, text, hypotheses, tokens=True, attention=True)
    return page_html({"model": model, "source": text, "result": result})


def sentence_result(translator: Translator, text: str, hypotheses: list[Hypothesis],
                    tokens: bool = False, attention: bool = False) -> dict[str, Any]:
    """One sentence's result: ``translation`` and ``score`` of the best hypothesis; ``n_best``
    (each ``translation`` and ``score``) when there are several; with ``tokens``,
    ``source_tokens`` and ``target_tokens`` (eos included, as the model saw them); with
    ``attention``, a (len(target_tokens), len(source_tokens)) list of rows."""
    best = hypotheses[0]
    result: dict[str, Any] = {"translation": translator.tgt_tok.decode(best.tokens),
                              "score": json_score(best.score)}
    if len(hypotheses) > 1:
        result["n_best"] = [{"translation": translator.tgt_tok.decode(h.tokens), "score": json_score(h.score)}
                            for h in hypotheses]
    if not (tokens or attention):
        return result
    src_pieces = translator.src_tok.pieces(text)[: translator.config.decode.max_input_len] + [EOS_PIECE]
    tgt_pieces = [translator.tgt_tok.id_to_piece(i) for i in best.tokens] + [EOS_PIECE]
    if tokens:
        result["source_tokens"], result["target_tokens"] = src_pieces, tgt_pieces
    if attention:
        if best.attention is None:
            raise ValueError("this model has no attention (model.attention is none)")
        weights = best.attention.float()[: len(tgt_pieces), : len(src_pieces)].numpy()
        result["attention"] = np.round(weights.astype(np.float64), 4).tolist()  # in C, not per weight
    return result


def json_score(value: float) -> float | None:
    """The score as computed (not rounded: a client may compare scores closely); JSON has no
    inf or NaN, so such a score is null."""
    return float(value) if math.isfinite(value) else None
