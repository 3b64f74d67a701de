"""Translation quality with sacreBLEU: BLEU and chrF on detokenized text, with signatures."""

from __future__ import annotations

from collections.abc import Sequence

from sacrebleu.metrics import BLEU, CHRF


def score_translations(hypotheses: Sequence[str], references: Sequence[str],
                       lowercase: bool = False) -> dict[str, float | str]:
    """Corpus BLEU (13a tokenization, as sacreBLEU's default) and chrF.

    Both take detokenized hypotheses and raw references, one per line.

    Returns:
        ``bleu``, ``chrf`` and their sacreBLEU signatures ``bleu_signature``,
        ``chrf_signature`` (``signature`` is the BLEU one).
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    bleu, chrf = BLEU(lowercase=lowercase), CHRF()
    bleu_score = bleu.corpus_score(list(hypotheses), [list(references)])
    chrf_score = chrf.corpus_score(list(hypotheses), [list(references)])
    return {
        "bleu": round(bleu_score.score, 2),
        "chrf": round(chrf_score.score, 2),
        "signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }
