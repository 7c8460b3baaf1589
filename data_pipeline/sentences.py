"""Deterministic generator of short, varied, natural English sentences for the demo dataset.

Sentences are built from templates and word lists and are meant to take roughly 1.5-4 s to
speak (4-11 words). Randomness comes only from ``random.Random(seed).random()``, whose output
sequence Python guarantees to keep stable across versions, so the same seed yields the same
sentences everywhere.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

NAMES = ["Anna", "Ben", "Clara", "David", "Elena", "Frank", "Grace", "Henry", "Iris", "James",
         "Karen", "Leo", "Maria", "Nathan", "Olivia", "Peter", "Rachel", "Sam", "Tina", "Victor"]
PEOPLE = ["my brother", "my sister", "the teacher", "our neighbour", "the old fisherman",
          "a young doctor", "the baker", "her cousin", "the tired driver", "his best friend",
          "the new student", "a quiet stranger", "the farmer", "my grandmother", "the pilot"]
ANIMALS = ["the cat", "a small dog", "the black horse", "an old owl", "the goats", "a red fox",
           "the ducks", "a tiny mouse", "the sheep", "a grey rabbit"]
OBJECTS = ["the letter", "a cup of tea", "the blue umbrella", "an old map", "the keys",
           "a loaf of bread", "the heavy box", "a paper boat", "the garden gate", "a warm coat",
           "the broken clock", "a basket of apples", "the train ticket", "a wooden chair",
           "the green bottle", "a pair of boots", "the morning paper", "a bright lamp"]
PLACES = ["in the kitchen", "near the river", "at the station", "by the window",
          "in the garden", "on the hill", "at the market", "under the bridge", "in the library",
          "behind the house", "at the harbour", "in the forest", "on the beach",
          "at the corner shop", "in the village square"]
TIMES = ["this morning", "last night", "every Sunday", "after lunch", "before sunrise",
         "on Friday", "in the spring", "at noon", "yesterday evening", "once a week",
         "during the storm", "after school"]
PAST_VERBS = ["found", "carried", "painted", "dropped", "repaired", "opened", "hid", "bought",
              "forgot", "cleaned", "borrowed", "sold", "noticed", "packed"]
PRESENT_VERBS = ["likes", "needs", "wants", "keeps", "remembers", "prefers", "loves", "hates"]
INTRANSITIVE = ["sang quietly", "waited patiently", "laughed out loud", "slept for hours",
                "walked home slowly", "ran across the field", "sat in silence",
                "worked until dark", "danced all evening", "stayed inside"]
ADJECTIVES = ["cold", "bright", "quiet", "busy", "strange", "lovely", "crowded", "peaceful",
              "windy", "dark", "warm", "noisy", "calm", "grey"]
NOUNS_TIME = ["morning", "evening", "afternoon", "night", "day", "week", "summer", "winter"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve",
           "twenty", "forty"]
COUNTABLE = ["birds", "boats", "children", "candles", "books", "trees", "houses", "stars",
             "windows", "letters", "bicycles", "clouds"]
WEATHER = ["It will rain", "The sun came out", "Snow began to fall", "The wind grew stronger",
           "A thick fog rolled in", "The sky turned pink"]
FEELINGS = ["happy", "surprised", "worried", "proud", "nervous", "grateful", "sleepy",
            "curious", "lonely", "excited"]
QUESTION_STARTS = ["Where did", "Why did", "When did", "How did"]
BASE_VERBS = ["find", "carry", "paint", "drop", "repair", "open", "hide", "buy", "forget",
              "clean", "borrow", "sell", "notice", "pack"]
FIXED = [
    "Please close the door behind you.",
    "Could you pass me the salt?",
    "I think we should leave early tomorrow.",
    "That was the best soup I have ever tasted.",
    "Nobody knew the answer to the last question.",
    "The meeting has been moved to Thursday.",
    "Turn left at the second traffic light.",
    "We ran out of milk again.",
    "Let me know when you get home.",
    "The museum is closed on Mondays.",
    "She speaks three languages fluently.",
    "Keep the receipt in case it breaks.",
    "He has never seen the ocean before.",
    "The children are playing outside.",
    "Wait here until I come back.",
    "Is this seat taken?",
]


def _pick(rng: random.Random, items: Sequence[str]) -> str:
    # Only rng.random() is used: its sequence is guaranteed stable across Python versions,
    # unlike choice()/randrange() internals.
    return items[min(int(rng.random() * len(items)), len(items) - 1)]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _subject(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.4:
        return _pick(rng, NAMES)
    if r < 0.8:
        return _pick(rng, PEOPLE)
    return _pick(rng, ANIMALS)


def _t_past_object(rng: random.Random) -> str:
    subject, verb, obj = _cap(_subject(rng)), _pick(rng, PAST_VERBS), _pick(rng, OBJECTS)
    return f"{subject} {verb} {obj} {_pick(rng, PLACES)}."


def _t_time_past(rng: random.Random) -> str:
    when, subject = _cap(_pick(rng, TIMES)), _subject(rng)
    return f"{when}, {subject} {_pick(rng, PAST_VERBS)} {_pick(rng, OBJECTS)}."


def _t_intransitive(rng: random.Random) -> str:
    return f"{_cap(_subject(rng))} {_pick(rng, INTRANSITIVE)} {_pick(rng, PLACES)}."


def _t_present(rng: random.Random) -> str:
    return f"{_pick(rng, NAMES)} {_pick(rng, PRESENT_VERBS)} {_pick(rng, OBJECTS)}."


def _t_weather(rng: random.Random) -> str:
    return f"{_pick(rng, WEATHER)} {_pick(rng, TIMES)}."


def _t_adjective(rng: random.Random) -> str:
    return f"It was a {_pick(rng, ADJECTIVES)} {_pick(rng, NOUNS_TIME)} {_pick(rng, PLACES)}."


def _t_count(rng: random.Random) -> str:
    return f"There were {_pick(rng, NUMBERS)} {_pick(rng, COUNTABLE)} {_pick(rng, PLACES)}."


def _t_feeling(rng: random.Random) -> str:
    return f"{_pick(rng, NAMES)} felt {_pick(rng, FEELINGS)} {_pick(rng, TIMES)}."


def _t_question(rng: random.Random) -> str:
    start, subject = _pick(rng, QUESTION_STARTS), _subject(rng)
    return f"{start} {subject} {_pick(rng, BASE_VERBS)} {_pick(rng, OBJECTS)}?"


def _t_said(rng: random.Random) -> str:
    return (f"{_pick(rng, NAMES)} said that {_subject(rng)} "
            f"{_pick(rng, INTRANSITIVE)}.")


def _t_fixed(rng: random.Random) -> str:
    return _pick(rng, FIXED)


TEMPLATES: list[tuple[float, Callable[[random.Random], str]]] = [
    (3.0, _t_past_object), (2.0, _t_time_past), (2.0, _t_intransitive), (1.5, _t_present),
    (1.0, _t_weather), (1.0, _t_adjective), (1.0, _t_count), (1.0, _t_feeling),
    (1.5, _t_question), (1.0, _t_said), (0.5, _t_fixed),
]


def generate_sentences(n: int, seed: int = 0, min_words: int = 4,
                       max_words: int = 11) -> list[str]:
    """Return ``n`` distinct sentences, deterministic in ``(n, seed, min_words, max_words)``.

    The first ``m`` sentences for a given seed are the same for every ``n >= m``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    total = sum(w for w, _ in TEMPLATES)
    out: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise RuntimeError(f"could not generate {n} distinct sentences "
                               f"({len(out)} after {attempts} attempts)")
        r = rng.random() * total
        for weight, template in TEMPLATES:
            r -= weight
            if r < 0:
                break
        sentence = template(rng)
        if not min_words <= len(sentence.split()) <= max_words or sentence in seen:
            continue
        seen.add(sentence)
        out.append(sentence)
    return out
