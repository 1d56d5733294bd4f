"""Prompt generators for the testbed's task families, and disjoint splits.

A prompt record is ``{"id": "<task>-<hash>", "task": str, "prompt": str, "meta": {...}}``
where ``meta`` is JSON-serialisable and holds everything the gold reward needs (the
answer, the bullet count, the topic keywords, the hidden code tests, ...), so a record
read back from JSONL scores exactly as the one generated.

Each task draws from a space of thousands of distinct prompts (``prompt_capacity``) so
training does not cycle through a few dozen. Generation is deterministic given the
seed; the code family's hidden tests are seeded by the prompt text itself, so a prompt
always carries the same tests whichever run generated it.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from functools import lru_cache
from typing import Any, Callable

from dataclasses import dataclass

from .tasks import TASK_NAMES

# ----------------------------------------------------------------------- topics
# name -> (words that name the topic, related words). On-topic checks match the
# stems of both; the keywords task draws its required words from the related ones.
_TOPIC_TABLE = """
the ocean | ocean | sea water wave salt fish tide beach whale coral deep
bicycles | bicycle bike | wheel pedal ride chain helmet cycling road gear seat
volcanoes | volcano | lava eruption magma ash mountain crater erupt hot rock
coffee | coffee | bean cup caffeine brew morning espresso roast drink mug
the moon | moon | night sky orbit earth crater light lunar tide astronaut
gardening | garden gardening | plant soil seed flower water grow vegetable weed sun
elephants | elephant | trunk tusk large africa herd ivory animal gray memory
rain | rain | cloud water storm umbrella drop wet weather puddle sky
libraries | library | book read shelf quiet librarian borrow knowledge study card
trains | train | rail track station passenger travel engine railway ticket locomotive
chess | chess | board piece king queen pawn move game strategy checkmate
honeybees | bee honeybee | honey hive flower pollen queen wax buzz colony nectar
the desert | desert | sand dry hot cactus dune camel heat water sun
bread | bread | flour bake oven dough yeast loaf wheat slice crust
winter | winter | snow cold ice season december frost warm coat freeze
mountains | mountain | peak climb snow high hike rock summit valley trail
the piano | piano | key music play note sound instrument chord pianist melody
forests | forest | tree wood leaf animal green bird nature oak shade
recycling | recycling recycle | plastic waste paper bin glass reuse environment trash bottle
dogs | dog | pet bark puppy loyal walk tail friend owner leash
cats | cat | pet purr kitten whisker fur meow paw mouse claw
the sun | sun | light star heat energy sky solar warm day planet
rivers | river | water flow stream bank fish bridge valley current sea
football | football soccer | ball goal team player kick match field score fan
cooking | cooking cook | food kitchen recipe meal heat pan taste ingredient chef
the internet | internet | computer website online network information email connect data web
dinosaurs | dinosaur | fossil extinct reptile bone ancient giant egg million skeleton
music | music | song sound melody rhythm instrument sing listen band note
tea | tea | leaf cup hot drink green brew water herbal pot
airplanes | airplane plane | fly pilot wing airport flight sky travel passenger jet
the brain | brain | think memory neuron head mind nerve learn body intelligence
photography | photography photo | camera picture light lens image shoot capture color
butterflies | butterfly | wing caterpillar flower color insect flutter cocoon nectar garden
chocolate | chocolate | cocoa sweet candy milk dark sugar bar bean dessert
the city | city | street building people traffic park urban car busy town
sleep | sleep | bed night rest dream tired body brain pillow nap
robots | robot | machine computer program sensor arm metal automation build artificial
stars | star | sky night light galaxy space bright planet telescope shine
apples | apple | fruit tree red green sweet juice orchard pie seed
the weather | weather | rain sun wind cloud temperature forecast storm snow cold
museums | museum | art history exhibit visit painting collection gallery display ancient
swimming | swimming swim | water pool stroke lake exercise dive breath float
islands | island | sea water beach ocean boat sand tropical palm coast
whales | whale | ocean sea mammal swim large blue song water dolphin
farming | farm farming | crop farmer animal field cow harvest soil tractor grow
snow | snow | cold winter white ice flake snowman freeze sled frost
books | book | read page story author chapter library novel writing word
the wind | wind | air blow storm breeze weather kite sail turbine cold
running | running run | race exercise fast shoe marathon leg breath fit
birds | bird | fly wing feather nest egg song beak sky tree
"""


def _parse_topics() -> dict[str, dict[str, list[str]]]:
    out = {}
    for line in _TOPIC_TABLE.strip().splitlines():
        name, own, related = (part.split() for part in line.split("|"))
        out[" ".join(name)] = {"own": own, "related": related}
    return out


TOPICS: dict[str, dict[str, list[str]]] = _parse_topics()
TOPIC_NAMES: tuple[str, ...] = tuple(TOPICS)


def topic_keywords(topic: str) -> list[str]:
    """Words that show a text is about ``topic``: its own words plus related ones."""
    t = TOPICS[topic]
    return t["own"] + t["related"]


# -------------------------------------------------------------------- arithmetic
_NAMES = "Tom Anna Ben Maria Sam Lily Jack Emma Leo Sara Omar Mia Ravi Nora Liam Zoe Hugo Ada Ken Ivy".split()
_ITEMS = ("apples oranges marbles stickers pencils cookies books stamps cards shells coins "
          "balloons eggs cupcakes beads flowers candies crayons bottles toys").split()
_ARITH_SUFFIXES = (
    "Explain briefly and end with the final number.",
    "Show your work in a sentence or two and finish with the answer as a number.",
    "Explain your reasoning briefly and give the final number at the end.",
)
# Small numbers on purpose: SmolLM2-135M solved none of 32 sampled problems with
# operands up to 50, and about one in four with operands up to 12. A task the SFT
# policy never solves gives the reward model nothing to learn from.
_R = range(2, 21)  # operand range for additions and subtractions
_C = range(2, 10)  # third operand
_M, _K = range(2, 10), range(2, 11)  # small factors

# (template, number ranges, answer function, needs a second name, intermediate steps)
_ArithTemplate = tuple[str, tuple[range, ...], Callable[..., int], bool, Callable[..., list[int]]]
_NO_STEPS = lambda *nums: []  # noqa: E731  (one-operation problems)
_ARITH_TEMPLATES: list[_ArithTemplate] = [
    ("{name} has {a} {items} and buys {b} more. How many {items} does {name} have now?",
     (_R, _R), lambda a, b: a + b, False, _NO_STEPS),
    ("{name} has {a} {items} and gives {b} of them to a friend. How many {items} does {name} have left?",
     (_R, _R), lambda a, b: a - b, False, _NO_STEPS),
    ("{name} has {a} {items}, buys {b} more and gives away {c}. How many {items} does {name} have now?",
     (_R, _R, _C), lambda a, b, c: a + b - c, False, lambda a, b, c: [a + b]),
    ("{name} had {a} {items}, lost {b} of them and then found {c} more. How many {items} does {name} have now?",
     (_R, _R, _C), lambda a, b, c: a - b + c, False, lambda a, b, c: [a - b]),
    ("{name} buys {a} boxes of {items}. Each box holds {b} {items}. How many {items} does {name} buy in total?",
     (_M, _K), lambda a, b: a * b, False, _NO_STEPS),
    ("{name} has {a} bags with {b} {items} in each bag, plus {c} loose {items}. How many {items} does {name} have altogether?",
     (_M, _K, _C), lambda a, b, c: a * b + c, False, lambda a, b, c: [a * b]),
    ("{name} shares {a} {items} equally among {b} friends. How many {items} does each friend get?",
     (range(4, 61), _M), lambda a, b: a // b if a % b == 0 else -1, False, _NO_STEPS),
    ("A shop has {a} shelves with {b} {items} on each shelf. It sells {c} {items}. How many {items} are left?",
     (_M, _K, _C), lambda a, b, c: a * b - c, False, lambda a, b, c: [a * b]),
    ("{name} has {a} {items} and {name2} has {b} {items}. How many {items} do they have together?",
     (_R, _R), lambda a, b: a + b, True, _NO_STEPS),
    ("{name} has {a} {items} and {name2} has {b}. How many more {items} does {name} have than {name2}?",
     (_R, _R), lambda a, b: a - b, True, _NO_STEPS),
]


def _valid_operands(template_idx: int, nums: tuple[int, ...]) -> bool:
    """Positive whole answer that does not appear among the prompt's own numbers (so
    echoing a number from the prompt is never right). Division must be exact."""
    fn = _ARITH_TEMPLATES[template_idx][2]
    answer = fn(*nums)
    return answer > 0 and answer not in nums and not (template_idx == 6 and nums[0] % nums[1])


@lru_cache(maxsize=None)
def _valid_operand_tuples(template_idx: int) -> tuple[tuple[int, ...], ...]:
    ranges = _ARITH_TEMPLATES[template_idx][1]
    return tuple(t for t in itertools.product(*ranges) if _valid_operands(template_idx, t))


def _arith_record(rng: random.Random) -> dict:
    idx = rng.randrange(len(_ARITH_TEMPLATES))
    template, _, fn, _, steps = _ARITH_TEMPLATES[idx]
    nums = rng.choice(_valid_operand_tuples(idx))
    name, name2 = rng.sample(_NAMES, 2)
    items = rng.choice(_ITEMS)
    fields = dict(zip("abc", nums), name=name, name2=name2, items=items)
    prompt = template.format(**fields) + " " + rng.choice(_ARITH_SUFFIXES)
    meta = {"answer": fn(*nums), "operands": list(nums), "steps": steps(*nums), "template": idx}
    return _record("arithmetic", prompt, meta)


# -------------------------------------------------------------------------- code
# Each family is a simple function spec with parameterised variants (a threshold, a
# letter, a divisor, ...) and a trusted reference implementation that computes the
# hidden tests' expected outputs here, in our process. Only model code goes to the
# sandbox.


@dataclass(frozen=True)
class CodeFamily:
    key: str
    names: tuple[str, ...]  # function names; may contain "{p}" (the parameter)
    arg_kind: str  # "list", "str" or "int": the one argument (names in ARG_NAMES)
    spec_text: str  # what it does; "{a}" is the argument, "{p}" / "{p[0]}" the parameter
    params: tuple  # JSON-serialisable parameter values (None: no parameter)
    ref: Callable[[Any], Callable]  # parameter -> reference function
    inputs: Callable[[random.Random, Any], list[list]]  # rng, parameter -> argument lists

    def spec(self, param: Any, arg: str) -> str:
        return self.spec_text.format(p=param, a=arg)

    def func_name(self, name: str, param: Any) -> str:
        return name.format(p=param)


def _int_lists(nonempty: bool = False, lo: int = -10, hi: int = 40, max_len: int = 8):
    def make(rng: random.Random, param: Any) -> list[list]:
        lists = [] if nonempty else [[]]
        lists.append([rng.randint(lo, hi)])
        if isinstance(param, int):  # the boundary cases of a threshold or divisor
            lists.append([param, param + 1, 2 * param, param - 1])
        while len(lists) < 6:
            lists.append([rng.randint(lo, hi) for _ in range(rng.randint(2, max_len))])
        return [[x] for x in lists]
    return make


_VOCAB = ("hello world python level banana data apple queue radar sky jazz table river "
          "moon stars quick brown fox noon civic pizza kayak code test").split()


def _strings(rng: random.Random, param: Any) -> list[list]:
    out = ["", rng.choice(_VOCAB)]
    if isinstance(param, str):  # letter families: make sure the letter shows up
        out.append(f"{param}b{param}{param}c")
    while len(out) < 6:
        out.append(" ".join(rng.choice(_VOCAB) for _ in range(rng.randint(1, 4))))
    return [[s] for s in out]


def _small_ints(lo: int, hi: int):
    def make(rng: random.Random, _param: Any) -> list[list]:
        vals = [lo, lo + 1] + [rng.randint(lo, hi) for _ in range(4)]
        return [[v] for v in vals]
    return make


def _divisor_ints(rng: random.Random, param: Any) -> list[list]:
    k = param if isinstance(param, int) else 2
    vals = [0, k * rng.randint(1, 9), k * rng.randint(10, 30) + 1, rng.randint(1, 99), k + 1, 7 * k]
    return [[v] for v in vals]


def _fizz_ints(rng: random.Random, param: Any) -> list[list]:
    a, b = param[0], param[1]
    vals = [a * rng.choice([1, 5, 7]), b * rng.choice([1, 7, 11]), a * b * rng.randint(1, 3), 1,
            a * b + 1, rng.randint(1, 100)]
    return [[v] for v in vals]


def _clamp_ints(rng: random.Random, param: Any) -> list[list]:
    lo, hi = param
    vals = [lo - rng.randint(1, 10), hi + rng.randint(1, 10), rng.randint(lo, hi), lo, hi, (lo + hi) // 2]
    return [[v] for v in vals]


def _fizz(p):
    a, b, wa, wb = p
    return lambda n: wa + wb if n % a == 0 and n % b == 0 else wa if n % a == 0 else wb if n % b == 0 else str(n)


def _fact(n: int) -> int:
    out = 1
    for k in range(2, n + 1):
        out *= k
    return out


def _fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def _product(nums: list) -> int:
    out = 1
    for x in nums:
        out *= x
    return out


_LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
_T = tuple(range(0, 31))  # thresholds
_FIZZ_WORDS = (("Fizz", "Buzz"), ("Foo", "Bar"), ("Ping", "Pong"), ("Tic", "Tac"), ("Hip", "Hop"))
_FIZZ_PARAMS = tuple(
    [a, b, wa, wb] for a in range(2, 10) for b in range(a + 1, 10) if b % a for wa, wb in _FIZZ_WORDS
)
_CLAMP_PARAMS = tuple([lo, hi] for lo in range(0, 11) for hi in range(lo + 5, lo + 21))
# Argument names by kind: one more dimension of variation for every family.
ARG_NAMES = {"list": ("nums", "numbers", "values"), "str": ("s", "text", "word"), "int": ("n", "num", "x")}

CODE_FAMILIES: tuple[CodeFamily, ...] = (
    CodeFamily("sum", ("sum_list", "list_sum", "total_of"), "list",
               "returns the sum of the numbers in the list `{a}` (0 for an empty list)",
               (None,), lambda p: sum, _int_lists()),
    CodeFamily("sum_greater", ("sum_greater_than", "sum_above"), "list",
               "returns the sum of the numbers in the list `{a}` that are greater than {p}",
               _T, lambda p: lambda nums: sum(x for x in nums if x > p), _int_lists()),
    CodeFamily("count_greater", ("count_greater_than", "count_above"), "list",
               "returns how many numbers in the list `{a}` are greater than {p}",
               _T, lambda p: lambda nums: sum(x > p for x in nums), _int_lists()),
    CodeFamily("count_less", ("count_less_than", "count_below"), "list",
               "returns how many numbers in the list `{a}` are less than {p}",
               _T, lambda p: lambda nums: sum(x < p for x in nums), _int_lists()),
    CodeFamily("filter_greater", ("filter_greater_than", "keep_above"), "list",
               "returns a list of the numbers in `{a}` that are greater than {p}, in their original order",
               _T, lambda p: lambda nums: [x for x in nums if x > p], _int_lists()),
    CodeFamily("count_multiples", ("count_multiples", "count_divisible"), "list",
               "returns how many numbers in the list `{a}` are divisible by {p}",
               tuple(range(2, 13)), lambda p: lambda nums: sum(x % p == 0 for x in nums), _int_lists()),
    CodeFamily("add_each", ("add_to_each", "shift_all"), "list",
               "returns a new list with {p} added to each number in the list `{a}`",
               tuple(range(1, 21)), lambda p: lambda nums: [x + p for x in nums], _int_lists()),
    CodeFamily("multiply_each", ("multiply_each", "scale_all"), "list",
               "returns a new list with each number in the list `{a}` multiplied by {p}",
               tuple(range(2, 13)), lambda p: lambda nums: [x * p for x in nums], _int_lists()),
    CodeFamily("max", ("max_of_list", "find_max", "largest"), "list",
               "returns the largest number in the non-empty list `{a}`",
               (None,), lambda p: max, _int_lists(nonempty=True)),
    CodeFamily("min", ("min_of_list", "find_min", "smallest"), "list",
               "returns the smallest number in the non-empty list `{a}`",
               (None,), lambda p: min, _int_lists(nonempty=True)),
    CodeFamily("average", ("average", "mean_of_list"), "list",
               "returns the average (arithmetic mean) of the numbers in the non-empty list `{a}`",
               (None,), lambda p: lambda nums: sum(nums) / len(nums), _int_lists(nonempty=True)),
    CodeFamily("sum_squares", ("sum_of_squares", "square_sum"), "list",
               "returns the sum of the squares of the numbers in the list `{a}`",
               (None,), lambda p: lambda nums: sum(x * x for x in nums), _int_lists()),
    CodeFamily("sum_even", ("sum_even", "sum_of_evens"), "list",
               "returns the sum of the even numbers in the list `{a}`",
               (None,), lambda p: lambda nums: sum(x for x in nums if x % 2 == 0), _int_lists()),
    CodeFamily("product", ("product", "multiply_all"), "list",
               "returns the product of the numbers in the list `{a}` (1 for an empty list)",
               (None,), lambda p: _product, _int_lists(lo=-5, hi=9, max_len=6)),
    CodeFamily("count_char", ("count_letter", "count_char"), "str",
               "returns how many times the letter '{p}' appears in the lowercase string `{a}`",
               _LETTERS, lambda p: lambda s: s.count(p), _strings),
    CodeFamily("remove_char", ("remove_letter", "strip_letter"), "str",
               "returns the string `{a}` with every '{p}' removed",
               _LETTERS, lambda p: lambda s: s.replace(p, ""), _strings),
    CodeFamily("count_vowels", ("count_vowels", "vowel_count", "num_vowels"), "str",
               "returns the number of vowels (a, e, i, o, u) in the lowercase string `{a}`",
               (None,), lambda p: lambda s: sum(c in "aeiou" for c in s), _strings),
    CodeFamily("reverse", ("reverse_string", "reverse_text", "reversed_string"), "str",
               "returns the string `{a}` reversed",
               (None,), lambda p: lambda s: s[::-1], _strings),
    CodeFamily("palindrome", ("is_palindrome", "palindrome_check"), "str",
               "returns True if the string `{a}` reads the same forwards and backwards, and False otherwise",
               (None,), lambda p: lambda s: s == s[::-1], _strings),
    CodeFamily("count_words", ("count_words", "word_count"), "str",
               "returns the number of words in the string `{a}`, where words are separated by spaces",
               (None,), lambda p: lambda s: len(s.split()), _strings),
    CodeFamily("first_k", ("first_chars", "take_first"), "str",
               "returns the first {p} characters of the string `{a}` (the whole string if it is shorter)",
               tuple(range(1, 11)), lambda p: lambda s: s[:p], _strings),
    CodeFamily("last_k", ("last_chars", "take_last"), "str",
               "returns the last {p} characters of the string `{a}` (the whole string if it is shorter)",
               tuple(range(1, 11)), lambda p: lambda s: s[-p:], _strings),
    CodeFamily("repeat", ("repeat_string", "repeat_text"), "str",
               "returns the string `{a}` repeated {p} times",
               tuple(range(2, 10)), lambda p: lambda s: s * p, _strings),
    CodeFamily("upper", ("to_upper", "shout"), "str",
               "returns the string `{a}` with every letter in upper case",
               (None,), lambda p: lambda s: s.upper(), _strings),
    CodeFamily("divisible", ("is_divisible_by_{p}", "is_multiple_of_{p}"), "int",
               "returns True if `{a}` is divisible by {p} and False otherwise",
               tuple(range(3, 26)), lambda p: lambda n: n % p == 0, _divisor_ints),
    CodeFamily("even", ("is_even", "even"), "int",
               "returns True if `{a}` is even and False otherwise",
               (None,), lambda p: lambda n: n % 2 == 0, _divisor_ints),
    CodeFamily("odd", ("is_odd", "odd"), "int",
               "returns True if `{a}` is odd and False otherwise",
               (None,), lambda p: lambda n: n % 2 == 1, _divisor_ints),
    CodeFamily("factorial", ("factorial", "fact"), "int",
               "returns the factorial of the non-negative integer `{a}` (the factorial of 0 is 1)",
               (None,), lambda p: _fact, _small_ints(0, 12)),
    CodeFamily("fibonacci", ("fibonacci", "fib"), "int",
               "returns the Fibonacci number at position `{a}`, counting from 0 (the sequence starts 0, 1, 1, 2, 3, 5)",
               (None,), lambda p: _fib, _small_ints(0, 25)),
    CodeFamily("digit_sum", ("digit_sum", "sum_of_digits"), "int",
               "returns the sum of the decimal digits of the non-negative integer `{a}`",
               (None,), lambda p: lambda n: sum(map(int, str(n))), _small_ints(0, 99999)),
    CodeFamily("power", ("power", "raise_power"), "int",
               "returns `{a}` raised to the power {p}",
               tuple(range(2, 7)), lambda p: lambda n: n ** p, _small_ints(-5, 12)),
    CodeFamily("fizzbuzz", ("fizzbuzz", "word_game", "say_number"), "int",
               "returns '{p[2]}{p[3]}' if `{a}` is divisible by both {p[0]} and {p[1]}, '{p[2]}' if it is "
               "divisible only by {p[0]}, '{p[3]}' if it is divisible only by {p[1]}, and otherwise `{a}` as a string",
               _FIZZ_PARAMS, _fizz, _fizz_ints),
    CodeFamily("clamp", ("clamp", "limit"), "int",
               "returns `{a}` limited to the range {p[0]} to {p[1]}: {p[0]} if `{a}` is smaller than {p[0]}, "
               "{p[1]} if `{a}` is larger than {p[1]}, and `{a}` otherwise",
               _CLAMP_PARAMS, lambda p: lambda x: min(max(x, p[0]), p[1]), _clamp_ints),
)


def code_tests(family: CodeFamily, param: Any, seed: str) -> list[list]:
    """Hidden ``[args, expected]`` pairs, seeded by the prompt text so that a prompt
    always has the same tests."""
    rng = random.Random(seed)
    ref = family.ref(param)
    return [[args, ref(*args)] for args in family.inputs(rng, param)]


# ----------------------------------------------------------------- text tasks
_BULLET_TEMPLATES = (
    "List exactly {n} {things} about {topic} as a bulleted list.",
    "Give exactly {n} {things} about {topic}, as a bulleted list with one item per line.",
    "Write a bulleted list of exactly {n} {things} about {topic}.",
)
_BULLET_THINGS = ("facts", "interesting facts", "fun facts", "things to know", "short sentences",
                  "observations", "ideas")
_LOWERCASE_TEMPLATES = (
    "Write one or two sentences about {topic}{style}, using only lowercase letters.",
    "Using only lowercase letters (no capital letters at all), write one or two sentences about {topic}{style}.",
    "In one or two sentences written entirely in lowercase letters, describe {topic}{style}.",
)
_STYLES = ("", " for a child", " for a school report", " in a cheerful tone", " in a calm tone",
           " for a friend", " as if writing a postcard", " in simple words", " in a poetic way",
           " for a newspaper", " in a serious tone", " for a curious visitor")
_WORD_LIMIT_TEMPLATES = (
    "Describe {topic} in at most {n} words.",
    "In {n} words or fewer, describe {topic}.",
    "Write a short description of {topic} using no more than {n} words.",
)
_KEYWORD_TEMPLATES = (
    "Write a sentence about {topic} that uses the words '{x}' and '{y}'.",
    "Write one sentence about {topic} that includes the words '{x}' and '{y}'.",
)
_CODE_TEMPLATES = (
    "Write a Python function `{sig}` that {spec}.",
    "Implement a Python function `{sig}` that {spec}.",
    "Define a Python function `{sig}` that {spec}. Return the result; do not print it.",
    "Create a Python function called `{sig}`. It {spec}.",
)


@lru_cache(maxsize=None)
def _slots(task: str) -> tuple[tuple, ...]:
    """Every distinct prompt of an enumerable task, as a tuple of its choices."""
    if task == "bullets":
        return tuple(itertools.product(range(len(_BULLET_TEMPLATES)), range(2, 7), _BULLET_THINGS, TOPIC_NAMES))
    if task == "lowercase":
        return tuple(itertools.product(range(len(_LOWERCASE_TEMPLATES)), _STYLES, TOPIC_NAMES))
    if task == "word_limit":
        return tuple(itertools.product(range(len(_WORD_LIMIT_TEMPLATES)), range(10, 41), TOPIC_NAMES))
    if task == "keywords":
        return tuple(
            (t, topic, x, y)
            for t in range(len(_KEYWORD_TEMPLATES))
            for topic in TOPIC_NAMES
            for x, y in itertools.combinations(TOPICS[topic]["related"], 2)
        )
    if task == "code":
        return tuple(
            (t, fam_idx, name, arg, param)
            for t in range(len(_CODE_TEMPLATES))
            for fam_idx, fam in enumerate(CODE_FAMILIES)
            for name in fam.names
            for arg in ARG_NAMES[fam.arg_kind]
            for param in fam.params
        )
    raise ValueError(f"unknown task {task!r}; expected one of {TASK_NAMES}")


def _slot_record(task: str, slot: tuple) -> dict:
    if task == "bullets":
        t, n, things, topic = slot
        prompt = _BULLET_TEMPLATES[t].format(n=n, things=things, topic=topic)
        meta = {"n_bullets": n, "things": things}
    elif task == "lowercase":
        t, style, topic = slot
        prompt = _LOWERCASE_TEMPLATES[t].format(topic=topic, style=style)
        meta = {"style": style.strip()}
    elif task == "word_limit":
        t, n, topic = slot
        prompt = _WORD_LIMIT_TEMPLATES[t].format(n=n, topic=topic)
        meta = {"word_limit": n}
    elif task == "keywords":
        t, topic, x, y = slot
        prompt = _KEYWORD_TEMPLATES[t].format(topic=topic, x=x, y=y)
        meta = {"keywords": [x, y]}
    else:  # code
        t, fam_idx, name, arg, param = slot
        fam = CODE_FAMILIES[fam_idx]
        name = fam.func_name(name, param)
        sig = f"{name}({arg})"
        prompt = _CODE_TEMPLATES[t].format(sig=sig, spec=fam.spec(param, arg))
        tests = code_tests(fam, param, seed=prompt)
        meta = {"func_name": name, "signature": sig, "family": fam.key, "param": param, "tests": tests}
        return _record(task, prompt, meta)
    meta.update(topic=topic, topic_keywords=topic_keywords(topic))
    return _record(task, prompt, meta)


def _record(task: str, prompt: str, meta: dict[str, Any]) -> dict:
    digest = hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:12]
    return {"id": f"{task}-{digest}", "task": task, "prompt": prompt, "meta": meta}


def normalise_prompt(text: str) -> str:
    """The key used to dedupe prompts: case, spacing and punctuation do not count."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


# ----------------------------------------------------------------- public API


@lru_cache(maxsize=None)
def prompt_capacity(task: str) -> int:
    """How many distinct prompts the generator can make for ``task``."""
    if task == "arithmetic":
        total = 0
        for idx, (template, _, _, two_names, _) in enumerate(_ARITH_TEMPLATES):
            names = len(_NAMES) * (len(_NAMES) - 1) if two_names else len(_NAMES) if "{name}" in template else 1
            total += len(_valid_operand_tuples(idx)) * names * len(_ITEMS)
        return total * len(_ARITH_SUFFIXES)
    return len(_slots(task))


def generate_prompts(task: str, n: int, seed: int) -> list[dict]:
    """``n`` distinct prompt records for ``task``, deterministic given ``seed``."""
    if task not in TASK_NAMES:
        raise ValueError(f"unknown task {task!r}; expected one of {TASK_NAMES}")
    if n > prompt_capacity(task):
        raise ValueError(f"task {task!r} has only {prompt_capacity(task)} distinct prompts, asked for {n}")
    rng = random.Random(f"{task}|{seed}")  # str seeds hash the same in every process
    out, seen = [], set()
    if task == "arithmetic":
        # The space is far larger than any n we use: rejection-sample distinct prompts.
        candidates = iter(lambda: _arith_record(rng), None)
    else:
        slots = list(_slots(task))
        rng.shuffle(slots)
        if task == "code":
            # Families have very different numbers of variants (fizzbuzz over 1,000,
            # factorial 24): deal them round-robin so every family is equally common.
            by_family: dict[int, list[tuple]] = {}
            for s in slots:
                by_family.setdefault(s[1], []).append(s)
            slots = [s for group in itertools.zip_longest(*by_family.values()) for s in group if s]
        candidates = (_slot_record(task, s) for s in slots)
    for rec in candidates:
        key = normalise_prompt(rec["prompt"])
        if key not in seen:
            seen.add(key)
            out.append(rec)
            if len(out) == n:
                break
    return out


def make_splits(tasks: list[str], sizes: dict[str, int], seed: int) -> dict[str, list[dict]]:
    """Disjoint prompt splits with ``sizes[split]`` prompts PER TASK in each split.

    No normalised prompt text is in two splits. Splits are filled in sorted order of
    their names from one shuffled stream per task, so e.g. "eval" does not change when
    only the "train" size does. Within a split, tasks are interleaved round-robin.
    """
    names = sorted(sizes)
    split_recs: dict[str, list[list[dict]]] = {s: [] for s in names}
    seen: set[str] = set()
    for task in tasks:
        stream = generate_prompts(task, sum(sizes.values()), seed)
        stream = [r for r in stream if normalise_prompt(r["prompt"]) not in seen]
        seen.update(normalise_prompt(r["prompt"]) for r in stream)
        start = 0
        for s in names:
            chunk = stream[start : start + sizes[s]]
            if len(chunk) < sizes[s]:
                raise ValueError(f"task {task!r} ran out of distinct prompts filling split {s!r}")
            split_recs[s].append(chunk)
            start += sizes[s]
    return {
        s: [r for group in itertools.zip_longest(*per_task) for r in group if r is not None]
        for s, per_task in split_recs.items()
    }
