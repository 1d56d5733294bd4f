"""The gold reward's fluency judge: its maths by hand, the shipped model reproducible from
the shipped data, and the separation it exists for (SFT prose against salads and shuffles)."""

import json
import math
import random
from pathlib import Path

import pytest

from stable_rlhf.testbed import fluency as F

ROOT = Path(__file__).resolve().parent.parent


def test_coherence_is_witten_bell_pmi_by_hand():
    # One content word, seen twice as a whole text: "<s> <s> C </s>".
    model = F.FluencyModel(
        unigrams={"C": 2, "</s>": 2},
        bigrams={("<s>", "C"): 2, ("C", "</s>"): 2},
        trigrams={("<s>", "<s>", "C"): 2, ("<s>", "C", "</s>"): 2},
        own=frozenset(),
    )
    p1 = 2.5 / (4 + 0.5 * 3)  # add-1/2 unigram, 3 types counting the unseen one
    p3 = (2 + (2 + p1) / 3) / 3  # every context was followed by 1 distinct class in 2 tokens
    assert model.coherence("cat") == pytest.approx(math.log2(p3 / p1))
    # An unseen context falls back to the shorter one; an unseen class is unlikely.
    assert model.coherence("the") < 0 < model.coherence("cat")


def test_word_classes():
    assert F.classes("The cats were running quickly, 12 times!\n") == [
        "the", "Cs", "were", "Cing", "Cly", "P,", "NUM", "Cs", "P!", "NL"]
    assert F.classes("red fly sing xkcdq") == ["C", "C", "C", "ODD"]
    assert F.classes("onto the", own=frozenset({"the"})) == ["F", "the"]


def test_shipped_model_is_the_fit_of_the_shipped_data():
    model, report = F.calibrate(F.FluencyModel.fit(F.fit_texts(ROOT)),
                                F.read_responses(ROOT / F.HELD_OUT, "response"))
    assert json.loads(F.MODEL_PATH.read_text()) == json.loads(json.dumps(model.to_json()))
    # The bands sit between held-out SFT answers and shuffled copies of them.
    assert report["sft"]["p1"] > F.COHERENT > F.INCOHERENT > report["shuffled"]["p50"]


def test_sft_prose_passes_and_salads_and_shuffles_do_not():
    held_out = F.read_responses(ROOT / F.HELD_OUT, "response")
    scores = [F.fluency(t) for t in held_out]
    assert sum(s == 1.0 for s in scores) / len(scores) > 0.9
    rng = random.Random(0)
    shuffled = []
    for text in held_out:
        words = text.split()
        rng.shuffle(words)
        shuffled.append(F.fluency(" ".join(words)))
    assert sorted(shuffled)[len(shuffled) // 2] == 0.0
    assert sum(shuffled) / len(shuffled) < 0.25
    for salad in ("ocean sea water wave salt fish tide beach whale coral",
                  "Ocean, sea, water, wave, salt, fish, tide.",
                  "the of and is to a in that it for on with as",
                  "1 2 3 4 5 6 7 8 9 10 11",
                  "deep the is ocean blue very and"):
        assert F.fluency(salad) == 0.0, salad
    for plain in ("Cats sleep most of the day.", "The weekend was fun.",
                  "Every day the deep ocean carries sand onto the beach."):
        assert F.fluency(plain) == 1.0, plain
    # One function word before each keyword reads well to a trigram model; it has no two
    # words of a kind side by side, which a plain sentence of six words may also lack.
    assert F.fluency("in snow the snowman by sled in winter but frost.") < 0.3
    assert F.fluency("My car is red and fast.") > 0.8
