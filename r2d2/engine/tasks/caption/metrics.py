"""Caption metrics on Chinese text: BLEU-1..4, ROUGE-L, CIDEr-D, and METEOR on request.

The numbers come from the scorers of ``pycocoevalcap`` (the Python port of the MS-COCO caption
evaluation that the AI Challenger (AIC-ICC) kit and the captioning papers use), fed with tokens
from our own Chinese tokenisation instead of COCO's PTBTokenizer (a Java program for English).

Scale: every score is reported **x100** ("points"), as papers print their tables (BLEU-4 39.7,
ROUGE-L 59.1, CIDEr-D 129.8) and as :mod:`r2d2.engine.metrics` reports recall. CIDEr-D's own
scale already has a x10 inside (so a perfect CIDEr-D is about 1000 points on a large corpus and
depends on the corpus, see below).

What each score is, read from pycocoevalcap 1.2's sources:

``BLEU-n``   corpus BLEU (``bleu/bleu_scorer.py``, ``option='closest'``): clipped n-gram matches
             and candidate n-grams summed over all images, brevity penalty ``exp(1 - r/c)`` when
             ``c < r`` with ``c`` the total candidate length and ``r`` the sum over images of the
             reference length closest to the candidate's; BLEU-n is the geometric mean of the
             1..n-gram precisions times that penalty (not an average of sentence BLEUs).
``ROUGE-L``  mean over images of the LCS F-measure with ``beta = 1.2``, precision and recall each
             the maximum over the image's references (``rouge/rouge.py``).
``CIDEr-D``  ``cider/cider_scorer.py`` is CIDEr-D, not plain CIDEr: n = 1..4 tf-idf vectors with
             the document frequency counted over the *references of the evaluated set* (idf =
             ``log(N_images) - log(max(1, df))``); in ``sim()`` the candidate's tf-idf is clipped
             by the reference's (``min(vec_hyp, vec_ref) * vec_ref``, "vrama91: added clipping"),
             multiplied by the Gaussian length penalty ``exp(-(l_hyp - l_ref)^2 / (2 sigma^2))``
             with ``sigma = 6.0`` (``Cider.__init__``), averaged over n and over the references,
             and multiplied by 10 (``score_avg *= 10.0``). Stemming is not applied. Two
             consequences: the score of a caption depends on the whole evaluated set (compare
             numbers on the same split only), and a set of one image has every idf ``log(1) - 0
             = 0``, so its CIDEr-D is 0 whatever the caption. (The lengths are counted in
             bigrams, i.e. words - 1, which gives the same difference for non-empty captions.)
``METEOR``   opt-in (``meteor=True``): pycocoevalcap's wrapper of METEOR 1.5, a Java program
             (``java -jar meteor-1.5.jar -l en -norm``), so it runs only when ``java`` is on PATH
             (about 15 s to start: it loads a 60 MB English paraphrase table). It is tuned for
             English: on Chinese tokens only its exact-match stage can fire (the stemmer, WordNet
             synonyms and paraphrase table are English) with English-tuned weights. The AIC-ICC
             leaderboard computed it the same way (jieba tokens into this jar), which is the one
             reason to ask for it; it is not a Chinese METEOR.

Left out: SPICE (needs Stanford CoreNLP downloads and an English scene-graph parser, meaningless
on Chinese) and PTBTokenizer (Java, English rules; it would split nothing in Chinese text).

Tokenisation (``tokenize=``), applied the same way to references and hypotheses:

``jieba``  word segmentation with jieba's default dictionary and HMM for unknown words (what the
           AIC-ICC evaluation kit does); deterministic for a given jieba version. The text is
           first NFKC-normalised (full-width letters and digits become ASCII) and lower-cased;
           whitespace and tokens made only of punctuation (Unicode category P*, e.g. ``，。！``)
           are dropped, as the COCO tokenizer drops punctuation.
``char``   one token per CJK character (code points from U+2E80 on: ideographs, kana, Hangul);
           a run of other letters or digits is one token (``"T恤"`` -> ``T 恤``, ``"NBA球员"`` ->
           ``nba 球 员``); same normalisation and punctuation rule as ``jieba``; other symbols are
           one token each.
``none``   the texts are already tokenised: split on whitespace, nothing else changed.

jieba is loaded once per process into a private ``jieba.Tokenizer`` (the global ``jieba.dt`` and
any words a user added to it are left alone), with jieba's logger silenced while it builds its
prefix dictionary, and its dictionary cache (a ``marshal`` file) kept in
``$XDG_CACHE_HOME/r2d2/jieba`` (default ``~/.cache/r2d2/jieba``) rather than the shared system
temp folder jieba would use; when that folder cannot be created, the system temp folder is used.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import unicodedata
from collections.abc import Hashable, Mapping

from r2d2.engine.errors import UsageError

TOKENIZERS = ("jieba", "char", "none")
METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D")
"""the keys :func:`score_captions` returns, in table order (``METEOR`` is added after ``ROUGE-L``
when requested)"""
CIDER_SIGMA = 6.0
"""the Gaussian length-penalty width of CIDEr-D (pycocoevalcap's default, passed explicitly)"""

_CJK_START = 0x2E80  # CJK radicals; everything from here on (kana, Hangul, ideographs, ...) is
# written without spaces between words, so each character is its own token in ``char`` mode


class MetricUnavailable(RuntimeError, UsageError):
    """A metric was asked for whose dependency is missing (the caption extra, or Java for
    METEOR): one line naming what to install; exit status 2."""


# ------------------------------------------------------------------------------ tokenisation
_jieba_lock = threading.Lock()
_jieba_tokenizer = None


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "r2d2", "jieba")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:  # read-only home (some clusters): jieba's own default
        return tempfile.gettempdir()
    return path if os.access(path, os.W_OK) else tempfile.gettempdir()


def _jieba():
    """The process's jieba tokenizer, initialised once (thread-safe) without printing."""
    global _jieba_tokenizer
    with _jieba_lock:
        if _jieba_tokenizer is None:
            try:
                import jieba
            except ImportError:
                raise MetricUnavailable(
                    "caption metrics with tokenize='jieba' need the jieba package "
                    "(pip install 'r2d2-engine[caption]'), or use tokenize='char'"
                ) from None
            logger = jieba.default_logger  # jieba logs "Building prefix dict ..." at DEBUG
            level = logger.level
            logger.setLevel(logging.ERROR)
            try:
                tok = jieba.Tokenizer()
                tok.tmp_dir = _cache_dir()
                tok.initialize()
            finally:
                logger.setLevel(level)
            _jieba_tokenizer = tok
        return _jieba_tokenizer


def _is_punct(token: str) -> bool:
    return all(unicodedata.category(ch).startswith("P") for ch in token)


def _normalise(text: str) -> str:
    return unicodedata.normalize("NFKC", text).lower()


def _char_tokens(text: str) -> list[str]:
    tokens: list[str] = []
    run: list[str] = []  # the current run of non-CJK letters/digits

    def flush() -> None:
        if run:
            tokens.append("".join(run))
            run.clear()

    for ch in text:
        if ch.isalnum() and ord(ch) < _CJK_START:
            run.append(ch)
            continue
        flush()
        if ch.isspace() or unicodedata.category(ch).startswith("P"):
            continue
        tokens.append(ch)
    flush()
    return tokens


def tokenize_caption(text: str, mode: str = "jieba") -> list[str]:
    """The tokens of one caption under ``mode`` (see the module docstring); never contains
    whitespace inside a token, so ``" ".join`` of it splits back to the same list."""
    if mode == "none":
        return text.split()
    if mode == "char":
        return _char_tokens(_normalise(text))
    if mode == "jieba":
        words = _jieba().cut(_normalise(text), HMM=True)
        # jieba keeps whitespace as tokens (and may keep a space inside none): split once more
        return [w for t in words for w in t.split() if not _is_punct(w)]
    raise ValueError(f"tokenize={mode!r}: expected one of {TOKENIZERS}")


# ------------------------------------------------------------------------------ validation
def _describe(ids, limit: int = 5) -> str:
    ids = sorted(ids, key=str)
    more = f" (and {len(ids) - limit} more)" if len(ids) > limit else ""
    return ", ".join(repr(i) for i in ids[:limit]) + more


def _check(references: Mapping, hypotheses: Mapping) -> None:
    if not isinstance(references, Mapping) or not isinstance(hypotheses, Mapping):
        raise TypeError("references and hypotheses must be dicts keyed by image id")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    no_refs = set(hypotheses) - set(references)
    no_hyp = set(references) - set(hypotheses)
    if no_refs or no_hyp:
        parts = []
        if no_refs:
            parts.append(f"hypotheses without references: {_describe(no_refs)}")
        if no_hyp:
            parts.append(f"references without a hypothesis: {_describe(no_hyp)}")
        raise ValueError("caption ids do not match; " + "; ".join(parts))
    for key, hyp in hypotheses.items():
        if not isinstance(hyp, str):
            raise ValueError(f"hypothesis of id {key!r} must be a string, got {type(hyp).__name__}")
    for key, refs in references.items():
        if isinstance(refs, str) or not isinstance(refs, (list, tuple)) or not refs:
            raise ValueError(
                f"references of id {key!r} must be a non-empty list of strings, got {refs!r:.60}"
            )
        for n, ref in enumerate(refs):
            if not isinstance(ref, str) or not ref.strip():
                raise ValueError(f"reference {n} of id {key!r} is not a non-blank string: {ref!r}")


# ------------------------------------------------------------------------------ scoring
def _scorers():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        raise MetricUnavailable(
            "caption metrics need the pycocoevalcap package (pip install 'r2d2-engine[caption]')"
        ) from None
    return Bleu, Rouge, Cider


def _meteor(gts: dict, res: dict) -> float:
    if shutil.which("java") is None:
        raise MetricUnavailable(
            "meteor=True needs `java` on PATH (METEOR 1.5 is a Java program); install a Java "
            "runtime or leave METEOR out"
        )
    from pycocoevalcap.meteor.meteor import Meteor

    # The jar reads '|||' as a field separator; pycocoevalcap strips it from hypotheses only.
    gts = {k: [r.replace("|||", "") for r in v] for k, v in gts.items()}
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    finally:
        del scorer  # its __del__ ends the java process now, not at some later collection
    return float(score)


def score_captions(
    references: Mapping[Hashable, list[str]],
    hypotheses: Mapping[Hashable, str],
    tokenize: str = "jieba",
    meteor: bool = False,
) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr-D (x100) of ``hypotheses`` against ``references``.

    ``references``: image id -> the image's reference captions (a non-empty list of non-blank
    strings); ``hypotheses``: image id -> the generated caption (may be empty: it scores 0). The
    two must have the same ids (a ``ValueError`` names the ones that differ); their order does
    not matter (ids are sorted before scoring, so even the floating-point sums are the same).
    ``tokenize``: ``jieba`` | ``char`` | ``none`` (module docstring). ``meteor``: add ``METEOR``
    (x100; needs Java, English-tuned, see the module docstring).

    Returns ``{"BLEU-1": .., "BLEU-2": .., "BLEU-3": .., "BLEU-4": .., "ROUGE-L": ..,
    ["METEOR": ..,] "CIDEr-D": ..}`` as Python floats. CIDEr-D's idf is taken from these
    references, so it needs the whole split (and at least two images) to mean anything.
    """
    if tokenize not in TOKENIZERS:
        raise ValueError(f"tokenize={tokenize!r}: expected one of {TOKENIZERS}")
    _check(references, hypotheses)
    Bleu, Rouge, Cider = _scorers()

    def join(text: str) -> str:
        return " ".join(tokenize_caption(text, tokenize))

    ids = sorted(hypotheses, key=lambda k: (type(k).__name__, str(k)))
    # pycocoevalcap's format: id -> list of tokenised strings (one for the hypothesis)
    gts = {k: [join(r) for r in references[k]] for k in ids}
    res = {k: [join(hypotheses[k])] for k in ids}

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # verbose=1 prints to stdout
    rouge, _ = Rouge().compute_score(gts, res)
    if any(r for refs in gts.values() for r in refs):
        cider, _ = Cider(n=4, sigma=CIDER_SIGMA).compute_score(gts, res)
    else:  # no reference has a token (all punctuation): pycocoevalcap would fail on max(())
        cider = 0.0
    scores = {f"BLEU-{n + 1}": 100.0 * float(b) for n, b in enumerate(bleu)}
    scores["ROUGE-L"] = 100.0 * float(rouge)
    if meteor:
        scores["METEOR"] = 100.0 * _meteor(gts, res)
    scores["CIDEr-D"] = 100.0 * float(cider)
    return scores


def format_table(scores: Mapping[str, float], digits: int = 1) -> str:
    """Two aligned lines for stdout: the metric names and their values (x100, ``digits``
    decimals), in the order of ``scores``."""
    cells = [(name, f"{value:.{digits}f}") for name, value in scores.items()]
    widths = [max(len(n), len(v)) for n, v in cells]
    head = "  ".join(n.rjust(w) for (n, _), w in zip(cells, widths))
    row = "  ".join(v.rjust(w) for (_, v), w in zip(cells, widths))
    return f"{head}\n{row}"
