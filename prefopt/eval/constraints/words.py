"""The constraint benchmark's data: word lists, topics, number words and prompt templates.

Every list is sorted or fixed in order: the generators draw from them by index, so reordering
one changes every task (tests/test_constraints.py::test_split_hash_is_pinned).
"""

from __future__ import annotations


def _w(text: str) -> list[str]:
    return text.split()


# ---------------------------------------------------------------- word lists
CATEGORIES: dict[str, list[str]] = {
    "fruits": _w("apple banana cherry grape lemon mango peach pear plum kiwi melon papaya"),
    "animals": _w("cat dog horse cow sheep goat lion tiger zebra rabbit mouse fox wolf bear"),
    "colours": _w("red blue green yellow purple black white pink brown grey"),
    "vegetables": _w("carrot potato onion pepper cabbage lettuce spinach celery leek"),
    "vehicles": _w("car bus train bike boat truck plane tram scooter van"),
    "birds": _w("robin sparrow eagle owl crow duck swan pigeon parrot hawk"),
    "instruments": _w("piano guitar violin drum flute trumpet harp cello"),
    "tools": _w("hammer wrench drill shovel rake chisel pliers ladder"),
}
ALL_ITEMS = sorted({w for items in CATEGORIES.values() for w in items})
CAPITALS = dict(
    pair.split(":")
    for pair in _w(
        "France:Paris Germany:Berlin Italy:Rome Spain:Madrid Portugal:Lisbon Greece:Athens "
        "Norway:Oslo Sweden:Stockholm Finland:Helsinki Denmark:Copenhagen Poland:Warsaw "
        "Austria:Vienna Hungary:Budapest Ireland:Dublin Russia:Moscow Egypt:Cairo Kenya:Nairobi "
        "Japan:Tokyo China:Beijing Thailand:Bangkok Vietnam:Hanoi Peru:Lima Chile:Santiago "
        "Canada:Ottawa Australia:Canberra Turkey:Ankara Iran:Tehran Iraq:Baghdad Cuba:Havana "
        "Belgium:Brussels Netherlands:Amsterdam Switzerland:Bern Czechia:Prague Ukraine:Kyiv "
        "Romania:Bucharest Nigeria:Abuja Ghana:Accra Morocco:Rabat Colombia:Bogota "
        "Venezuela:Caracas Indonesia:Jakarta Philippines:Manila Nepal:Kathmandu Bulgaria:Sofia "
        "Serbia:Belgrade Croatia:Zagreb Slovakia:Bratislava Latvia:Riga Lithuania:Vilnius "
        "Estonia:Tallinn Iceland:Reykjavik Senegal:Dakar Tunisia:Tunis Algeria:Algiers "
        "Sudan:Khartoum Uganda:Kampala Zimbabwe:Harare Pakistan:Islamabad Bangladesh:Dhaka "
        "Syria:Damascus Jordan:Amman Lebanon:Beirut Qatar:Doha Ecuador:Quito Uruguay:Montevideo "
        "Jamaica:Kingston Brazil:Brasilia"
    )
)
EXTRA_WORDS = _w(
    "garden window pencil rocket silver planet forest bottle candle marble basket button castle "
    "dragon engine feather jacket kettle lantern mirror needle pocket puzzle saddle shadow "
    "thunder tunnel velvet wallet whistle blanket carpet cookie helmet island jungle ribbon "
    "statue ticket anchor"
)
WORDS = sorted(set(ALL_ITEMS) | set(EXTRA_WORDS))
# topic as it appears in a prompt -> the word whose mention (or plural) counts as "on topic"
TOPICS = {
    topic.replace("_", " "): key or topic.removesuffix("s")
    for topic, _, key in (
        pair.partition(":")
        for pair in _w(
            "the_ocean:ocean coffee elephants the_moon:moon winter bicycles libraries:library "
            "volcanoes:volcano honey_bees:bee rain mountains chess:chess bread the_desert:desert "
            "trains music gardens penguins the_sun:sun forests rivers owls snow tea cities:city "
            "islands storms clocks cats dogs books stars apples football the_wind:wind bridges "
            "rainbows dolphins candles kites the_internet:internet chocolate pizza rockets "
            "dinosaurs butterflies:butterfly lighthouses castles robots trees clouds pianos cheese "
            "whales spiders frogs glaciers caves sharks tigers horses airplanes umbrellas maps "
            "mushrooms earthquakes the_brain:brain sleep friendship summer autumn paper salt gold "
            "glass:glass deserts:desert bees:bee"
        )
    )
}
TOPIC_NAMES = sorted(TOPICS)
KEYWORDS = _w(
    "journey window morning shadow whisper mirror lantern thunder velvet harbor meadow puzzle "
    "feather compass ladder secret blanket pocket ribbon tunnel whistle anchor treasure silence"
)
END_PHRASES = [
    "Is there anything else I can help with?",
    "That is all.",
    "Any other questions?",
    "Hope this helps!",
    "Thanks for asking.",
    "Have a nice day!",
    "The end.",
    "And that is a fact.",
]
ADJECTIVES = _w("calm bright gentle quiet vast old simple lovely strange familiar warm cool")
REFUSAL_MARKERS = ("not sure", "can't", "cannot", "don't know", "sorry", "rather not", "no idea")
ONES = _w(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
)
TENS = _w("_ _ twenty thirty forty fifty sixty seventy eighty ninety")


def num_words(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + (f"-{ONES[n % 10]}" if n % 10 else "")
    rest = n % 100
    return f"{ONES[n // 100]} hundred" + (f" {num_words(rest)}" if rest else "")


NUMBER_PHRASES = sorted(((num_words(m), m) for m in range(1, 1000)), key=lambda p: -len(p[0]))


def _templates(block: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in block.strip().splitlines():
        name, template = line.split(": ", 1)
        out.setdefault(name, []).append(template)
    return out


# ---------------------------------------------------------------- prompt templates
# "family: template" lines. A "<family>/sentence" prompt (drawn a third of the time) asks for a
# complete sentence, which then becomes the exact answer and the bare answer a format miss.
PROMPTS = _templates("""
arithmetic: What is {a} {op} {b}? Reply with just the number.
arithmetic: Compute {a} {op} {b}. Answer with only the number.
arithmetic: Calculate {a} {op} {b} and reply with the number only.
arithmetic/sentence: What is {a} {op} {b}? Answer in a complete sentence.
larger: Which is larger, {a} or {b}? Reply with just the number.
larger: Which number is bigger: {a} or {b}? Answer with the number only.
larger/sentence: Which is larger, {a} or {b}? Answer in a complete sentence.
case: Write the word '{s}' in {m}case. Reply with only the word.
case: Convert '{s}' to {m}case and reply with just the result.
capital: What is the capital of {c}? Answer in one word.
capital: Name the capital city of {c}. Reply with just the city name.
capital: Which city is the capital of {c}? One word only.
capital/sentence: What is the capital of {c}? Answer in a complete sentence.
list: List {n} {c} as a bullet list.
list: Name {n} {c}. Format them as a bullet list, one per line.
list: Give me {n} {c} as a bullet list, one per line, nothing else.
list: Write a bullet list of {n} {c}.
reverse: Reverse the order of these words: {l}. Reply with the words separated by commas.
reverse: Write this list in reverse order, comma-separated, nothing else: {l}.
reverse: Reverse the list {l}. Reply with only the reversed list.
backwards: Spell the word '{w}' backwards. Reply with only the reversed word.
backwards: What is '{w}' spelled backwards? Answer with just the word.
backwards: Write '{w}' with its letters in reverse order. Reply with only that.
number_words: Write the number {n} in words. Reply with only the words.
number_words: Spell out {n} in English words, nothing else.
number_words: How do you write {n} in words? Answer with just the words.
number_words/sentence: How is {n} written in words? Answer in a complete sentence.
word_count: Describe {t} in exactly {n} words.
word_count: Write exactly {n} words about {t}.
keywords: Write one sentence about {t} that uses the words '{a}' and '{b}'.
keywords: Write a single sentence about {t} using the words '{a}' and '{b}'.
lowercase: Write a short sentence about {t} using only lowercase letters.
lowercase: Write one short sentence about {t}. Use only lowercase letters, no capitals.
lowercase: Describe {t} in one short sentence, written entirely in lowercase letters.
lowercase: Say something about {t} in a short sentence using only lowercase letters.
ending: Tell me one fact about {t}. End your reply with the exact phrase '{e}'
ending: Share one fact about {t}, and end your reply with the exact phrase '{e}'
lowercase_keyword: Write a sentence about {t} using only lowercase letters and the word '{a}'.
lowercase_keyword: Using only lowercase letters, write one sentence about {t} that includes '{a}'.
""")
