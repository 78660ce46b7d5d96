"""The world's data: closed word inventories, the planted concepts, fact tables and sentence templates.

Every word the corpus generator (:mod:`.samples`) can emit comes from these tables. Each planted concept
(:data:`CONCEPTS`) is a small closed vocabulary, and no word is in two of them, so :func:`concept_of` is a
function of the word alone: the ground-truth label that SAE latents are scored against.
"""
from __future__ import annotations

# --------------------------------------------------------------------------------------------------------
# Closed vocabularies
# --------------------------------------------------------------------------------------------------------

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "pink", "grey"]

ANIMALS = ["dog", "cat", "horse", "bird", "cow", "pig", "sheep", "lion", "tiger", "mouse", "rabbit", "bear",
           "fox", "duck", "goat", "frog", "crow", "hen", "bee", "elephant", "monkey", "owl"]
_IRREGULAR_PLURAL = {"sheep": "sheep", "mouse": "mice", "fox": "foxes"}
ANIMALS_PLURAL = [_IRREGULAR_PLURAL.get(a, a + "s") for a in ANIMALS]

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]
NUMBER_DIGITS = [str(i) for i in range(21)]
MAX_NUMBER = 20

#: (country, capital) pairs; both words are "place".
CAPITALS = [("france", "paris"), ("germany", "berlin"), ("italy", "rome"), ("spain", "madrid"),
            ("japan", "tokyo"), ("china", "beijing"), ("egypt", "cairo"), ("russia", "moscow"),
            ("canada", "ottawa"), ("kenya", "nairobi"), ("peru", "lima"), ("greece", "athens"),
            ("norway", "oslo"), ("poland", "warsaw"), ("india", "delhi"), ("portugal", "lisbon"),
            ("austria", "vienna"), ("ireland", "dublin"), ("sweden", "stockholm"), ("england", "london")]
COUNTRIES = [c for c, _ in CAPITALS]
CITIES = [c for _, c in CAPITALS] + ["venice", "munich", "sydney", "chicago", "boston"]

POSITIVE = ["good", "happy", "great", "lovely", "wonderful", "nice", "kind", "beautiful", "excellent",
            "pleasant", "cheerful", "brilliant", "calm", "friendly"]
NEGATIVE = ["bad", "sad", "awful", "terrible", "horrible", "nasty", "cruel", "ugly", "unpleasant", "gloomy",
            "dreadful", "angry", "rude", "boring"]
#: (positive, negative) antonym pairs for the "opposite" facts.
OPPOSITES = [("good", "bad"), ("happy", "sad"), ("beautiful", "ugly"), ("kind", "cruel"),
             ("pleasant", "unpleasant"), ("cheerful", "gloomy"), ("friendly", "rude"), ("calm", "angry"),
             ("nice", "nasty"), ("wonderful", "terrible"), ("lovely", "horrible"), ("great", "awful")]

FAMILY = ["mother", "father", "sister", "brother", "aunt", "uncle", "grandmother", "grandfather", "son",
          "daughter", "cousin", "wife", "husband", "baby"]
#: ("the X of my Y", answer) family facts.
FAMILY_FACTS = [(("mother", "father"), "grandmother"), (("father", "father"), "grandfather"),
                (("mother", "mother"), "grandmother"), (("father", "mother"), "grandfather"),
                (("sister", "mother"), "aunt"), (("brother", "mother"), "uncle"),
                (("sister", "father"), "aunt"), (("brother", "father"), "uncle"),
                (("son", "aunt"), "cousin"), (("daughter", "uncle"), "cousin")]

FOODS = ["bread", "apple", "cheese", "rice", "soup", "cake", "pizza", "banana", "egg", "milk", "carrot",
         "honey", "pasta", "salad", "tomato", "lemon", "chocolate", "potato", "cherry", "grape"]

WEATHER_NOUNS = ["rain", "snow", "wind", "fog", "storm", "thunder", "sunshine", "hail"]
WEATHER_ADJS = ["rainy", "snowy", "windy", "foggy", "stormy", "sunny", "cloudy", "icy"]
WEATHER = WEATHER_NOUNS + WEATHER_ADJS

DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september",
          "october", "november", "december"]
SEASONS = ["spring", "summer", "autumn", "winter"]
DAY_PARTS = ["morning", "afternoon", "evening", "night"]
RELATIVE_DAYS = ["today", "yesterday", "tomorrow", "tonight"]
TIME = DAYS + MONTHS + SEASONS + DAY_PARTS + RELATIVE_DAYS

#: The planted concepts. Every word belongs to at most one of them.
CONCEPTS: dict[str, list[str]] = {
    "colour": COLOURS,
    "animal": ANIMALS + [p for p in ANIMALS_PLURAL if p not in ANIMALS],
    "number": NUMBER_WORDS + NUMBER_DIGITS,
    "place": COUNTRIES + CITIES,
    "positive": POSITIVE,
    "negative": NEGATIVE,
    "family": FAMILY,
    "food": FOODS,
    "weather": WEATHER,
    "time": TIME,
}
#: Concept groups (a group's words are the union of its members').
CONCEPT_GROUPS: dict[str, list[str]] = {"sentiment": ["positive", "negative"]}

_CONCEPT_OF: dict[str, str] = {}
for _c, _ws in CONCEPTS.items():
    for _w in _ws:
        if _w in _CONCEPT_OF:
            raise AssertionError(f"word {_w!r} is in two concepts: {_CONCEPT_OF[_w]}, {_c}")
        _CONCEPT_OF[_w] = _c


def concept_of(word: str) -> str | None:
    """The planted concept of ``word`` (case-insensitive), or None for an unlabelled word."""
    return _CONCEPT_OF.get(word.lower())


# Unlabelled filler vocabularies.
NAMES = ["anna", "ben", "clara", "david", "emma", "frank", "grace", "henry", "ivy", "jack", "kate", "leo",
         "mia", "noah", "olivia", "paul", "rose", "sam", "tom", "zoe"]
OBJECTS = ["house", "car", "box", "ball", "hat", "door", "boat", "kite", "chair", "book", "cup", "bag"]
PLACES_GENERIC = ["garden", "park", "kitchen", "forest", "village", "market", "school", "field", "river",
                  "farm"]
VERBS_ANIMAL = ["fed", "saw", "found", "liked", "chased", "painted", "followed", "photographed", "watched",
                "heard"]
VERBS_FOOD = ["ate", "cooked", "bought", "shared", "wanted", "made", "liked", "sold"]
VERBS_MOVE = ["walked", "ran", "travelled", "drove", "flew", "sailed"]
ADVERBS = ["very", "really", "quite", "so", "rather"]
FEEL_VERBS = ["felt", "was", "seemed", "looked"]

#: Fact objects with a canonical colour.
COLOUR_FACTS = [("sky", "blue"), ("sea", "blue"), ("grass", "green"), ("leaf", "green"), ("snow", "white"),
                ("milk", "white"), ("coal", "black"), ("crow", "black"), ("blood", "red"), ("tomato", "red"),
                ("cherry", "red"), ("banana", "yellow"), ("lemon", "yellow"), ("carrot", "orange"),
                ("chocolate", "brown"), ("pig", "pink"), ("elephant", "grey"), ("frog", "green"),
                ("grape", "purple")]
#: (animal, food it gives).
ANIMAL_FOOD_FACTS = [("cow", "milk"), ("bee", "honey"), ("hen", "egg"), ("goat", "cheese")]
#: (season, typical weather adjective).
SEASON_WEATHER = [("winter", "snowy"), ("summer", "sunny"), ("autumn", "windy"), ("spring", "rainy")]


# --------------------------------------------------------------------------------------------------------
# Plain-sentence templates
# --------------------------------------------------------------------------------------------------------
# A template is a space-separated string; "{slot}" draws a fresh filler, "{slot#k}" reuses binding k.

#: Words of every concept, eight each (so each concept is equally likely): the open slot of the neutral
#: sentences ("anna wrote a story about {topic} ."), where any concept may follow.
TOPICS = [w for ws in CONCEPTS.values() for w in ws[:8]]

#: Slot name -> its fillers (a filler may be several words, e.g. "on monday").
SLOTS: dict[str, list[str]] = {
    "colour": COLOURS, "animal": ANIMALS, "animals": ANIMALS_PLURAL, "country": COUNTRIES, "city": CITIES,
    "place": COUNTRIES + CITIES, "pos": POSITIVE, "neg": NEGATIVE, "sent": POSITIVE + NEGATIVE,
    "family": FAMILY, "food": FOODS, "wnoun": WEATHER_NOUNS, "wadj": WEATHER_ADJS, "day": DAYS,
    "month": MONTHS, "season": SEASONS, "part": DAY_PARTS, "rel": RELATIVE_DAYS, "name": NAMES,
    "object": OBJECTS, "spot": PLACES_GENERIC, "vanimal": VERBS_ANIMAL, "vfood": VERBS_FOOD,
    "vmove": VERBS_MOVE, "adv": ADVERBS, "feel": FEEL_VERBS,
    "topic": TOPICS, "count": NUMBER_WORDS[2:], "countd": NUMBER_DIGITS[2:],
    "when": ["on " + d for d in DAYS] + ["in " + m for m in MONTHS] + ["in the " + p for p in DAY_PARTS[:3]]
    + ["at night"] + RELATIVE_DAYS + ["in " + s for s in SEASONS],
}

PLAIN_TEMPLATES = [
    "the {colour} {animal} ate the {food} in {place} .",
    "my {family} has a {colour} {animal} .",
    "my {family} has {count} {animals} and a {colour} {object} .",
    "{name} has {countd} {animals} in the {spot} .",
    "{when} it was {wadj} in {place} .",
    "{when} my {family} {vanimal} a {colour} {animal} .",
    "{name} {vanimal} the {animal} near the {spot} {when} .",
    "the weather in {place} is {wadj} {rel} .",
    "there was {wnoun} in {place} on {day} .",
    "my {family} thinks the {food} is {adv} {sent} .",
    "the {food} in {place} was {adv} {sent} .",
    "{name} {feel} {sent} because the {wnoun} came {when} .",
    "{name} {vfood} {food} with her {family} {when} .",
    "{name} {vfood} {food} with his {family} in {place} .",
    "the {animal} and the {animal} played in the {wnoun} .",
    "a {pos} {animal} lives in the {spot} near {place} .",
    "a {neg} {animal} broke the {colour} {object} .",
    "{name} {vmove} to {place} with a {colour} {object} {when} .",
    "{name} {vmove} from {place} to {place} in {month} .",
    "in {season} the {spot} in {place} is {adv} {pos} .",
    "my {family} painted the {object} {colour} and {colour} .",
    "{count} {colour} {animals} sat in the {wnoun} .",
    "{name} counted {count} {animals} and {count} {animals} .",
    "the {family} of {name} likes {food} and {food} .",
    "it is {wadj} {when} , so {name} stays in the {object} .",
    "{name} says the {wnoun} in {place} is {neg} .",
    "{name} says the {colour} {food} is {pos} .",
    "on a {wadj} {part} the {animal} ate some {food} .",
    "the {colour} {object} belongs to my {family} from {place} .",
    "{name} and her {family} had {food} for dinner {when} .",
    "what a {sent} {part} in {place} !",
    "the {animals} in {place} are {colour} and {sent} .",
    "{name} bought {countd} {food} at the market on {day} .",
    "my {family} was born in {place} in {month} .",
    "the {wnoun} made the {animal} {adv} {neg} .",
    "{name} is a {pos} friend of my {family} .",
    "after the {wnoun} , the {spot} looked {sent} and {colour} .",
    # neutral sentences: any concept fills the slot (tasks.NEUTRAL_TEMPLATES are the steering prompts)
    "{name} wrote a story about {topic} .",
    "{name} talked about {topic} all day .",
]


# --------------------------------------------------------------------------------------------------------
# Facts
# --------------------------------------------------------------------------------------------------------

def _fact_items() -> list[tuple[str, list[str], list[str], str]]:
    """Every fact as (relation, prefix words, answer words, suffix) in its canonical phrasing."""
    items = []
    for country, city in CAPITALS:
        items.append(("capital", f"the capital of {country} is".split(), [city], "."))
    for obj, col in COLOUR_FACTS:
        items.append(("colour", f"the colour of the {obj} is".split(), [col], "."))
    for i, d in enumerate(DAYS):
        items.append(("day_after", f"the day after {d} is".split(), [DAYS[(i + 1) % 7]], "."))
    for i, m in enumerate(MONTHS):
        items.append(("month_after", f"the month after {m} is".split(), [MONTHS[(i + 1) % 12]], "."))
    for p, n in OPPOSITES:
        items.append(("opposite", f"the opposite of {p} is".split(), [n], "."))
        items.append(("opposite", f"the opposite of {n} is".split(), [p], "."))
    for (a, b), ans in FAMILY_FACTS:
        items.append(("family", f"the {a} of my {b} is my".split(), [ans], "."))
    for a, f in ANIMAL_FOOD_FACTS:
        items.append(("animal_food", f"the {a} gives us".split(), [f], "."))
    for s, w in SEASON_WEATHER:
        items.append(("season", f"in {s} the weather is often".split(), [w], "."))
    for i in range(MAX_NUMBER):
        items.append(("number_after", f"the number after {NUMBER_WORDS[i]} is".split(), [NUMBER_WORDS[i + 1]], "."))
    return items


#: Every fact, canonical phrasing: the fact samples, the closed Q&A items and the ``fact`` decoding tasks.
FACTS = _fact_items()
