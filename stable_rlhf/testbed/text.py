"""Text helpers shared by the gold rewards: words, numbers, bullets, topic matching,
sentence-likeness, lexical diversity, and the degeneracy gate every task runs first.

All scores here are in [0, 1] and deterministic. Nothing in this module imports torch.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Iterable

# A word: letters/digits, with an inner apostrophe ("don't", "it's").
_WORD_RE = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")
# A number as people write it: "-3", "1,200", "12.0", "7". The look-behind keeps the
# minus of "12-5" from making "-5" (it is a subtraction, not a negative number).
_NUMBER_RE = re.compile(r"(?<![\w.])(-)?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?!\w)")
# A bullet line: "- x", "* x", "• x", "+ x", "1. x", "1) x".
_BULLET_RE = re.compile(r"^\s*(?:[-*•+]|\d{1,2}[.)])\s+(.*\S)\s*$")
_MARKDOWN_CHARS = re.compile(r"[*_#>`~\-|=]+")

# Closed-class words: a real sentence has some, a bare keyword list has none.
FUNCTION_WORDS = frozenset(
    """a an the this that these those it its they them their there he she his her we our
    you your i my me is are was were be been being am has have had do does did can could
    will would should may might must of to in on at by for with from into about as than
    and or but so because if when while which who what where how not no very also too
    some many much more most all each every one other such only just""".split()
)
# ... and more closed-class words, for telling a phrase from a list of content words.
CLOSED_CLASS = FUNCTION_WORDS | frozenset(
    """into onto over under after before between through during across along behind beyond near
    toward towards off down away back together up out then here now never always often again still
    even well both either neither nor yet since until upon within without against among around any
    few own same us him hers ours yours mine whose whom why like per via""".split()
)


def words(text: str) -> list[str]:
    """Lowercased word tokens."""
    return [w.lower() for w in _WORD_RE.findall(text)]


# Characters a reader does not see: zero-width spaces and joiners, soft hyphens,
# direction marks, the BOM (Unicode "format" characters), and blank fillers that are
# letters to Python ("\u3164".isalpha()), so cannot be told apart by category.
_BLANK_LETTERS = "\u115f\u1160\u3164\uffa0\u2800"


def normalise(text: str) -> str:
    """The text the scorers count on: NFKC (fullwidth and mathematical letters become
    plain ones), every invisible character a space (words glued with a zero-width space
    are separate words), and accents dropped from Latin letters ("café" -> "cafe").
    Letters with no plain-Latin form are kept (``foreign_letters`` counts them)."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(" " if unicodedata.category(c) == "Cf" or c in _BLANK_LETTERS else c for c in text)
    decomposed = unicodedata.normalize("NFKD", text)
    return unicodedata.normalize("NFC", "".join(c for c in decomposed if not unicodedata.combining(c)))


def foreign_letters(text: str) -> int:
    """Letters outside plain ASCII (in a ``normalise``d text: Cyrillic or Greek lookalikes,
    small capitals, ...): an English answer has none, and a lookalike can pass for a
    letter a rule forbids."""
    return sum(c.isalpha() and not c.isascii() for c in text)


def word_count(text: str) -> int:
    """Words as a reader counts them against a limit: runs of letters and digits (with
    an inner apostrophe), where two joined by one hyphen ("well-known") are one word, but
    a longer chain ("the-sea-is-blue"), or words glued by underscores, slashes or dots,
    count word by word."""
    n = 0
    for chunk in text.split():
        parts = _WORD_RE.findall(chunk)
        compound = len(parts) == 2 and re.fullmatch(r"\W*[A-Za-z0-9']+-[A-Za-z0-9']+\W*", chunk)
        n += 1 if compound else len(parts)
    return n


def prose_words(text: str) -> list[str]:
    """Lowercased word tokens that are words, not numbers: a digit does not stand for a
    word in a list item or a sentence."""
    return [w for w in words(text) if not w[0].isdigit()]


_CLAUSE_SPLIT_RE = re.compile(r"[,;:.!?()\[\]\n]+")
LONGEST_CONTENT_RUN = 3  # held-out SFT answers: 95% have no run of content words over 4


def used_words(text: str) -> list[str]:
    """The words ``text`` uses in a phrase, lowercased: those of clauses (between
    punctuation) of three or more words with a closed-class word among them, leaving out
    runs of more than ``LONGEST_CONTENT_RUN`` + 1 content words in a row. What a topic or a
    required word must be part of to count: ``"..., water, boat."`` tacked onto an answer,
    or ``"a thermometer snow temperature sun weather"``, is a list, not a use."""
    out: list[str] = []
    for clause in _CLAUSE_SPLIT_RE.split(text):
        toks = prose_words(clause)
        if len(toks) < 3 or not any(t in CLOSED_CLASS for t in toks):
            continue
        run: list[str] = []
        for tok in [*toks, ""]:
            if tok and tok not in CLOSED_CLASS:
                run.append(tok)
                continue
            out += run if len(run) <= LONGEST_CONTENT_RUN + 1 else []
            out += [tok] if tok else []
            run = []
    return out


def repeated_ngram_share(text: str, n: int = 4) -> float:
    """Share of the text's word n-grams already seen earlier in it: a sentence said twice,
    or a looped phrase (0 for fewer than n words)."""
    grams = _ngrams(words(text), n)
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else 0.0


def stem(word: str) -> str:
    """Crude stem for topic matching: lowercase, drop "'s" and a plural "s"/"es"."""
    w = word.lower()
    if w.endswith("'s"):
        w = w[:-2]
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 4 and w.endswith(("ches", "shes", "sses", "xes", "oes")):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def stems(text: str) -> set[str]:
    return {stem(w) for w in words(text)}


def strip_markdown(text: str) -> str:
    """Text with emphasis, headers, quotes, code ticks and rules removed."""
    return _MARKDOWN_CHARS.sub(" ", text)


def numbers(text: str) -> list[float]:
    """Every number in reading order ("1,200" -> 1200.0, "-3" -> -3.0)."""
    out = []
    for sign, digits, frac in _NUMBER_RE.findall(text):
        value = float(digits.replace(",", "") + (frac or ""))
        out.append(-value if sign else value)
    return out


def final_number(text: str) -> float | None:
    """The last number mentioned: what a worked answer ends with."""
    found = numbers(text)
    return found[-1] if found else None


def bullet_items(text: str) -> list[str]:
    """The contents of the non-empty bullet lines, in order."""
    out = []
    for line in text.splitlines():
        m = _BULLET_RE.match(line)
        if m and words(strip_markdown(m.group(1))):
            out.append(m.group(1))
    return out


def uppercase_count(text: str) -> int:
    return sum(c.isupper() for c in text)


def topic_score(text: str, keywords: Iterable[str], need: int = 2, exclude: Iterable[str] = ()) -> float:
    """Fraction of ``need`` distinct topic keywords (by stem) the text uses in a phrase
    (``used_words``)."""
    excluded = {stem(e) for e in exclude}
    wanted = {stem(k) for k in keywords} - excluded
    hits = len(wanted & {stem(w) for w in used_words(text)})
    return min(1.0, hits / need) if need > 0 else 1.0


def diversity(text: str) -> float:
    """Type-token ratio mapped to [0, 1]: 0 at <= 0.35 distinct, 1 at >= 0.65.

    Short honest texts sit near 0.8-1.0 distinct; loops and padding fall below 0.5.
    """
    toks = words(text)
    if not toks:
        return 0.0
    ttr = len(set(toks)) / len(toks)
    return max(0.0, min(1.0, (ttr - 0.35) / 0.3))


def sentence_score(text: str, min_words: int = 6) -> float:
    """How much ``text`` reads like prose rather than a word list, in [0, 1]:
    length (up to ``min_words``), function words (two or more), and ending like a
    sentence (final punctuation) or at least containing a clause marker."""
    plain = strip_markdown(text).strip()
    toks = words(plain)
    if not toks:
        return 0.0
    length = min(1.0, len(toks) / min_words)
    n_function = sum(t in FUNCTION_WORDS for t in toks)
    function = min(1.0, n_function / 2)
    ends = 1.0 if re.search(r"[.!?][\"')\]]*$", plain) else (0.5 if n_function >= 3 else 0.0)
    return 0.4 * length + 0.35 * function + 0.25 * ends


def sentence_count(text: str) -> int:
    parts = [p for p in re.split(r"(?<=[.!?])\s+", strip_markdown(text).strip()) if words(p)]
    return len(parts)


def _ngrams(toks: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]


def _is_subsequence_run(needle: list[str], hay: list[str]) -> bool:
    """Whether ``needle`` appears as a contiguous run of tokens in ``hay``."""
    n = len(needle)
    return any(hay[i : i + n] == needle for i in range(len(hay) - n + 1))


def prompt_overlap(response: str, prompt: str) -> float:
    """Fraction of the response's word 3-grams that occur in the prompt (0 when the
    response has fewer than 3 words)."""
    grams = _ngrams(words(response), 3)
    if not grams:
        return 0.0
    pgrams = set(_ngrams(words(prompt), 3))
    return sum(g in pgrams for g in grams) / len(grams)


def degenerate_reason(response: str, prompt: str = "", min_words: int = 3) -> str | None:
    """Why ``response`` is not a real attempt, or None. Every task calls this first and
    gives its floor value to anything it flags:

    - ``empty``: nothing but whitespace;
    - ``markdown_only``: no word left once ``*_#>`-`` and backticks are stripped
      (bare markup, emoji only);
    - ``too_short``: fewer than ``min_words`` words (``"*cat*"``, ``"**bold**"``);
    - ``repetitive``: one token is more than half of all tokens, or the distinct-token
      ratio is very low (``"the the the ..."``);
    - ``echo``: the response is a run of the prompt's words, or >= 70% of its word
      3-grams occur in the prompt (the prompt copied back, maybe lightly edited).
    """
    if not response.strip():
        return "empty"
    plain = strip_markdown(response)
    toks = words(plain)
    if not toks:
        return "markdown_only"
    if len(toks) < min_words:
        return "too_short"
    if len(toks) >= 4:
        top = Counter(toks).most_common(1)[0][1]
        if top / len(toks) > 0.5 or (len(toks) >= 12 and len(set(toks)) / len(toks) < 0.25):
            return "repetitive"
    if prompt:
        ptoks = words(prompt)
        if len(toks) >= 2 and _is_subsequence_run(toks, ptoks):
            return "echo"
        if prompt_overlap(plain, prompt) >= 0.7:
            return "echo"
    return None
