"""A fluency judge for the gold reward, independent of the policy being trained.

A gold reward that counts words, keywords or capital letters can be gamed by text that
is not language: keyword salads, function-word salads, digits standing for words,
shuffled sentences. This judge asks whether a text's *word order* reads like prose. It
is a trigram model over word classes (each function word is its own class; content
words fall into a few suffix classes; numbers, punctuation and line breaks have their
own), fitted on the SFT policy's shipped samples, and it scores a text by its
**coherence**: the mean, over tokens, of log2 p(class | two previous classes) minus
log2 p(class), in bits. Prose, where the context predicts the next class, sits above
0; a salad or a shuffle, where it does not, sits well below (measured on the shipped
held-out samples: SFT answers' 5th percentile +0.02 bits, word-shuffled SFT answers'
90th percentile -1.65). A second check is the share of function words: prose has 0.3
to 0.6 of them, a keyword list none and a function-word salad nothing else.

The model is a small table of counts shipped in ``fluency_model.json``, rebuilt by
``python -m stable_rlhf.testbed.fluency`` from the shipped preference data (the tests
check that a refit reproduces it). Nothing here imports torch; every score is a pure,
deterministic function of the text.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from ..io import atomic_write_text
from .text import CLOSED_CLASS

MODEL_PATH = Path(__file__).with_name("fluency_model.json")
# The shipped data the model is fitted on: training comparisons only (the held-out
# samples_eval.jsonl calibrates the bands below), code answers left out.
FIT_SOURCES = ("data/testbed/preferences_train.jsonl", "data/testbed_large/preferences_train.jsonl")
HELD_OUT = "data/testbed/samples_eval.jsonl"

CLASS_WORDS = CLOSED_CLASS  # each frequent one is a class of its own
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[.,!?;:()\"]|\n")
_BOS, _EOS = "<s>", "</s>"
# A function word seen fewer times than this in the fitting texts shares the class "F":
# its own trigram counts would be too few to judge by ("onto", "every").
MIN_OWN_CLASS = 100

# Coherence (bits per token, after shrinking by PRIOR_TOKENS towards the median of
# held-out SFT answers): full credit from COHERENT up, none at INCOHERENT and below.
# ``python -m stable_rlhf.testbed.fluency`` prints where the held-out SFT answers and
# word-shuffled copies of them fall (at the fit shipped: SFT 1st percentile +0.35,
# shuffled median -1.34 and 90th percentile -0.66).
COHERENT, INCOHERENT = 0.0, -1.0
PRIOR_TOKENS = 4
# Same-kind word pairs (``mixing``), shrunk by MIXING_PSEUDO_PAIRS towards MIXING_PRIOR
# (the held-out SFT median): full credit from MIXING_FULL up, none at MIXING_NONE. The
# raw share of the held-out SFT answers is 0.12 at the least; a six-word plain sentence
# can have none ("My car is red and fast." shrinks to 0.09).
MIXING_PRIOR, MIXING_PSEUDO_PAIRS = 0.33, 2
MIXING_NONE, MIXING_FULL = 0.05, 0.1
# Function-word share: full credit inside [FW_LOW, FW_HIGH], none at FW_NONE_LOW or
# FW_NONE_HIGH (SFT answers: 5th percentile 0.29, 99th 0.66).
FW_NONE_LOW, FW_LOW, FW_HIGH, FW_NONE_HIGH = 0.05, 0.2, 0.7, 0.9


def word_class(token: str, own: frozenset[str] = CLASS_WORDS) -> str:
    """The class of one lowercased token: a function word in ``own`` stands for itself,
    any other function word for ``F``; a content word for its suffix shape; numbers,
    punctuation and line breaks for themselves; anything that does not look like an
    English word is ``ODD``."""
    if token == "\n":
        return "NL"
    if not token[0].isalnum():
        return "P" + token
    if token.isdigit():
        return "NUM"
    if token in CLASS_WORDS:
        return token if token in own else "F"
    if len(token) > 20 or re.search(r"\d", token) or not re.search(r"[aeiouy]", token):
        return "ODD"
    if len(token) > 4:  # "red", "fly", "sing" are not suffixed forms
        for suffix in ("ing", "ed", "ly"):
            if token.endswith(suffix):
                return "C" + suffix
    return "Cs" if len(token) > 3 and token.endswith("s") and not token.endswith(("ss", "us", "is")) else "C"


def _tokens(text: str) -> list[str]:
    return _TOKEN_RE.findall(unicodedata.normalize("NFKC", text).lower())


def classes(text: str, own: frozenset[str] = CLASS_WORDS) -> list[str]:
    """The text's class sequence (NFKC, lowercased), without sentence markers."""
    return [word_class(t, own) for t in _tokens(text)]


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, so lru_cache can key on it
class FluencyModel:
    """Counts of class unigrams, bigrams and trigrams (with two start markers)."""

    unigrams: dict[str, int]
    bigrams: dict[tuple[str, str], int]
    trigrams: dict[tuple[str, str, str], int]
    own: frozenset[str]  # the function words frequent enough to be their own class
    prior: float = 0.0  # median coherence of held-out SFT answers: what a short text shrinks to

    @classmethod
    def fit(cls, texts: Iterable[str]) -> "FluencyModel":
        texts = list(texts)
        seen = Counter(t for text in texts for t in _tokens(text) if t in CLASS_WORDS)
        own = frozenset(w for w, n in seen.items() if n >= MIN_OWN_CLASS)
        uni, bi, tri = Counter(), Counter(), Counter()
        for text in texts:
            seq = [_BOS, _BOS, *classes(text, own), _EOS]
            for i in range(2, len(seq)):
                uni[seq[i]] += 1
                bi[seq[i - 1], seq[i]] += 1
                tri[seq[i - 2], seq[i - 1], seq[i]] += 1
        return cls(dict(uni), dict(bi), dict(tri), own)

    def coherence(self, text: str) -> float:
        """Mean over tokens of log2 p(class | two previous) - log2 p(class), in bits.

        p is Witten-Bell interpolated (trigram -> bigram -> add-1/2 unigram): a context
        followed by T distinct classes in N tokens gives its own estimate weight
        N / (N + T), so a class never seen after a common context is unlikely, and one
        after a rare context falls back on the shorter context.
        """
        n_total = sum(self.unigrams.values())
        n_types = len(self.unigrams) + 1
        ctx1, ctx2 = _contexts(self)
        seq = [_BOS, _BOS, *classes(text, self.own), _EOS]
        total = 0.0
        for i in range(2, len(seq)):
            c, prev, prev2 = seq[i], seq[i - 1], seq[i - 2]
            p1 = (self.unigrams.get(c, 0) + 0.5) / (n_total + 0.5 * n_types)
            n1, t1 = ctx1.get(prev, (0, 0))
            p2 = (self.bigrams.get((prev, c), 0) + t1 * p1) / (n1 + t1) if n1 else p1
            n2, t2 = ctx2.get((prev2, prev), (0, 0))
            p3 = (self.trigrams.get((prev2, prev, c), 0) + t2 * p2) / (n2 + t2) if n2 else p2
            total += math.log2(p3 / p1)
        return total / (len(seq) - 2)

    def shrunk_coherence(self, text: str) -> float:
        """``coherence`` pulled towards ``prior`` by ``PRIOR_TOKENS`` pseudo-tokens: a class
        model judges five words far less surely than fifty, and without this a short
        plain sentence ("Cats sleep most of the day.") was judged by one rare trigram."""
        n = len(classes(text, self.own)) + 1
        return (n * self.coherence(text) + PRIOR_TOKENS * self.prior) / (n + PRIOR_TOKENS)

    def to_json(self) -> dict:
        return {
            "unigrams": dict(sorted(self.unigrams.items())),
            "bigrams": [[*k, v] for k, v in sorted(self.bigrams.items())],
            "trigrams": [[*k, v] for k, v in sorted(self.trigrams.items())],
            "own": sorted(self.own),
            "prior": self.prior,
        }

    @classmethod
    def from_json(cls, data: dict) -> "FluencyModel":
        return cls(
            dict(data["unigrams"]),
            {(a, b): n for a, b, n in data["bigrams"]},
            {(a, b, c): n for a, b, c, n in data["trigrams"]},
            frozenset(data["own"]),
            data["prior"],
        )


@lru_cache(maxsize=4)
def _contexts(model: FluencyModel) -> tuple[dict, dict]:
    """For each one- and two-class context: (tokens seen after it, distinct classes seen after it)."""
    ctx1: dict = {}
    ctx2: dict = {}
    for (a, _), n in model.bigrams.items():
        count, types = ctx1.get(a, (0, 0))
        ctx1[a] = (count + n, types + 1)
    for (a, b, _), n in model.trigrams.items():
        count, types = ctx2.get((a, b), (0, 0))
        ctx2[a, b] = (count + n, types + 1)
    return ctx1, ctx2


@lru_cache(maxsize=1)
def shipped_model() -> FluencyModel:
    return FluencyModel.from_json(json.loads(MODEL_PATH.read_text()))


def _ramp(x: float, zero: float, full: float) -> float:
    """0 at ``zero``, 1 at ``full``, linear between (either order)."""
    return max(0.0, min(1.0, (x - zero) / (full - zero)))


def _closed_class_flags(text: str, own: frozenset[str]) -> list[bool]:
    """For each word (numbers and punctuation aside): whether it is a closed-class word."""
    return [c in CLASS_WORDS or c == "F" for c in classes(text, own)
            if c not in ("NL", "NUM") and not c.startswith("P")]


def function_share(text: str, own: frozenset[str] = CLASS_WORDS) -> float:
    """Share of the words (numbers aside) that are function words; 0 when there is none."""
    flags = _closed_class_flags(text, own)
    return sum(flags) / len(flags) if flags else 0.0


def mixing(text: str, own: frozenset[str] = CLASS_WORDS) -> float:
    """Share of adjacent word pairs of the same kind (two function words, "of the"; two
    content words, "sea water"), shrunk towards ``MIXING_PRIOR`` by ``MIXING_PSEUDO_PAIRS``.
    English has both; a salad that puts one function word before each keyword ("in snow
    the snowman by sled") has none, and reads well to a trigram model."""
    flags = _closed_class_flags(text, own)
    same = sum(a == b for a, b in zip(flags, flags[1:]))
    return (same + MIXING_PSEUDO_PAIRS * MIXING_PRIOR) / (max(0, len(flags) - 1) + MIXING_PSEUDO_PAIRS)


def fluency_details(text: str, model: FluencyModel | None = None) -> dict:
    """``{"fluency", "coherence", "function_share", "mixing"}``: fluency in [0, 1] is the
    product of the coherence, function-word and mixing bands."""
    model = model or shipped_model()
    coherence = model.shrunk_coherence(text)
    share = function_share(text, model.own)
    mix = mixing(text, model.own)
    band = _ramp(share, FW_NONE_LOW, FW_LOW) * _ramp(share, FW_NONE_HIGH, FW_HIGH)
    return {"fluency": _ramp(coherence, INCOHERENT, COHERENT) * band * _ramp(mix, MIXING_NONE, MIXING_FULL),
            "coherence": coherence, "function_share": share, "mixing": mix}


@lru_cache(maxsize=4096)
def fluency(text: str) -> float:
    """How much ``text`` reads like prose, in [0, 1] (see the module docstring). Cached: the
    gold reward asks it about the same text from its gate and from the task's scorer."""
    return fluency_details(text)["fluency"]


def fit_texts(root: Path) -> list[str]:
    """The distinct non-code responses of the shipped training comparisons, sorted."""
    texts: set[str] = set()
    for rel in FIT_SOURCES:
        texts.update(read_responses(root / rel, "responses"))
    return sorted(texts)


def read_responses(path: Path, field: str) -> list[str]:
    """The non-code answers in a JSONL file of records holding ``field`` (a string or a list)."""
    out: list[str] = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["task"] != "code":
            value = record[field]
            out.extend(value if isinstance(value, list) else [value])
    return out


def _percentiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {f"p{q}": round(values[round(q / 100 * (len(values) - 1))], 3) for q in (1, 5, 10, 25, 50, 75, 90)}


def calibrate(model: FluencyModel, held_out: list[str], seed: int = 0) -> tuple[FluencyModel, dict]:
    """The model with its prior set to the median coherence of ``held_out`` SFT answers, and
    where those answers and word-shuffled copies of them fall (percentiles of the shrunk
    coherence): the evidence for COHERENT and INCOHERENT."""
    raw = sorted(model.coherence(t) for t in held_out)
    model = dataclasses.replace(model, prior=round(raw[len(raw) // 2], 6))
    rng = random.Random(seed)

    def shuffled(text: str) -> str:
        words = text.split()
        rng.shuffle(words)
        return " ".join(words)

    report = {"sft": _percentiles([model.shrunk_coherence(t) for t in held_out]),
              "shuffled": _percentiles([model.shrunk_coherence(shuffled(t)) for t in held_out]),
              "sft_mixing": _percentiles([mixing(t, model.own) for t in held_out])}
    return model, report


def main(argv: list[str] | None = None) -> int:
    """Refit the shipped model from the shipped data: ``python -m stable_rlhf.testbed.fluency [ROOT]``."""
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0] if args else ".")
    texts = fit_texts(root)
    model, report = calibrate(FluencyModel.fit(texts), read_responses(root / HELD_OUT, "response"))
    atomic_write_text(MODEL_PATH, json.dumps(model.to_json(), separators=(",", ":")) + "\n")
    print(f"fitted on {len(texts)} texts: {len(model.trigrams)} class trigrams, prior {model.prior} -> {MODEL_PATH}")
    print(f"shrunk coherence of held-out SFT answers ({HELD_OUT}): {report['sft']}")
    print(f"... of the same answers word-shuffled: {report['shuffled']}")
    print(f"same-kind word pairs (mixing) of the held-out SFT answers: {report['sft_mixing']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
