"""The small story world behind the builtin corpus: who, where, what, and the sentence templates that tell it.

Everything here is data plus one composer. A story is a `Cast` (hero, friend, place, object, feelings, weather,
time, ending word, plot) told by `compose()`: an opening, optional character details, a setting, optional place
description, the plot's stages (problem, friend, trouble, resolution, each with many templates), an optional lesson
and an ending sentence whose last word is the cast's ending word. The same composer writes the pretraining stories,
the instruction answers, the preference pairs and the cloze stories, so a model pretrained on the corpus already
knows the style that SFT asks for.

Rules the templates keep, because the checker and the quality filters rely on them:
  * one template = one sentence; `!`/`?` appear only at the very end (dialogue is `X said, "...!"`), so counting
    sentence-final punctuation counts sentences;
  * no "...", no bullets, no web words (cookie, javascript, terms of use, lorem ipsum), nothing from common bad-word
    lists;
  * names, animals, places, objects and feelings are disjoint word sets, so "the story mentions X" is a plain
    case-insensitive whole-word test (`mention_regex`).
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

from tasks.common.degeneration import words

# ------------------------------------------------------------------------------------------------ vocabulary

NAMES: dict[str, str] = {  # name -> pronoun ("he" | "she")
    "Max": "he",
    "Lily": "she",
    "Tom": "he",
    "Mia": "she",
    "Ben": "he",
    "Sue": "she",
    "Sam": "he",
    "Anna": "she",
    "Tim": "he",
    "Lucy": "she",
    "Jack": "he",
    "Emma": "she",
    "Leo": "he",
    "Zoe": "she",
    "Finn": "he",
    "Ella": "she",
    "Noah": "he",
    "Rosie": "she",
    "Oliver": "he",
    "Molly": "she",
    "Toby": "he",
    "Lola": "she",
    "Oscar": "he",
    "Chloe": "she",
    "Henry": "he",
    "Nora": "she",
    "Milo": "he",
    "Maya": "she",
    "Theo": "he",
    "Luna": "she",
    "Hugo": "he",
    "Clara": "she",
    "Eli": "he",
    "Sara": "she",
    "Owen": "he",
    "Lena": "she",
    "Kai": "he",
    "Pia": "she",
    "Bruno": "he",
    "Amara": "she",
    "Felix": "he",
    "Iris": "she",
    "Jasper": "he",
    "Nina": "she",
    "Arlo": "he",
    "Tessa": "she",
    "Omar": "he",
    "Greta": "she",
    "Ravi": "he",
    "Kira": "she",
}

ANIMALS: tuple[str, ...] = (
    "dog",
    "cat",
    "rabbit",
    "bear",
    "fox",
    "owl",
    "duck",
    "frog",
    "mouse",
    "pig",
    "cow",
    "horse",
    "sheep",
    "goat",
    "lion",
    "tiger",
    "elephant",
    "monkey",
    "giraffe",
    "zebra",
    "turtle",
    "squirrel",
    "hedgehog",
    "deer",
    "wolf",
    "penguin",
    "seal",
    "dolphin",
    "panda",
    "koala",
    "kangaroo",
    "hippo",
    "chicken",
    "bee",
    "butterfly",
    "ladybug",
    "snail",
    "crab",
    "parrot",
    "robin",
    "swan",
    "otter",
    "raccoon",
    "lamb",
    "donkey",
    "mole",
    "lizard",
    "whale",
)

# place -> (preposition for "at the place", three things found there)
PLACES: dict[str, tuple[str, tuple[str, str, str]]] = {
    "park": ("in", ("green grass", "tall trees", "colorful swings")),
    "forest": ("in", ("tall pines", "soft moss", "tiny mushrooms")),
    "beach": ("at", ("soft sand", "big waves", "pretty seashells")),
    "garden": ("in", ("bright flowers", "green leaves", "tall sunflowers")),
    "farm": ("on", ("big haystacks", "muddy paths", "wooden fences")),
    "river": ("by", ("cool water", "smooth stones", "tall reeds")),
    "lake": ("by", ("clear water", "lily pads", "little sailboats")),
    "hill": ("on", ("soft grass", "wild flowers", "windy paths")),
    "meadow": ("in", ("tall grass", "yellow flowers", "fluttering leaves")),
    "library": ("at", ("tall shelves", "comfy chairs", "quiet corners")),
    "school": ("at", ("small desks", "bright posters", "colorful chalk")),
    "zoo": ("at", ("noisy crowds", "wide paths", "green bushes")),
    "market": ("at", ("fresh fruit", "busy stalls", "colorful carts")),
    "bakery": ("at", ("warm bread", "sweet buns", "tasty pies")),
    "playground": ("at", ("tall slides", "fast swings", "sandy corners")),
    "pond": ("by", ("green lily pads", "still water", "floating leaves")),
    "cave": ("in", ("dark corners", "shiny rocks", "dripping water")),
    "castle": ("at", ("tall towers", "stone walls", "long hallways")),
    "village": ("in", ("little houses", "narrow streets", "friendly neighbors")),
    "mountain": ("on", ("rocky paths", "icy peaks", "white snow")),
    "island": ("on", ("palm trees", "warm sand", "blue water")),
    "jungle": ("in", ("thick vines", "huge leaves", "bright orchids")),
    "field": ("in", ("golden wheat", "tall grass", "wild poppies")),
    "barn": ("in", ("soft hay", "wooden beams", "old tools")),
    "kitchen": ("in", ("shiny pots", "warm ovens", "clean plates")),
    "museum": ("at", ("old paintings", "tall statues", "glass cases")),
    "harbor": ("at", ("big ships", "fishing boats", "wooden docks")),
    "orchard": ("in", ("apple trees", "ripe fruit", "green leaves")),
    "valley": ("in", ("rolling slopes", "wild flowers", "winding streams")),
    "bridge": ("on", ("wooden planks", "strong ropes", "rushing water")),
    "toy shop": ("at", ("shiny toys", "colorful games", "tiny trains")),
    "treehouse": ("in", ("rope ladders", "wooden walls", "small windows")),
    "desert": ("in", ("hot sand", "tall cacti", "rolling dunes")),
    "city": ("in", ("tall buildings", "busy streets", "bright lights")),
    "swamp": ("in", ("muddy water", "tall reeds", "hanging moss")),
    "lighthouse": ("at", ("winding stairs", "round windows", "rocky shores")),
    "circus": ("at", ("colorful tents", "bright banners", "funny clowns")),
}

OBJECTS: tuple[str, ...] = (
    "ball",
    "kite",
    "hat",
    "book",
    "drum",
    "toy boat",
    "balloon",
    "shell",
    "key",
    "cup",
    "bell",
    "scarf",
    "basket",
    "lamp",
    "flute",
    "crayon",
    "paintbrush",
    "spoon",
    "bucket",
    "shovel",
    "sock",
    "coin",
    "feather",
    "umbrella",
    "clock",
    "wagon",
    "bike",
    "puzzle",
    "marble",
    "whistle",
    "ribbon",
    "jar",
    "candle",
    "teapot",
    "toy robot",
    "doll",
    "trumpet",
    "pebble",
    "acorn",
    "pinecone",
    "mitten",
    "button",
    "backpack",
    "compass",
    "lantern",
    "bowl",
    "sled",
    "crown",
    "necklace",
    "pillow",
    "violin",
    "guitar",
    "telescope",
    "magnet",
    "pencil",
    "notebook",
)

COLORS: tuple[str, ...] = (
    "red",
    "blue",
    "green",
    "yellow",
    "pink",
    "purple",
    "orange",
    "white",
    "brown",
    "golden",
    "silver",
    "gray",
)
TRAITS: tuple[str, ...] = (
    "little",
    "small",
    "young",
    "kind",
    "playful",
    "clever",
    "gentle",
    "friendly",
    "silly",
    "busy",
    "tiny",
    "fluffy",
    "quiet",
    "smart",
    "funny",
    "helpful",
    "curious",
    "brave",
    "shy",
    "lively",
    "polite",
    "clumsy",
)
VIRTUES: tuple[str, ...] = (
    "kind",
    "helpful",
    "polite",
    "gentle",
    "friendly",
    "brave",
    "patient",
    "honest",
    "careful",
    "generous",
)
NEGATIVE_FEELINGS: tuple[str, ...] = ("sad", "scared", "worried", "lonely", "nervous", "upset", "grumpy", "angry")
POSITIVE_FEELINGS: tuple[str, ...] = (
    "happy",
    "glad",
    "proud",
    "excited",
    "grateful",
    "cheerful",
    "hopeful",
    "calm",
    "relieved",
    "joyful",
)
FEELINGS: tuple[str, ...] = NEGATIVE_FEELINGS + POSITIVE_FEELINGS
WEATHERS: tuple[str, ...] = ("sunny", "rainy", "windy", "snowy", "cloudy", "foggy")
TIMES: tuple[str, ...] = ("morning", "afternoon", "evening")
SEASONS: tuple[str, ...] = ("spring", "summer", "autumn", "winter")
HELPERS: tuple[str, ...] = ("mom", "dad", "grandma", "grandpa", "big sister", "big brother", "aunt", "uncle", "teacher")
HOMES: tuple[str, ...] = (
    "in a small house by the road",
    "in a cozy little home",
    "at the edge of the woods",
    "near a tall oak tree",
    "in a house with a red door",
    "in a warm little den",
    "under a big old tree",
    "by a little stream",
    "on a quiet street",
    "in a round house on a hill top",
)
ACTIVITIES: tuple[str, ...] = (
    "play tag",
    "sing songs",
    "dance",
    "read stories",
    "draw pictures",
    "jump in puddles",
    "climb trees",
    "pick flowers",
    "look at the clouds",
    "play hide and seek",
    "collect leaves",
    "count the stars",
    "build with blocks",
    "splash in the water",
    "run in the grass",
    "tell jokes",
    "watch the birds",
    "play games",
    "make funny faces",
    "hum little tunes",
)
FOODS: tuple[str, ...] = (
    "apples",
    "berries",
    "honey",
    "carrots",
    "cake",
    "pie",
    "bread",
    "soup",
    "sandwiches",
    "pears",
    "plums",
    "corn",
    "cheese",
    "pancakes",
    "grapes",
    "muffins",
    "oatmeal",
)
SPOTS: tuple[str, ...] = (
    "under a big rock",
    "behind a tree",
    "inside an old crate",
    "under a pile of leaves",
    "next to the gate",
    "in the tall grass",
    "under a bench",
    "near the water",
    "behind a bush",
    "on top of a wall",
    "in a small hole",
    "beside a flower pot",
    "under a wooden table",
    "inside a hollow log",
)
SOUNDS: tuple[str, ...] = (
    "the wind",
    "singing birds",
    "running water",
    "rustling leaves",
    "buzzing insects",
    "the waves",
    "children laughing",
)
SMELLS: tuple[str, ...] = ("flowers", "fresh rain", "warm bread", "pine needles", "the sea", "sweet honey", "cut grass")
FEARS: tuple[str, ...] = (
    "the dark",
    "deep water",
    "high places",
    "loud thunder",
    "the big slide",
    "the tall ladder",
    "big waves",
    "strange noises",
)
PLANTS: tuple[str, ...] = ("sunflower", "pumpkin", "bean plant", "tomato plant", "apple tree", "rose bush")
LANDS: tuple[str, ...] = ("green hills", "tall trees", "blue rivers", "bright flowers", "soft snow", "golden fields")

# ------------------------------------------------------------------------------------------------ generic beats

OPENINGS: tuple[str, ...] = (
    "Once upon a time, there was {a_adj} {animal} named {name}.",
    "Once upon a time, {a_adj} {animal} named {name} lived {home}.",
    "There once was {a_adj} {animal} called {name}.",
    "{name} was {a_adj} {animal} who lived {home}.",
    "In a quiet little town, there lived {a_adj} {animal} named {name}.",
    "Long ago, {a_adj} {animal} named {name} lived {home}.",
    "This is a story about {a_adj} {animal} named {name}.",
    "{name} the {animal} was {adj} and {adj2}.",
    "Not far from here, there lived {a_adj} {animal} named {name}.",
    "Once upon a time, in a land full of {land}, lived {a_adj} {animal} called {name}.",
    "{name} was {a_adj} {animal} with a big heart.",
    "Meet {name}, {a_adj} {animal} who loved to {activity}.",
    "There was once {a_adj} {animal} named {name} who liked to {activity}.",
    "{name} was {a_adj} {animal}, and {he} lived {home}.",
    "Every day, {a_adj} {animal} named {name} woke up early.",
    "In a small village, there was {a_adj} {animal} named {name}.",
    "Once there was {a_adj} {animal} whose name was {name}.",
    "A long time ago, there was {a_adj} {animal} named {name}.",
    "{name} was the most {adj} {animal} anyone had ever met.",
    "Have you ever met {a_adj} {animal} named {name}?",
    "Once upon a time, {name} the {animal} lived {home} with {his} {helper}.",
    "Everyone in town knew {name}, {a_adj} {animal} with {color} spots on {his} nose.",
    "Far away, {home}, lived {a_adj} {animal} named {name}.",
    "{name} was {a_adj} {animal} who was always ready for fun.",
)

DETAILS: tuple[str, ...] = (
    "{He} loved to {activity} every day.",
    "{His} favorite food was {food}.",
    "{name} liked to {activity} with {his} {helper}.",
    "{He} lived with {his} {helper} and {his} cousins.",
    "{name} always tried to be {trait} to everyone.",
    "Everyone liked {name} because {he} was so {adj2}.",
    "{name} liked the color {color} more than any other color.",
    "Each morning, {name} ate {food} for breakfast.",
    "{His} {helper} always said that {he} was very {adj2}.",
    "{He} had a soft voice and a kind face.",
    "{name} liked to hum while {he} walked.",
    "{He} was small, but {he} was very {trait}.",
    "{name} liked to look at the sky and count the clouds.",
    "On rainy days, {name} liked to stay inside and {activity}.",
    "{name} had a little bed by the window.",
    "{His} best day of the week was always Saturday.",
    "{name} wanted to see every corner of the world one day.",
    "Sometimes {name} was {adj2}, but {he} always meant well.",
)

SETTINGS: tuple[str, ...] = (
    "One {weather} {time}, {name} went to {the_place}.",
    "One day, {name} decided to visit {the_place}.",
    "One {time}, {name} walked all the way to {the_place}.",
    "{name} went to {the_place} to {activity}.",
    "On a {weather} {time}, {name} and {his} {helper} went to {the_place}.",
    "Early one {time}, {name} ran to {the_place}.",
    "It was a {weather} day, so {name} went to play {at_place}.",
    "One {time}, {name} was playing {at_place}.",
    "That {time}, {name} set off for {the_place}.",
    "{name} loved going to {the_place}, and today was no different.",
    "One {season} {time}, {name} went for a walk to {the_place}.",
    "{name} wanted to spend the whole day {at_place}.",
    "The next {time}, {name} packed a bag and went to {the_place}.",
    "It was a {weather} {season} day, and {name} was {at_place}.",
    "After breakfast, {name} hurried to {the_place}.",
    "On the first day of {season}, {name} visited {the_place}.",
    "{name} and {his} {helper} spent the {time} {at_place}.",
    "One {weather} day, {name} found {him}self {at_place}.",
)

DESCRIPTIONS: tuple[str, ...] = (
    "{The_place} was full of {feature}.",
    "{name} saw {feature} and {feature2} everywhere.",
    "{name} loved the {feature} {at_place}.",
    "The air smelled of {smell}.",
    "Birds were singing in the trees nearby.",
    "{The_place} looked bright and pretty in the {time} light.",
    "{name} could see {feature} all around.",
    "It was quiet {at_place}, except for the sound of {sound}.",
    "{name} stopped to look at the {feature}.",
    "Near the path, {name} saw {feature}.",
    "{name} had never seen such {feature} before.",
)

WEATHER_SENTENCES: dict[str, tuple[str, ...]] = {
    "sunny": (
        "The sun was warm and bright.",
        "The sky was clear and blue.",
        "The sun smiled down from the sky.",
        "It was warm, and the sky had no clouds at all.",
    ),
    "rainy": (
        "Little drops of rain fell from the gray sky.",
        "The rain made small puddles on the ground.",
        "Rain tapped softly on the leaves.",
        "Everything was wet and shiny from the rain.",
    ),
    "windy": (
        "The wind was strong and made the leaves dance.",
        "A cool wind blew through the trees.",
        "The wind pushed the clouds across the sky.",
        "The wind whistled as it went by.",
    ),
    "snowy": (
        "Soft white snow covered the ground.",
        "Snowflakes fell slowly from the sky.",
        "Everything was cold and white.",
        "The snow made a soft sound under {name}'s feet.",
    ),
    "cloudy": (
        "Big gray clouds filled the sky.",
        "The clouds hid the sun.",
        "The sky was gray and quiet.",
        "Fluffy clouds drifted slowly across the sky.",
    ),
    "foggy": (
        "A thick fog hid the trees.",
        "Everything looked soft and gray in the fog.",
        "The fog was so thick that {name} could barely see.",
        "The morning fog slowly lifted.",
    ),
}

FRIEND_ARRIVALS: tuple[str, ...] = (
    "Just then, {friend} the {fanimal} came by.",
    "Soon, {a_fanimal} named {friend} walked up to {name}.",
    "After a while, {name} saw {friend} the {fanimal}.",
    "Then {name}'s friend {friend} the {fanimal} arrived.",
    "{A_fadj} {fanimal} named {friend} saw {name} and came over.",
    "At that moment, {friend} the {fanimal} came running.",
    "Before long, {friend} the {fanimal} found {name}.",
    "{name} was not alone for long, because {friend} the {fanimal} came along.",
    "Along came {friend}, {a_fadj} {fanimal} who lived nearby.",
    "Soon {name} met {friend}, {a_fanimal} with a friendly smile.",
)

NEGATIVE_BEATS: tuple[str, ...] = (
    "{name} felt very {neg}.",
    "{name} was {neg} and did not know what to do.",
    "{He} sat down and felt {neg}.",
    "This made {name} feel {neg}.",
    "{name} looked around and felt {neg}.",
    "{A_neg} feeling filled {name}'s heart.",
    "{name} was so {neg} that {his} ears drooped.",
    "{name} felt {neg} and wished for some help.",
    "For a moment, {name} felt {neg} and small.",
)

POSITIVE_BEATS: tuple[str, ...] = (
    "{name} felt so {pos}.",
    "{name} was very {pos}.",
    "It made {name} feel {pos} inside.",
    "{name} smiled because {he} felt {pos}.",
    "{He} had never felt so {pos} before.",
    "Now {name} felt {pos} and warm inside.",
    "{name} jumped up and down, feeling {pos}.",
    "{name} felt {pos} all the way down to {his} toes.",
    "What {a_pos} {animal} {name} was now!",
)

LESSON_BEATS: tuple[str, ...] = (
    "{name} learned that {lesson}.",
    "From that day on, {name} knew that {lesson}.",
    "That day, {name} learned an important lesson: {lesson}.",
    "{name} now understood that {lesson}.",
    "It was a good lesson: {lesson}.",
)

# The story's last sentence; its last word is the key.
ENDINGS: dict[str, tuple[str, ...]] = {
    "happy": (
        "And that made everyone very happy.",
        "{name} went home tired but happy.",
        "From then on, {name} was always happy.",
        "It was a day that made {name} truly happy.",
        "{name} and {friend} walked home, both of them happy.",
    ),
    "friends": (
        "From that day on, {name} and {friend} were best friends.",
        "And so, the two of them became good friends.",
        "{name} was glad to have such good friends.",
        "{name} and {friend} stayed the best of friends.",
    ),
    "home": (
        "Then {name} and {friend} walked back home.",
        "When the sun went down, {name} went home.",
        "At last, {name} was safe at home.",
        "{name} waved goodbye and ran all the way home.",
    ),
    "together": (
        "After that, they always played together.",
        "They laughed and ate {food} together.",
        "It was more fun to do things together.",
        "Every {time} after that, they met and played together.",
    ),
    "again": (
        "{name} could not wait to go to {the_place} again.",
        "They promised to meet the next day again.",
        "{name} hoped that a day like this would come again.",
        "Soon they would play again.",
    ),
    "day": (
        "It was a wonderful day.",
        "{name} would always remember that day.",
        "It was the best day {name} ever had.",
        "What a special day it was.",
    ),
    "smile": (
        "{name} went to sleep with a big smile.",
        "{friend} looked at {name} with a smile.",
        "Everyone at {the_place} had a smile.",
        "{name} walked home with a big smile.",
    ),
    "asleep": (
        "That night, {name} curled up in bed and fell asleep.",
        "Soon {name} was fast asleep.",
        "After such a big day, {name} quickly fell asleep.",
        "{name} yawned, closed {his} eyes and fell asleep.",
    ),
    "fun": (
        "Playing at {the_place} was so much fun.",
        "They had so much fun.",
        "{name} said it was the best kind of fun.",
        "The rest of the day was full of fun.",
    ),
    "kind": (
        "{name} learned that it is always good to be kind.",
        "It is always good to be kind.",
        "{friend} thanked {name} for being so kind.",
        "Everyone said that {name} was very kind.",
    ),
    "share": (
        "{name} learned that it is nice to share.",
        "Now {name} always remembers to share.",
        "Good friends always find a way to share.",
    ),
    "end": ("And that is the end.", "And that was the end of a big day.", "This is the end."),
}

MORAL_ENDINGS = ("kind", "share")  # endings that already state a lesson: no lesson beat before them

# Sentences that end a cloze story: each names several entities so one swapped entity makes it inconsistent.
CLOZE_ENDINGS: tuple[str, ...] = (
    "{name} the {animal} walked home from {the_place} with {his} {obj}.",
    "That night, {name} the {animal} put {his} {obj} by the bed and dreamed of {the_place}.",
    "{name} held {his} {color} {obj} and smiled all the way home from {the_place}.",
    "Later, {name} the {animal} told {his} {helper} all about the {obj} and {the_place}.",
    "{name} knew {he} would bring {his} {obj} to {the_place} again soon.",
    "As the sun went down, {name} the {animal} hugged {his} {obj} and waved goodbye to {the_place}.",
    "From then on, {name} the {animal} took {his} {obj} every time {he} went to {the_place}.",
    "{name} put the {obj} in {his} bag and left {the_place} with a happy heart.",
)
CLOZE_SLOTS: dict[str, tuple[str, ...]] = {  # cloze template -> the entity kinds it names
    t: tuple(k for k in ("name", "animal", "obj", "place") if "{" + ("the_place" if k == "place" else k) + "}" in t)
    for t in CLOZE_ENDINGS
}

TITLES: tuple[str, ...] = (
    "{name} the {Animal}",
    "{name} and the {Color} {Obj}",
    "A Day at the {Place}",
    "{name} Goes to the {Place}",
    "The {Adj} {Animal}",
    "{name} and {friend}",
    "{name} and the {Obj}",
)


# ------------------------------------------------------------------------------------------------ plots


@dataclass(frozen=True)
class Stage:
    """One step of a plot: several interchangeable sentences; optional ones are left out about half the time."""

    templates: tuple[str, ...]
    optional: bool = False


FRIEND = Stage(FRIEND_ARRIVALS)
NEG = Stage(NEGATIVE_BEATS)
POS = Stage(POSITIVE_BEATS)


@dataclass(frozen=True)
class Plot:
    """A story shape: its stages in order (one mentions the object and is not optional), lessons and titles."""

    name: str
    stages: tuple[Stage, ...]
    lessons: tuple[str, ...]
    titles: tuple[str, ...]


def _s(*templates: str, optional: bool = False) -> Stage:
    return Stage(tuple(templates), optional)


PLOTS: tuple[Plot, ...] = (
    Plot(
        "lost",
        (
            _s(
                "{name} had {a_cobj} that {he} loved very much.",
                "{name} always carried {his} {color} {obj} with {him}.",
                "{His} favorite thing in the whole world was {a_cobj}.",
                "{name} brought {his} {color} {obj} along.",
                "{name}'s {helper} had given {him} {a_cobj}.",
                "{name} liked to play with {his} {color} {obj}.",
            ),
            _s(
                "But when {he} looked in {his} bag, the {obj} was gone.",
                "After a while, {name} saw that {his} {obj} was missing.",
                "Oh no, {name} had lost {his} {obj}!",
                "Suddenly, {name} could not find {his} {obj} anywhere.",
                "When {he} turned around, {his} {obj} was not there.",
                "{name} put {his} {obj} down to {activity}, and then it was gone.",
            ),
            NEG,
            _s(
                "{He} looked {spot}, but it was not there.",
                "{He} searched {spot} and {spot2}.",
                "{name} called out, but nobody answered.",
                "{He} looked high and low for it.",
                "{He} walked around {the_place} again and again.",
                optional=True,
            ),
            FRIEND,
            _s(
                '{friend} said, "Do not worry, I will help you find it."',
                '{friend} said, "Let us look together!"',
                "{name} told {friend} about the lost {obj}.",
                '{friend} asked, "What are you looking for?"',
                '{friend} said, "Two pairs of eyes are better than one."',
                optional=True,
            ),
            _s(
                "Together, they looked {spot3} and {spot4}.",
                "{name} and {friend} searched all over {the_place}.",
                "They looked everywhere, step by step.",
                "{friend} had a good idea and looked {spot4}.",
            ),
            _s(
                "At last, they found the {obj} {spot4}.",
                'Then {friend} shouted, "I see it!"',
                "Finally, {name} saw {his} {color} {obj} {spot4}.",
                "The {obj} was {spot4} the whole time.",
                "There it was, {spot4}!",
            ),
            POS,
        ),
        (
            "friends help each other",
            "it is good to ask for help",
            "you should never give up",
            "looking carefully helps you find things",
        ),
        ("The Lost {Obj}", "{name} and the Missing {Obj}", "The {Color} {Obj}"),
    ),
    Plot(
        "new_friend",
        (
            _s(
                "{name} had {a_cobj}, but nobody to play with.",
                "{name} wanted a friend to play with {his} {color} {obj}.",
                "{name} sat alone with {his} {obj}.",
                "All the other animals were busy, and {name} had only {his} {obj}.",
            ),
            _s(
                "Nobody wanted to play with {him}.",
                "{He} asked a few animals to play, but they all said no.",
                "{name} waited and waited, but no one came.",
                "The day felt long and quiet.",
            ),
            NEG,
            FRIEND,
            _s(
                '{friend} asked, "Can I play with you?"',
                '{friend} said, "Hello, my name is {friend}."',
                '{name} said, "Would you like to play with my {obj}?"',
                "{friend} smiled and said hello.",
            ),
            _s(
                "They played with the {obj} all {time}.",
                "{name} and {friend} took turns with the {obj}.",
                "They laughed and ran around {the_place}.",
                "{friend} showed {name} how to {activity}.",
                "Then they decided to {activity}.",
            ),
            _s(
                "Soon, {name} did not feel alone anymore.",
                "By the end of the day, they were best friends.",
                "{name} was glad {he} had met {friend}.",
                "Now {name} had a new friend to play with every day.",
                optional=True,
            ),
            POS,
        ),
        (
            "a new friend can be just one hello away",
            "it is good to be brave and say hello",
            "sharing is a good way to make friends",
        ),
        ("{name} Finds a Friend", "A New Friend at the {Place}", "{name} Meets {friend}"),
    ),
    Plot(
        "storm",
        (
            _s(
                "{name} was playing with {his} {color} {obj} {at_place}.",
                "{name} brought {a_cobj} to play with.",
                "{name} was having fun with {his} {obj}.",
                "{name} wanted to show {his} {obj} to {his} friends.",
            ),
            _s(
                "Suddenly, dark clouds filled the sky.",
                "Then the wind grew strong and the sky turned dark.",
                "All of a sudden, big drops of rain began to fall.",
                "Soon, there was a loud clap of thunder.",
                "A big storm was coming.",
            ),
            _s(
                "{name} held {his} {obj} tight.",
                "{He} ran to hide {spot}.",
                "{He} did not know where to go.",
                optional=True,
            ),
            NEG,
            FRIEND,
            _s(
                '{friend} said, "Come with me, I know a dry place!"',
                '{friend} called, "Quick, follow me!"',
                "{friend} waved to {name} from a little shed.",
                optional=True,
            ),
            _s(
                "They ran to a small shed and waited inside.",
                "They sat close together until the rain stopped.",
                "{friend} shared {fhis} warm blanket with {name}.",
                "They told stories while the storm passed.",
            ),
            _s(
                "Soon the storm was over and the sun came out.",
                "After a while, the rain stopped and a rainbow appeared.",
                "When the clouds went away, {the_place} was bright again.",
                "The thunder stopped and the sky turned blue.",
            ),
            POS,
        ),
        ("storms do not last forever", "it is good to stay close to friends", "a friend can make a storm less scary"),
        ("{name} and the Storm", "The Big Storm", "A Rainy Day at the {Place}"),
    ),
    Plot(
        "sharing",
        (
            _s(
                "{name} had a new {color} {obj}.",
                "{name}'s {helper} gave {him} {a_cobj}.",
                "{name} found {a_cobj} {spot}.",
                "{name} got {a_cobj} as a present.",
            ),
            FRIEND,
            _s(
                '{friend} asked, "Can I play with your {obj}?"',
                "{friend} looked at the {obj} and wanted to play with it too.",
                '{friend} said, "What a nice {obj}!"',
            ),
            _s(
                "At first, {name} did not want to share.",
                "{name} held the {obj} close and thought for a moment.",
                "{name} wanted to keep the {obj} all to {him}self.",
            ),
            NEG,
            _s(
                "Then {name} remembered what {his} {helper} said about sharing.",
                "{name} smiled and gave the {obj} to {friend}.",
                '{name} said, "Here, we can play with it together."',
                "{name} decided to share {his} {obj}.",
            ),
            _s(
                "They took turns and played for a long time.",
                "Playing together was more fun than playing alone.",
                "{friend} laughed, and {name} laughed too.",
                "They made up a new game with the {obj}.",
                optional=True,
            ),
            POS,
        ),
        ("sharing makes everyone feel good", "it is nice to share", "playing together is more fun"),
        ("{name} Learns to Share", "The {Color} {Obj}", "{name} and {friend} Share"),
    ),
    Plot(
        "helping",
        (
            _s(
                "{name} was carrying {a_cobj}.",
                "{name} had brought {his} {color} {obj} with {him}.",
                "{name} was playing with {his} {obj}.",
            ),
            _s(
                "Then {name} heard someone crying.",
                "Suddenly, {name} heard a small voice calling for help.",
                "Then {name} heard a sad little sound.",
            ),
            _s(
                "It was {friend} the {fanimal}, and {fhe} was stuck {spot}.",
                "{friend} the {fanimal} had fallen into a hole.",
                "{friend} the {fanimal} could not get down from a tall wall.",
                "{friend} the {fanimal} was lost and far from home.",
            ),
            NEG,
            _s(
                "{name} had an idea.",
                "{name} thought hard about how to help.",
                "{name} looked at {his} {obj} and smiled.",
                optional=True,
            ),
            _s(
                "{He} used {his} {obj} to help {friend}.",
                "With the help of the {obj}, {friend} was safe again.",
                "{name} pulled and pulled until {friend} was free.",
                "{name} showed {friend} the way back home.",
            ),
            _s(
                '{friend} said, "Thank you, {name}!"',
                "{friend} gave {name} a big hug.",
                "{friend} thanked {name} again and again.",
            ),
            POS,
        ),
        ("helping others is always a good thing", "even small friends can be a big help", "it feels good to help"),
        ("{name} Helps a Friend", "{name} to the Rescue", "A Helping Hand"),
    ),
    Plot(
        "race",
        (
            _s(
                "There was a big race {at_place} that day.",
                "All the animals were going to run in a race.",
                "{name} wanted to win the race more than anything.",
            ),
            _s(
                "The winner would get {a_cobj}.",
                "The prize was {a_cobj}.",
                "{name} really wanted the {color} {obj} prize.",
            ),
            FRIEND,
            _s(
                "The race began, and everyone started to run.",
                "{name} ran as fast as {he} could.",
                "{name} and {friend} were in front.",
            ),
            _s(
                "But {friend} fell down and hurt {fhis} leg.",
                "Then {name} saw that {friend} had fallen.",
                "Then {friend} tripped over a stone.",
            ),
            NEG,
            _s("{name} stopped to help {friend} get up.", "{name} went back to help {friend}."),
            _s(
                "They crossed the finish line together.",
                "They did not win, but they finished the race side by side.",
                "Everyone clapped for them.",
                optional=True,
            ),
            _s(
                "At the end, the judge gave {name} {a_cobj} for being kind.",
                "In the end, everyone got {a_cobj}.",
                "{friend} said that {name} deserved the {obj} more than anyone.",
            ),
            POS,
        ),
        ("kindness is worth more than winning", "friends matter more than prizes", "helping is better than winning"),
        ("The Big Race", "{name} and the Race", "The Race at the {Place}"),
    ),
    Plot(
        "gift",
        (
            _s(
                "It was almost {friend}'s birthday.",
                "{name} wanted to make a gift for {friend} the {fanimal}.",
                "{friend} the {fanimal} was having a birthday party soon.",
            ),
            _s(
                "{name} decided to give {friend} {a_cobj}.",
                "{He} wanted to find the perfect {obj}.",
                "{He} thought {friend} would love {a_cobj}.",
            ),
            _s(
                "But the {obj} broke on the way.",
                "But {he} dropped the {obj} in the mud.",
                "But the {obj} was not as pretty as {he} had hoped.",
            ),
            NEG,
            _s(
                "So {name} fixed the {obj} all by {him}self.",
                "{name} cleaned the {obj} until it was shiny again.",
                "{His} {helper} helped {him} fix it.",
            ),
            _s(
                "At the party, {name} gave the {obj} to {friend}.",
                "{friend} opened the gift and saw the {color} {obj}.",
            ),
            _s(
                '{friend} said, "This is the best gift ever!"',
                "{friend} jumped with joy.",
                "{friend} hugged {name} tight.",
            ),
            POS,
        ),
        ("the best gifts come from the heart", "it is the thought that counts", "giving feels as good as getting"),
        ("A Gift for {friend}", "{name} and the Birthday Gift", "The {Color} {Obj}"),
    ),
    Plot(
        "fear",
        (
            _s(
                "{name} was afraid of {fear}.",
                "There was one thing {name} did not like, and that was {fear}.",
                "{name} always stayed away from {fear}.",
            ),
            _s(
                "One day, {his} {color} {obj} rolled far away.",
                "Then {his} {obj} fell and landed far away.",
                "{He} would need to be brave to fetch the {obj}.",
            ),
            NEG,
            FRIEND,
            _s(
                '{friend} said, "I will stay with you."',
                '{friend} said, "You can do it!"',
                "{friend} stood right beside {name}.",
            ),
            _s(
                "{name} took a deep breath.",
                "{He} counted to three and stepped forward.",
                "Step by step, {name} went on.",
            ),
            _s(
                "Soon {he} had {his} {obj} back.",
                "{He} picked up the {obj} and held it tight.",
                "At last, the {obj} was safe with {name} again.",
            ),
            POS,
        ),
        (
            "being brave means trying even when you are scared",
            "a good friend makes you braver",
            "small steps can take you far",
        ),
        ("{name} Is Brave", "Brave Little {Animal}", "{name} and the {Obj}"),
    ),
    Plot(
        "treasure",
        (
            _s(
                "{name} found an old map {spot}.",
                "{name} found a note that said there was a surprise {at_place}.",
                "{name}'s {helper} told {him} about a hidden treasure.",
            ),
            _s(
                "The map showed the way to a hidden {obj}.",
                "{name} wanted to find the hidden {obj}.",
                "Someone had hidden {a_cobj} long ago.",
            ),
            FRIEND,
            _s(
                "They walked past {feature} and {feature2}.",
                "They crossed a small stream and climbed a slope.",
                "They followed the map step by step.",
                optional=True,
            ),
            _s(
                "But the path was long, and {name} grew tired.",
                "Then they came to a big rock in the path.",
                "Soon they got lost.",
            ),
            NEG,
            _s('{friend} said, "Let us keep going!"', "They rested and then kept going.", "{name} did not give up."),
            _s(
                "At last, they found {a_cobj} {spot2}.",
                "Under an old tree, they found a chest with {a_cobj} inside.",
                "There, {spot2}, was the {color} {obj}.",
            ),
            POS,
        ),
        ("adventures are better with friends", "you should never give up", "the best treasure is a good friend"),
        ("The Hidden {Obj}", "{name} and the Treasure Map", "Treasure at the {Place}"),
    ),
    Plot(
        "garden",
        (
            _s(
                "{name} wanted to grow a big {plant}.",
                "{name} got a tiny seed from {his} {helper}.",
                "{name} wanted to plant something special.",
            ),
            _s(
                "{He} dug a small hole and planted a seed.",
                "{He} watered the seed every day.",
                "{He} put {his} {color} {obj} next to the spot so {he} would remember it.",
            ),
            _s(
                "But the seed did not grow.", "Days went by, and nothing happened.", "The ground stayed brown and bare."
            ),
            NEG,
            FRIEND,
            _s(
                '{friend} said, "Be patient, it takes time."',
                "{friend} helped {him} water it.",
                "{friend} brought some fresh water in {fhis} bucket.",
                optional=True,
            ),
            _s(
                "{name} used {his} {obj} to keep the birds away.",
                "{name} sat by the spot with {his} {obj} and waited.",
                "{name} checked on it every day, with {his} {obj} in hand.",
            ),
            _s(
                "One morning, a tiny green sprout came up.",
                "Soon, a big {plant} grew where the seed had been.",
                "At last, little green leaves appeared.",
            ),
            POS,
        ),
        ("good things take time", "patience helps things grow", "with care, little things grow big"),
        ("{name} and the {Plant}", "The Tiny Seed", "{name} and the Seed"),
    ),
    Plot(
        "building",
        (
            _s(
                "{name} wanted to build a tall tower.",
                "{name} wanted to build a little house for {his} {obj}.",
                "{name} had a plan to build a fort.",
            ),
            _s(
                "{He} gathered sticks, stones and {a_cobj}.",
                "{He} put {his} {color} {obj} at the top.",
                "{He} worked hard, and {his} {obj} sat close by.",
            ),
            _s(
                "But it fell down.",
                "Every time {he} added a piece, it wobbled and fell.",
                "Then a gust of wind knocked it over.",
            ),
            NEG,
            FRIEND,
            _s(
                "{friend} showed {him} how to make the bottom wide and strong.",
                "They built it together, one piece at a time.",
                '{friend} said, "Let us try again, but slowly."',
            ),
            _s(
                "This time, it stood tall and strong.",
                "They put the {obj} on the very top.",
                "It did not fall, not even when the wind came.",
                optional=True,
            ),
            POS,
        ),
        (
            "working together makes things strong",
            "if at first you fail, you should try again",
            "a strong base holds everything up",
        ),
        ("{name} Builds a Tower", "The Tall Tower", "{name} and {friend} Build"),
    ),
    Plot(
        "show",
        (
            _s(
                "There was going to be a show {at_place}.",
                "{name} wanted to sing at the big show.",
                "{name} was going to play music for everyone.",
            ),
            _s(
                "{He} practiced every day with {his} {color} {obj}.",
                "{He} brought {his} lucky {obj} to the show.",
                "{His} {helper} gave {him} {a_cobj} for good luck.",
            ),
            _s(
                "But on the day of the show, {his} legs shook.",
                "When {he} saw the crowd, {he} forgot the words.",
                "{His} voice felt very small.",
            ),
            NEG,
            FRIEND,
            _s(
                '{friend} said, "You can do it, {name}!"',
                "{friend} waved from the front row.",
                "{friend} gave {name} a thumbs up.",
            ),
            _s(
                "{name} took a deep breath and began to sing.",
                "The song was beautiful.",
                "Everyone clapped and cheered.",
                optional=True,
            ),
            POS,
        ),
        ("practice helps you do your best", "friends cheer each other on", "it is okay to feel a little scared"),
        ("The Big Show", "{name} Sings", "{name} and the Show"),
    ),
)
PLOT_BY_NAME: dict[str, Plot] = {p.name: p for p in PLOTS}


# ------------------------------------------------------------------------------------------------ matching

_MENTION_CACHE: dict[str, re.Pattern[str]] = {}


def mention_regex(phrase: str) -> re.Pattern[str]:
    """Whole-word, case-insensitive pattern for a world word or phrase, allowing its plural (kite/kites)."""
    pattern = _MENTION_CACHE.get(phrase)
    if pattern is None:
        *head, last = [re.escape(w) for w in phrase.lower().split()]
        irregular = {
            "mouse": r"(?:mouse|mice)",
            "wolf": r"(?:wolf|wolves)",
            "butterfly": r"(?:butterfly|butterflies)",
            "ladybug": r"ladybugs?",
        }
        tail = irregular.get(last, last + r"(?:s|es)?")
        pattern = re.compile(r"(?<!\w)" + r"\s+".join(head + [tail]) + r"(?!\w)", re.IGNORECASE)
        _MENTION_CACHE[phrase] = pattern
    return pattern


def mentions(text: str, phrase: str) -> bool:
    """True when `text` names `phrase` as a whole word (case-insensitive; "kites" counts for "kite")."""
    return mention_regex(phrase).search(text) is not None


# ------------------------------------------------------------------------------------------------ cast


@dataclass(frozen=True)
class Character:
    """One animal in a story."""

    name: str
    animal: str
    trait: str

    @property
    def pronoun(self) -> str:
        return NAMES[self.name]


@dataclass(frozen=True)
class Cast:
    """Everything a story is about; instructions fix some of it, the rest is drawn at random."""

    hero: Character
    friend: Character
    place: str
    obj: str
    color: str
    neg: str
    """Negative feeling, felt at the story's trouble."""
    pos: str
    """Positive feeling, felt at its resolution."""
    weather: str
    time: str
    season: str
    helper: str
    ending: str
    """Last word of the story (a key of ENDINGS)."""
    plot: str


def article(phrase: str) -> str:
    """ "a kite" / "an owl": the indefinite article by the first letter (the world has no "a unicorn" cases)."""
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


def other(rng: random.Random, pool: tuple[str, ...] | list[str], *exclude: str) -> str:
    """A random member of pool that is none of exclude."""
    choices = [x for x in pool if x not in exclude]
    return rng.choice(choices)


def same_gender_name(rng: random.Random, name: str, *exclude: str) -> str:
    """Another name taking the same pronouns, so a swapped name leaves the grammar right."""
    return other(rng, [n for n, g in NAMES.items() if g == NAMES[name]], name, *exclude)


def sample_cast(rng: random.Random, **fixed: str) -> Cast:
    """Draw a cast; keyword arguments (name, animal, place, obj, neg, pos, ending, plot) pin those fields."""
    name = fixed.get("name") or rng.choice(list(NAMES))
    animal = fixed.get("animal") or rng.choice(ANIMALS)
    hero = Character(name, animal, rng.choice(TRAITS))
    friend = Character(other(rng, list(NAMES), name), other(rng, ANIMALS, animal), rng.choice(TRAITS))
    return Cast(
        hero=hero,
        friend=friend,
        place=fixed.get("place") or rng.choice(list(PLACES)),
        obj=fixed.get("obj") or rng.choice(OBJECTS),
        color=rng.choice(COLORS),
        neg=fixed.get("neg") or rng.choice(NEGATIVE_FEELINGS),
        pos=fixed.get("pos") or rng.choice(POSITIVE_FEELINGS),
        weather=rng.choice(WEATHERS),
        time=rng.choice(TIMES),
        season=rng.choice(SEASONS),
        helper=rng.choice(HELPERS),
        ending=fixed.get("ending") or rng.choice(list(ENDINGS)),
        plot=fixed.get("plot") or rng.choice(PLOTS).name,
    )


def recast(cast: Cast, **changes: str) -> Cast:
    """The same cast with hero name/animal or other fields swapped (name=..., animal=..., place=..., ...)."""
    hero = cast.hero
    if "name" in changes:
        hero = replace(hero, name=changes.pop("name"))
    if "animal" in changes:
        hero = replace(hero, animal=changes.pop("animal"))
    return replace(cast, hero=hero, **changes)


_PRONOUNS = {"he": ("he", "him", "his"), "she": ("she", "her", "her")}


def slots(cast: Cast, rng: random.Random) -> dict[str, str]:
    """Template slot values: the cast plus per-story details (spots, features, activities, ...)."""
    he, him, his = _PRONOUNS[cast.hero.pronoun]
    fhe, fhim, fhis = _PRONOUNS[cast.friend.pronoun]
    prep, features = PLACES[cast.place]
    feature, feature2 = rng.sample(features, 2)
    spot, spot2, spot3, spot4 = rng.sample(SPOTS, 4)
    adj2 = other(rng, TRAITS, cast.hero.trait, "little", "small", "tiny", "young")
    cobj = f"{cast.color} {cast.obj}"
    plot = PLOT_BY_NAME[cast.plot]
    return {
        "name": cast.hero.name,
        "he": he,
        "He": he.capitalize(),
        "him": him,
        "his": his,
        "His": his.capitalize(),
        "animal": cast.hero.animal,
        "Animal": cast.hero.animal.title(),
        "adj": cast.hero.trait,
        "Adj": cast.hero.trait.title(),
        "a_adj": article(cast.hero.trait),
        "adj2": adj2,
        "trait": rng.choice(VIRTUES),
        "friend": cast.friend.name,
        "fhe": fhe,
        "fhim": fhim,
        "fhis": fhis,
        "fanimal": cast.friend.animal,
        "a_fanimal": article(cast.friend.animal),
        "a_fadj": article(cast.friend.trait),
        "A_fadj": article(cast.friend.trait).capitalize(),
        "place": cast.place,
        "Place": cast.place.title(),
        "the_place": f"the {cast.place}",
        "The_place": f"The {cast.place}",
        "at_place": f"{prep} the {cast.place}",
        "feature": feature,
        "feature2": feature2,
        "obj": cast.obj,
        "Obj": cast.obj.title(),
        "color": cast.color,
        "Color": cast.color.title(),
        "a_cobj": article(cobj),
        "neg": cast.neg,
        "A_neg": article(cast.neg).capitalize(),
        "pos": cast.pos,
        "a_pos": article(cast.pos),
        "weather": cast.weather,
        "time": cast.time,
        "season": cast.season,
        "helper": cast.helper,
        "home": rng.choice(HOMES),
        "activity": rng.choice(ACTIVITIES),
        "food": rng.choice(FOODS),
        "spot": spot,
        "spot2": spot2,
        "spot3": spot3,
        "spot4": spot4,
        "sound": rng.choice(SOUNDS),
        "smell": rng.choice(SMELLS),
        "fear": rng.choice(FEARS),
        "plant": (plant := rng.choice(PLANTS)),
        "Plant": plant.title(),
        "land": rng.choice(LANDS),
        "lesson": rng.choice(plot.lessons),
    }


# ------------------------------------------------------------------------------------------------ composer


@dataclass
class Story:
    """A composed story: sentences with their roles, paragraph starts, and the slot values used."""

    sentences: list[str]
    roles: list[str]
    optional: list[bool]
    slots: dict[str, str]
    breaks: tuple[int, ...] = ()
    """Indexes of sentences that start a new paragraph."""

    @property
    def text(self) -> str:
        paragraphs, start = [], 0
        for b in (*self.breaks, len(self.sentences)):
            if b > start:
                paragraphs.append(" ".join(self.sentences[start:b]))
                start = b
        return "\n\n".join(paragraphs)

    @property
    def n_words(self) -> int:
        return sum(len(s.split()) for s in self.sentences)


class StoryError(RuntimeError):
    """No template of a required beat avoids the forbidden words; the caller draws another story."""


def _pick(
    templates: tuple[str, ...],
    values: dict[str, str],
    rng: random.Random,
    forbid: re.Pattern[str] | None,
    used: set[str] | None = None,
    told: list[str] = (),
) -> str | None:
    """Render one template, starting at a random one and moving on past any that names a forbidden word or
    repeats a sentence already `told` (a repeated sentence reads badly and trips repetition filters).

    Exactly one rng draw whatever happens, so two stories told from the same seed stay aligned sentence by
    sentence even when one of them has to avoid a word.
    """
    start = rng.randrange(len(templates))
    for k in range(len(templates)):
        template = templates[(start + k) % len(templates)]
        if used is not None and template in used:
            continue
        sentence = template.format_map(values)
        if (forbid is None or forbid.search(sentence) is None) and sentence not in told:
            if used is not None:
                used.add(template)
            return sentence
    return None


def forbid_pattern(words: tuple[str, ...]) -> re.Pattern[str] | None:
    """One pattern matching any of `words` the way `mentions` does (None for no words)."""
    if not words:
        return None
    return re.compile("|".join(f"(?:{mention_regex(w).pattern})" for w in words), re.IGNORECASE)


def compose(
    cast: Cast,
    rng: random.Random,
    *,
    forbid: tuple[str, ...] = (),
    words: tuple[int, int] | None = (60, 180),
    richness: float = 0.5,
) -> Story:
    """Tell the cast's story.

    forbid: words the story must not contain (a rejected answer that must miss its object, say).
    words: (min, max) word count, reached by adding or dropping optional sentences; None keeps what was drawn.
    richness: chance of each optional plot stage, and scale of how many detail/description sentences appear.
    Raises StoryError when a required beat cannot avoid a forbidden word.
    """
    values = slots(cast, rng)
    pattern = forbid_pattern(forbid)
    plot = PLOT_BY_NAME[cast.plot]
    story = Story([], [], [], values)

    def add(templates: tuple[str, ...], role: str, optional: bool, used: set[str] | None = None) -> None:
        sentence = _pick(templates, values, rng, pattern, used, story.sentences)
        if sentence is None:
            if optional:
                return
            raise StoryError(f"no {role} sentence avoids {forbid}")
        story.sentences.append(sentence)
        story.roles.append(role)
        story.optional.append(optional)

    used_details: set[str] = set()
    used_descriptions: set[str] = set()
    descriptions = DESCRIPTIONS + WEATHER_SENTENCES[cast.weather]
    add(OPENINGS, "opening", False)
    for _ in range(_count(rng, richness)):
        add(DETAILS, "detail", True, used_details)
    add(SETTINGS, "setting", False)
    for _ in range(_count(rng, richness)):
        add(descriptions, "description", True, used_descriptions)
    plot_start = len(story.sentences)
    for i, stage in enumerate(plot.stages):
        include = rng.random() < richness
        if not stage.optional or include:
            add(stage.templates, f"plot{i}", stage.optional)
    end_start = len(story.sentences)
    if rng.random() < richness * 0.8 and cast.ending not in MORAL_ENDINGS:
        add(LESSON_BEATS, "lesson", True)
    add(ENDINGS[cast.ending], "ending", False)
    if words is not None:
        _fit_length(story, words, rng, pattern, used_details, used_descriptions, descriptions)
        plot_start = story.roles.index("plot0") if "plot0" in story.roles else plot_start
        end_start = min([i for i, r in enumerate(story.roles) if r in ("lesson", "ending")])
    story.breaks = _paragraph_breaks(rng, plot_start, end_start, len(story.sentences))
    return story


def _count(rng: random.Random, richness: float) -> int:
    return sum(rng.random() < richness for _ in range(2))


def _fit_length(
    story: Story,
    words: tuple[int, int],
    rng: random.Random,
    pattern: re.Pattern[str] | None,
    used_details: set[str],
    used_descriptions: set[str],
    descriptions: tuple[str, ...],
) -> None:
    """Add detail/description sentences until the story is long enough; drop optional ones while too long."""
    low, high = words
    while story.n_words < low:
        detail = rng.random() < 0.5
        templates, used, role = (
            (DETAILS, used_details, "detail") if detail else (descriptions, used_descriptions, "description")
        )
        sentence = _pick(templates, story.slots, rng, pattern, used, story.sentences)
        if sentence is None:
            raise StoryError("ran out of sentences to lengthen the story")
        at = story.roles.index("setting") + (0 if detail else 1)
        if not detail:
            while at < len(story.roles) and story.roles[at] == "description":
                at += 1
        story.sentences.insert(at, sentence)
        story.roles.insert(at, role)
        story.optional.insert(at, True)
    while story.n_words > high:
        optional = [i for i, o in enumerate(story.optional) if o]
        if not optional:
            raise StoryError("story too long with no optional sentence left to drop")
        drop = optional[rng.randrange(len(optional))]
        for column in (story.sentences, story.roles, story.optional):
            del column[drop]


def _paragraph_breaks(rng: random.Random, plot_start: int, end_start: int, n: int) -> tuple[int, ...]:
    """One to three paragraphs: the setup, the plot, and the ending."""
    shape = rng.random()
    candidates = [b for b in (plot_start, end_start) if 0 < b < n]
    if shape < 0.25 or not candidates:
        return ()
    if shape < 0.6:
        return (rng.choice(candidates),)
    return tuple(sorted(set(candidates)))


def title_for(cast: Cast, rng: random.Random) -> str:
    """A short title line for the cast's story (no final punctuation)."""
    values = slots(cast, random.Random(0))
    template = rng.choice(TITLES + PLOT_BY_NAME[cast.plot].titles)
    return template.format_map(values)


def extra_sentences(story: Story, rng: random.Random, k: int, forbid: tuple[str, ...] = ()) -> Story:
    """The story with k more detail/description sentences (for a rejected answer that is too long)."""
    longer = Story(list(story.sentences), list(story.roles), list(story.optional), story.slots, story.breaks)
    pattern = forbid_pattern(forbid)
    pool = [t for t in DETAILS + DESCRIPTIONS if t.format_map(story.slots) not in story.sentences]
    rng.shuffle(pool)
    added = 0
    for template in pool:
        if added == k:
            break
        sentence = template.format_map(story.slots)
        if pattern is not None and pattern.search(sentence):
            continue
        at = longer.roles.index("setting") + 1
        longer.sentences.insert(at, sentence)
        longer.roles.insert(at, "description")
        longer.optional.insert(at, True)
        longer.breaks = tuple(b + 1 if b >= at else b for b in longer.breaks)
        added += 1
    return longer


def all_templates() -> list[tuple[str, str]]:
    """(group, template) for every template in the world, for tests that render each one."""
    groups: list[tuple[str, tuple[str, ...]]] = [
        ("opening", OPENINGS),
        ("detail", DETAILS),
        ("setting", SETTINGS),
        ("description", DESCRIPTIONS),
        ("friend", FRIEND_ARRIVALS),
        ("neg", NEGATIVE_BEATS),
        ("pos", POSITIVE_BEATS),
        ("lesson", LESSON_BEATS),
        ("cloze", CLOZE_ENDINGS),
        ("title", TITLES),
    ]
    groups += [(f"weather:{k}", v) for k, v in WEATHER_SENTENCES.items()]
    groups += [(f"ending:{k}", v) for k, v in ENDINGS.items()]
    for plot in PLOTS:
        groups += [(f"plot:{plot.name}:{i}", s.templates) for i, s in enumerate(plot.stages)]
        groups.append((f"title:{plot.name}", plot.titles))
    return [(g, t) for g, ts in groups for t in ts]


def _world_texts() -> Iterator[str]:
    """Every piece of text a story, answer or title can be made of: each template rendered for a "he" and a "she"
    hero (which writes the words a slot glues onto, like "{him}self"), and every value a slot can take (names,
    animals, places and their features, objects, feelings, pronouns, ...)."""
    for pronoun in ("he", "she"):
        hero = next(name for name, p in NAMES.items() if p == pronoun)
        values = slots(sample_cast(random.Random(0), name=hero), random.Random(0))
        yield from (t.format_map(values) for _, t in all_templates())
    yield from NAMES
    for place, (preposition, features) in PLACES.items():
        yield from (place, preposition, *features)
    pools = (ANIMALS, OBJECTS, COLORS, TRAITS, VIRTUES, FEELINGS, WEATHERS, TIMES, SEASONS, HELPERS, HOMES)
    pools += (ACTIVITIES, FOODS, SPOTS, SOUNDS, SMELLS, FEARS, PLANTS, LANDS)
    for pool in pools:
        yield from pool
    for plot in PLOTS:
        yield from plot.lessons
    for forms in _PRONOUNS.values():
        yield from forms
    yield "a an"  # article()


@functools.cache
def vocabulary() -> frozenset[str]:
    """Every word the world can write, as `tasks.common.degeneration.words` splits text (lowercase letter runs:
    "Tom's" gives "tom" and "s"). The builtin checker's titles must be made of these words, and the evaluate stage's
    `nonword_rate` is the share of an answer's words outside this set. Built once, then cached."""
    return frozenset(w for text in _world_texts() for w in words(text))


__all__ = [
    "ANIMALS",
    "CLOZE_ENDINGS",
    "CLOZE_SLOTS",
    "COLORS",
    "ENDINGS",
    "FEELINGS",
    "NAMES",
    "NEGATIVE_FEELINGS",
    "OBJECTS",
    "PLACES",
    "PLOTS",
    "POSITIVE_FEELINGS",
    "Cast",
    "Character",
    "Story",
    "StoryError",
    "article",
    "compose",
    "extra_sentences",
    "mentions",
    "other",
    "recast",
    "same_gender_name",
    "sample_cast",
    "slots",
    "title_for",
    "mention_regex",
    "vocabulary",
]
