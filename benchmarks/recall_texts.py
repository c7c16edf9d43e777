"""The recall benchmark's own texts (benchmarks/recall_bench.py): names, cities, facts and how they are asked for,
story topics, and the parts prose is built from, per set. Seven sets: "tuning" chose the recall constants, "held-out"
was reported and also looked at while comparing thresholds, "fresh" showed a failure that was then fixed, "final"
was reported until stop 32, when its failures were read to find the rival-sentence problem, "sealed" (written
before that change) showed the change's first form failing, "closing" (written before it was redesigned) showed
recall bringing back prose when the fact was still cached, and "last" (written before that was changed) is only
ever reported."""

from __future__ import annotations

import random

SETS = {
    "tuning": {
        "names": ["Maria", "Tom", "Aiko", "Pedro", "Lena", "Omar", "Greta", "Ravi"],
        "cities": ["Lisbon", "Oslo", "Kyoto", "Quito"],
        "seed": 1,
    },
    "held-out": {
        "names": ["Ingrid", "Kwame", "Sofia", "Dmitri", "Yuki", "Fatima", "Lucas", "Priya"],
        "cities": ["Dublin", "Nairobi", "Hanoi", "Tallinn"],
        "seed": 2,
    },
    # written after every recall constant was chosen and only ever reported (stop 31): other names, other
    # details around the number, other stories, other wordings
    "fresh": {
        "names": ["Nadia", "Bjorn", "Camille", "Tariq", "Mei", "Joao", "Helga", "Arjun"],
        "cities": ["Porto", "Bergen", "Lyon", "Amman"],
        "seed": 3,
        "stories": ["a lighthouse keeper and a lost whale", "two rival bakers in a small town", "a comet that sings"],
        "fact": "{name}'s ticket number is {code}.",
        "cue": "Earlier we noted that {name}'s ticket number is",
        "opening": "Hello! I'm {name}, I live in {city} and I work as a nurse. {fact} Could you write me a long story "
        "about {story}?",
    },
    # written after "fresh" had shown recall failing on a cue worded like the earlier reminders (stop 31) and before
    # anything was changed for it; only ever reported
    "final": {
        "names": ["Olga", "Kenji", "Amara", "Piotr", "Leila", "Mateo", "Sven", "Zainab"],
        "cities": ["Riga", "Osaka", "Accra", "Krakow"],
        "seed": 4,
        "stories": ["a fox who opens a tea shop", "an astronaut who loses her keys", "a village where it never snows"],
        "opening": "Hey there. My name is {name} and I'm visiting from {city}. {fact} Tell me a long story about "
        "{story}, please.",
        "fact": "{name} was given the PIN {code}.",
        "cue": "To repeat what was written above, {name} was given the PIN",
    },
    # written at the start of stop 32, before the rival-sentence change it checks, and only ever reported: other
    # names, wordings, prose and stories again
    "sealed": {
        "names": ["Rosa", "Emeka", "Hiro", "Ines", "Tomasz", "Anouk", "Vikram", "Lucia"],
        "cities": ["Valencia", "Lagos", "Sapporo", "Gdansk"],
        "seed": 5,
        "stories": ["a clockmaker who repairs time", "a cat that runs a post office", "a storm chaser in Kansas"],
        "opening": "Good evening! {name} here, writing from {city}. {fact} I'd love a long story about {story}.",
        "fact": "The locker assigned to {name} opens with {code}.",
        "cue": "As stated before, the locker assigned to {name} opens with",
    },
    # written in stop 32 after "sealed" had shown the first rival rule failing, before the rule was redesigned;
    # only ever reported
    "closing": {
        "names": ["Greta", "Bongani", "Yusuf", "Marisol", "Henrik", "Chiara", "Dara", "Soren"],
        "cities": ["Bilbao", "Durban", "Izmir", "Tromso"],
        "seed": 6,
        "stories": ["a baker who bakes bread for ghosts", "a boy who befriends a glacier", "a radio that hears stars"],
        "opening": "Hi again, it's {name} from {city}. {fact} Could you tell me a long story about {story}?",
        "fact": "For the record, {name}'s bank card ends in {code}.",
        "cue": "Just a reminder that {name}'s bank card ends in",
    },
    # written in stop 32 after "closing" had shown recall bringing back prose when the fact was still cached,
    # before anything was changed for it; only ever reported
    "last": {
        "names": ["Wanjiru", "Felix", "Noor", "Agnieszka", "Kofi", "Ilse", "Rafael", "Mirela"],
        "cities": ["Mombasa", "Graz", "Muscat", "Cluj"],
        "seed": 7,
        "stories": ["a knight afraid of horses", "twins who swap lives for a day", "a garden that grows at night"],
        "opening": "Hello, {name} speaking, from {city}. {fact} Please write a long and detailed story about {story}.",
        "fact": "The parcel addressed to {name} carries the tracking code {code}.",
        "cue": "Once more, the parcel addressed to {name} carries the tracking code",
    },
}
STORIES = ["a dragon who guards a library", "a pirate ship lost in fog", "a robot learning to paint"]
# (how the user states the number, how the user asks for it later), per set; the later ones share few words with
# the fact, so lexical relevance has little to go on
DIALOGUE_FACTS = {
    "tuning": [
        ("My locker number is {num}.", "What is my locker number?"),
        ("My gym membership code is {num}.", "Can you remind me of the number I mentioned in my first message?"),
    ],
    "held-out": [
        ("My apartment door PIN is {num}.", "What was my PIN again?"),
        ("My customer ID is {num}.", "Quick question: which 5-digit number did I give you earlier?"),
    ],
    "fresh": [
        ("My bike lock combination is {num}.", "Sorry, what was my bike lock combination?"),
        ("The number on my parking permit is {num}.", "Do you still remember the number from my first message?"),
        ("My library card number is {num}.", "Remind me: what is my library card number?"),
        ("My flight booking reference is {num}.", "What number did I tell you when we started talking?"),
    ],
    "final": [
        ("The code for my storage unit is {num}.", "What's the code for my storage unit?"),
        ("My membership number is {num}.", "I forgot: what number did I share with you at the very beginning?"),
        ("My hotel room number is {num}.", "Which hotel room am I staying in?"),
        ("I'll pay with the voucher code {num}.", "Can you repeat the voucher code I gave you?"),
    ],
    "sealed": [
        ("My train seat reservation is {num}.", "What was my seat reservation?"),
        ("The tracking number for my parcel is {num}.", "Could you tell me the tracking number again?"),
        ("My employee badge says {num}.", "Which number was on my badge?"),
        ("Our wifi password is {num}.", "Hmm, what digits did I say at the start of our chat?"),
    ],
    "closing": [
        ("My new phone extension is {num}.", "What is my phone extension?"),
        ("The gate code at my building is {num}.", "Tell me the gate code please."),
        ("My order number is {num}.", "Which order number did I mention before the stories?"),
        ("My cousin's house number is {num}.", "What was the number I told you at the beginning?"),
    ],
    "last": [
        ("My passport ends with the digits {num}.", "What digits does my passport end with?"),
        ("The alarm code for the office is {num}.", "Could you remind me of the office alarm code?"),
        ("My loyalty card number is {num}.", "Which number did I give you in my first message?"),
        ("The pickup code for my groceries is {num}.", "What is the code I need for the pickup?"),
    ],
}
OPENING = "Hi, I'm {name} from {city}. {fact} Please write me a long story about {story}."


# Prose is built from these parts, seeded per set: varied, fluent enough for a small model, and sharing no words
# with the facts' names
PROSE = {
    "last": {
        "who": ["The old ferryman", "A shy violinist", "The head gardener", "Our neighbour's aunt", "The night porter"],
        "did": ["polished", "wrote a poem about", "dropped", "painted over", "searched everywhere for"],
        "what": ["the silver teapot", "a stack of blankets", "the garden gate", "a faded photograph", "the bell tower"],
        "then": [
            "when the tide came in",
            "while the soup was cooking",
            "before the guests arrived",
            "as the lanterns flickered",
            "on the last day of summer",
        ],
    },
    "closing": {
        "who": ["The weary postman", "A cheerful nun", "The harbour master", "Their youngest son", "The tailor"],
        "did": ["carried", "talked at length about", "fixed", "hid", "drew a map of"],
        "what": ["the wooden cart", "a jar of honey", "the chapel roof", "a box of letters", "the village clock"],
        "then": [
            "before the market opened",
            "while the geese were honking",
            "after the long rain",
            "as the evening train passed",
            "in the early morning fog",
        ],
    },
    "sealed": {
        "who": ["The lighthouse cook", "A nervous tourist", "The school janitor", "My grandmother", "The bus driver"],
        "did": ["complained about", "quietly admired", "repainted", "forgot all about", "measured"],
        "what": ["the copper kettle", "a pile of old maps", "the marble staircase", "a rusty tractor", "the orchard"],
        "then": [
            "after the festival ended",
            "while the radio played jazz",
            "before the ferry left",
            "on a windy afternoon",
            "as the clouds gathered",
        ],
    },
    "final": {
        "who": ["The shepherd", "A sleepy guard", "The old carpenter", "Her cousin", "The street musician"],
        "did": ["painted", "argued about", "sold", "dreamed of", "walked around"],
        "what": ["the stone well", "a basket of apples", "the windmill on the hill", "a blue bicycle", "the harbour"],
        "then": [
            "while the kettle boiled",
            "before the storm arrived",
            "as the children sang",
            "long after midnight",
            "under a grey sky",
        ],
    },
    "fresh": {
        "who": ["The ferry captain", "A retired librarian", "The village doctor", "Our landlord", "The mail carrier"],
        "did": ["carefully inspected", "wrote a letter about", "laughed at", "took a photograph of", "waited beside"],
        "what": [
            "the frozen canal",
            "a crate of oranges",
            "the bridge near the station",
            "a crooked wooden fence",
            "the new bakery",
        ],
        "then": [
            "until the lamps were lit",
            "during the long winter evening",
            "while the dogs barked outside",
            "before anyone else woke up",
            "as snow covered the rooftops",
        ],
    },
    "tuning": {
        "who": [
            "The old fisherman",
            "A young teacher",
            "The baker on the corner",
            "My neighbour",
            "The tired traveller",
            "A quiet student",
        ],
        "did": [
            "walked slowly along",
            "often thought about",
            "painted a picture of",
            "told a long story about",
            "searched all morning for",
            "cleaned and repaired",
        ],
        "what": [
            "the narrow harbour road",
            "a small wooden boat",
            "the garden behind the school",
            "the empty market square",
            "an old brass lamp",
            "the hills above the valley",
        ],
        "then": [
            "while the rain kept falling",
            "before the sun went down",
            "as the bells rang in the tower",
            "when the wind turned cold",
            "after a simple lunch of bread and soup",
            "although nobody was watching",
        ],
    },
    "held-out": {
        "who": [
            "The engineer",
            "An elderly gardener",
            "The night nurse",
            "A curious child",
            "The shop owner",
            "Our driver",
        ],
        "did": [
            "carefully measured",
            "slowly climbed",
            "sketched the outline of",
            "argued for an hour about",
            "kept a diary about",
            "photographed",
        ],
        "what": [
            "the iron bridge over the river",
            "the steep path to the chapel",
            "a field of sunflowers",
            "the crowded railway station",
            "a broken clock",
            "the frozen lake",
        ],
        "then": [
            "during the long winter evenings",
            "until the lights went out",
            "while the kettle boiled",
            "as the snow began to melt",
            "before anyone else woke up",
            "and then went home to rest",
        ],
    },
}


def filler(set_name: str, n_sentences: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    parts = PROSE[set_name]
    return [" ".join(rng.choice(parts[k]) for k in ("who", "did", "what", "then")) + "." for _ in range(n_sentences)]


def continuation_facts(set_name: str) -> tuple[random.Random, list[tuple[str, str]], str, str]:
    """The continuation task's facts for a set: its random source (next used to order the reminders), the
    (name, 5-digit code) pairs, and the fact and cue templates."""
    s = SETS[set_name]
    rng = random.Random(s["seed"])
    facts = [(n, f"{rng.randrange(10000, 100000)}") for n in s["names"]]
    fact = s.get("fact", "The code for {name} is {code}.")
    cue = s.get("cue", "As recorded at the start, the code for {name} is")
    return rng, facts, fact, cue
