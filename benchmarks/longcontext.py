"""RULER-style long-context tasks built locally (no downloads): prompts from a seed, and their scorers.

Three tasks after RULER (Hsieh et al., 2024, arXiv 2404.06654), sized in tokens of the model's tokenizer:

- ``multikey``: multi-key needle retrieval. ``keys`` needles "One of the special magic numbers for <key> is:
  <7 digits>." at random depths of a noise filler; the question asks for one key's number.
  Correct when the first 7-digit number of the answer is that key's.
- ``vartrack``: variable tracking. ``chains`` chains of ``hops`` assignments ``VAR ABCDE = 12345``,
  ``VAR FGHIJ = VAR ABCDE`` ... spread in order through the filler; the question asks which variables hold one
  chain's value. Score: the share of that chain's variables named in the answer.
- ``commonwords``: common-word extraction. A numbered list of words where ``common`` words appear ``ratio`` times
  as often as each of the others; the question asks for the ``common`` most frequent words. Score: the share of
  them named in the answer.

A trial is ``build(task, encode, length, seed)``: ``encode`` turns text into token ids (no special tokens) and the
prompt is the longest the task's recipe allows within ``length - max_new_tokens`` tokens, so prompt and answer fit
in ``length``. Everything is a pure function of its arguments: the same seed gives the same prompt.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

Encode = Callable[[str], list[int]]

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
# Plain, common English words: needle keys and the common-word lists draw from these (no word list to download).
WORDS = tuple("""
apple river garden window candle silver forest mountain pencil button rabbit mirror basket ladder
blanket bottle bridge castle cherry circle cloud copper cotton desert dragon engine feather finger
flower fountain guitar hammer harbor helmet island jacket kettle kitchen lantern lemon letter lizard
marble meadow monkey needle ocean orange palace parrot pepper pillow planet pocket potato puzzle
rocket saddle sailor shadow shovel spider spoon statue stone summer sunset table tiger tomato tower
tunnel turtle valley violin wagon walnut water whistle winter wizard wolf yellow anchor arrow bamboo
banner barrel beacon berry biscuit blossom bucket cabin camera canyon carpet cedar chalk cheese
chimney cobweb comet compass cookie crayon crystal daisy dolphin donkey eagle falcon fence ferry
forge galaxy glacier goblet granite harvest hazel hedge honey horizon iceberg ivory jungle kitten
lagoon lemonade lily lobster magnet maple meteor mitten moss nectar nest nugget oasis olive orchard
otter oyster paddle panda pebble pelican penguin piano pickle pigeon pine pirate plum pond poppy
pumpkin quartz quill radish raven reef ribbon robin saffron salmon sandal scarf seashell sparrow
spruce squirrel stable starfish storm straw sugar swan thimble thistle thunder timber toast trumpet
tulip umbrella velvet village walrus wheat willow wreath zebra acorn almond amber antler apron
badger bagel ballot banjo beetle bell bench blender boulder bracelet bramble brick broom bubble
buffalo cactus canoe carrot cashew cattle cello cereal chestnut cinnamon clover coconut coffee
cricket crown cucumber cupboard curtain dagger dune easel elbow elm emerald fabric fig flute fossil
garlic gazelle ginger glove goose grape gravel hamster hare hawk heron hippo hive hoof jelly kayak
kiwi koala ladle leopard lettuce llama locket lotus mango mantle meerkat melon mint moose mop mule
mushroom napkin noodle nutmeg oak oatmeal onion owl peach peanut pear pearl pecan pie plank pony
""".split())
_VAR_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Trial:
    """One prompt and what a correct answer holds."""

    task: str
    length: int
    seed: int
    prompt: str
    answers: tuple[str, ...]  # multikey: the number; vartrack: the variables; commonwords: the words
    max_new_tokens: int
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """A task and its difficulty levers.

    Defaults from a few trials with the exact cache of SmolLM2-135M-Instruct (busy 2-core machine, so few): multikey
    2 keys 2/2 at 1k, 4 keys 0/1 at 2k (it named another needle's number), 3 keys 3/3 at 1k; vartrack with one chain
    of one hop 2.5/3 at 1k once the answer is primed with "VAR" (0/3 before: the model listed "A: B: C:");
    commonwords 3 words 0.33 at 2k, 0/3 at 1k.
    """

    task: str
    keys: int = 3  # multikey: needles in the haystack (one is asked for)
    chains: int = 1  # vartrack: chains of assignments (one is asked for)
    hops: int = 1  # vartrack: assignments after the first one in each chain (hops + 1 variables)
    common: int = 3  # commonwords: words to name
    ratio: int = 6  # commonwords: how many times more often each common word appears than each other word

    def build(self, encode: Encode, length: int, seed: int) -> Trial:
        return BUILDERS[self.task](self, encode, length, seed)


def _fit(encode: Encode, budget: int, make: Callable[[int], str], upper: int) -> str:
    """``make(n)`` for the largest ``n`` in ``[0, upper]`` whose prompt has at most ``budget`` tokens."""
    if len(encode(make(0))) > budget:
        raise ValueError(f"even the smallest prompt is longer than {budget} tokens; ask for a longer length")
    lo, hi = 0, upper
    while lo < hi:  # token counts grow with n: binary search, ~log2(upper) encodes
        mid = (lo + hi + 1) // 2
        if len(encode(make(mid))) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return make(lo)


def _noise_units(encode: Encode, budget: int) -> int:
    """An upper bound on how many NOISE units fit in ``budget`` tokens."""
    return 2 * budget // max(1, len(encode(NOISE))) + 2  # generous: units merge at their seams


def _haystack(n: int, inserts: list[tuple[float, str]]) -> str:
    """``n`` noise units with each ``(depth, sentence)`` inserted at ``depth`` of them, in depth order."""
    parts, done = [], 0
    for depth, sentence in sorted(inserts, key=lambda x: x[0]):
        at = round(depth * n)
        parts.append(NOISE * (at - done) + sentence + " ")
        done = at
    return "".join(parts) + NOISE * (n - done)


def multikey(recipe: Recipe, encode: Encode, length: int, seed: int) -> Trial:
    rng = random.Random(f"multikey-{length}-{seed}")
    keys = rng.sample(WORDS, recipe.keys)
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
    depths = [rng.random() for _ in keys]
    target = rng.randrange(recipe.keys)
    needles = [(d, f"One of the special magic numbers for {k} is: {v}.") for d, k, v in zip(depths, keys, values,
                                                                                           strict=True)]
    head = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the numbers afterwards.\n")
    tail = (f"\nWhat is the special magic number for {keys[target]} mentioned in the provided text? "
            f"The special magic number for {keys[target]} mentioned in the provided text is")
    max_new = 12
    budget = length - max_new
    prompt = _fit(encode, budget, lambda n: head + _haystack(n, needles) + tail, _noise_units(encode, budget))
    return Trial("multikey", length, seed, prompt, (values[target],), max_new, {"keys": recipe.keys})


def _var(rng: random.Random, taken: set[str]) -> str:
    while (name := "".join(rng.choice(_VAR_LETTERS) for _ in range(5))) in taken:
        pass
    taken.add(name)
    return name


def vartrack(recipe: Recipe, encode: Encode, length: int, seed: int) -> Trial:
    rng = random.Random(f"vartrack-{length}-{seed}")
    taken: set[str] = set()
    values = rng.sample(range(10_000, 100_000), recipe.chains)
    chains = [[_var(rng, taken) for _ in range(recipe.hops + 1)] for _ in range(recipe.chains)]
    statements = []  # (depth, text): each chain's statements in order, chains interleaved at random depths
    for value, chain in zip(values, chains, strict=True):
        depths = sorted(rng.random() for _ in chain)
        statements.append((depths[0], f"VAR {chain[0]} = {value}."))
        statements += [(d, f"VAR {b} = VAR {a}.") for d, a, b in zip(depths[1:], chain[:-1], chain[1:], strict=True)]
    target = rng.randrange(recipe.chains)
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    # the answer is primed with "VAR": without it SmolLM2-135M lists "A: B: C:" (0 of 2 at 1k on the exact cache)
    tail = (f"\nQuestion: Find all variables that are assigned the value {values[target]} in the text above. "
            f"Answer: The variables assigned the value {values[target]} are VAR")
    max_new = 8 * (recipe.hops + 1)
    budget = length - max_new
    prompt = _fit(encode, budget, lambda n: head + _haystack(n, statements) + tail, _noise_units(encode, budget))
    return Trial("vartrack", length, seed, prompt, tuple(chains[target]), max_new,
                 {"chains": recipe.chains, "hops": recipe.hops})


def commonwords(recipe: Recipe, encode: Encode, length: int, seed: int) -> Trial:
    rng = random.Random(f"commonwords-{length}-{seed}")
    words = list(WORDS)
    rng.shuffle(words)
    common, others = words[: recipe.common], words[recipe.common :]
    head = ("Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n")
    tail = (f"\nQuestion: What are the {recipe.common} most common words in the above list? "
            f"Answer: The top {recipe.common} words that appear most often in the list are:")

    def make(n: int) -> str:  # n entries of other words (each about n / len(others) times), common ones `ratio` x
        each = max(recipe.ratio, round(recipe.ratio * n / len(others)))
        items = [others[i % len(others)] for i in range(n)] + common * each
        random.Random(f"commonwords-{length}-{seed}-{n}").shuffle(items)
        return head + "".join(f"{i + 1}. {w}\n" for i, w in enumerate(items)) + tail

    max_new = 6 * recipe.common + 4
    budget = length - max_new
    upper = budget  # every entry costs at least a token
    prompt = _fit(encode, budget, make, upper)
    return Trial("commonwords", length, seed, prompt, tuple(common), max_new,
                 {"common": recipe.common, "ratio": recipe.ratio})


BUILDERS: dict[str, Callable[[Recipe, Encode, int, int], Trial]] = {
    "multikey": multikey, "vartrack": vartrack, "commonwords": commonwords}
TASKS = tuple(BUILDERS)


def score(trial: Trial, output: str) -> float:
    """1.0 for a fully correct answer, the share of the expected items found otherwise (multikey: 0 or 1)."""
    if trial.task == "multikey":
        found = re.search(r"\d{7}", output)
        return float(bool(found) and found.group() == trial.answers[0])
    if trial.task == "vartrack":
        names = set(re.findall(r"\b[A-Z]{5}\b", output))
        return sum(a in names for a in trial.answers) / len(trial.answers)
    if trial.task == "commonwords":
        words = set(re.findall(r"[a-z]+", output.lower()))
        return sum(a in words for a in trial.answers) / len(trial.answers)
    raise ValueError(f"unknown task {trial.task!r}; tasks are {', '.join(TASKS)}")
