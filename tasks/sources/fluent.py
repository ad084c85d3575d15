"""Fluent junk for the builtin corpus: documents the Gopher/C4-style heuristic rules keep, so that only a model
(the filter stage's quality classifier or its language identifier) can tell them from the stories.

Each kind writes 60-180 words of grammatical prose in 1-3 paragraphs, like a clean story: whole sentences that
end in `.`, `!` or `?`, no bullets, no "...", no web boilerplate words (cookie, javascript, log in, subscribe,
click here, copyright), no repeated lines and only a few repeated words, few digits.
  off_domain    news and reports: markets, technology, science and health, government, sports
  spam          product and money-making offers, keyword stuffing in whole sentences
  filler        machine-like SEO filler: stock phrases around a topic that say nothing
  non_english   children's stories in French, German or Spanish (the language identifier's planted kind)

Runbook
    from tasks.sources import fluent
    import random
    fluent.write("spam", random.Random(0))        # -> one document
"""

from __future__ import annotations

import random
from collections.abc import Callable

from tasks.sources import world

KINDS: tuple[str, ...] = ("off_domain", "spam", "filler", "non_english")

_WORDS = (60, 180)


def write(kind: str, rng: random.Random) -> str:
    """One document of `kind` (one of KINDS), drawn from `rng`."""
    if kind not in _WRITERS:
        raise ValueError(f"fluent.write: unknown kind {kind!r} (known: {', '.join(KINDS)})")
    return _WRITERS[kind](rng)


def _compose(rng: random.Random, templates: tuple[str, ...], values: dict[str, str], first: str = "") -> str:
    """Distinct templates filled with `values`, in random order (after `first`), until the text has between
    _WORDS[0] and _WORDS[1] words; split into 1-3 paragraphs."""
    target = rng.randint(_WORDS[0] + 10, _WORDS[1] - 40)
    order = [t for t in rng.sample(templates, len(templates)) if t != first]
    sentences = [first.format_map(values)] if first else []
    for template in order:
        if sum(len(s.split()) for s in sentences) >= target:
            break
        sentences.append(template.format_map(values))
    cuts = sorted(rng.sample(range(2, len(sentences) - 1), rng.randint(0, 2))) if len(sentences) > 6 else []
    paragraphs, start = [], 0
    for cut in [*cuts, len(sentences)]:
        paragraphs.append(" ".join(sentences[start:cut]))
        start = cut
    return "\n\n".join(paragraphs)


# ------------------------------------------------------------------------------------------------ off-domain news

_COMPANIES = (
    "Norland Systems",
    "Vexa Holdings",
    "Brightline Energy",
    "Corvant Group",
    "Halden Motors",
    "Quorra Networks",
    "Meridian Foods",
    "Talbot Pharma",
    "Ostrava Steel",
    "Keystone Logistics",
)
_SECTORS = ("software", "retail", "energy", "banking", "shipping", "insurance", "mining", "telecom")
_REGIONS = ("Europe", "Asia", "South America", "the Middle East", "North Africa", "Scandinavia", "Canada")
_CITIES = ("Leeds", "Lyon", "Denver", "Osaka", "Porto", "Dublin", "Austin", "Hamburg", "Turin", "Calgary")
_TEAMS = ("City Rovers", "United Athletic", "Harbor Town", "Northside Wanderers", "Valley Rangers", "Eastfield")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
_PERCENTS = ("two", "three", "four", "five", "six", "eight", "ten", "twelve")

_NEWS: dict[str, tuple[str, ...]] = {
    "markets": (
        "Shares of {company} rose {pct} percent on {day} after the firm reported stronger quarterly earnings than "
        "analysts had expected.",
        "The central bank left interest rates unchanged, saying that inflation remains above its target.",
        "Investors moved money into government bonds as concerns about slowing growth weighed on the market.",
        "The company said revenue from its {sector} division grew faster than in any quarter of the previous year.",
        "Analysts lowered their forecast for the {sector} sector, citing higher costs and weaker demand.",
        "The yield on the ten year bond fell to its lowest level since the spring.",
        "Trading volumes were thin ahead of the holiday, and most major indexes closed near their opening levels.",
        "The board approved a plan to buy back shares worth several billion dollars over the next two years.",
        "Oil prices climbed for a third straight session as supply disruptions in {region} continued.",
        "The quarterly report showed operating margins narrowing because of rising wages and freight expenses.",
        "Economists expect the unemployment rate to edge higher in the coming months.",
        "Its stock has gained roughly {pct} percent since the start of the year.",
        "A spokesperson for the firm declined to comment on reports of a possible merger.",
        "Currency traders said the dollar weakened against most major currencies during the afternoon session.",
    ),
    "technology": (
        "{company} announced a partnership with a cloud provider to build new data centers in {region}.",
        "The new version of its operating system introduces a redesigned settings menu and faster updates.",
        "Engineers said the update fixes a security flaw that could allow attackers to read stored passwords.",
        "The chip uses a smaller manufacturing process, which reduces power consumption by about a third.",
        "Developers can reach the new features through an application programming interface released this week.",
        "Regulators in {region} opened an investigation into how the company handles customer data.",
        "The startup raised new funding from venture investors to expand its {sector} software platform.",
        "Early reviews praised the battery life of the device but criticized its high price.",
        "The company plans to reduce its workforce as it shifts resources toward machine learning research.",
        "Analysts said demand for servers and storage hardware remained strong throughout the quarter.",
        "The outage affected several online services for nearly four hours before engineers restored them.",
        "Executives told investors that subscription revenue would become the main source of growth.",
        "Critics argued that the proposed standard would make it harder for smaller vendors to compete.",
    ),
    "science": (
        "Researchers at the University of {city} published a study showing that regular exercise lowers blood "
        "pressure in older adults.",
        "The clinical trial enrolled several hundred patients across {pct} hospitals over a period of three years.",
        "Scientists measured the concentration of carbon dioxide in samples taken from deep ice cores.",
        "The findings, published in a peer reviewed journal, suggest that the treatment may reduce the risk of "
        "infection.",
        "The health agency recommended that adults receive a booster dose before the winter season.",
        "Astronomers detected a faint signal from a galaxy that formed less than a billion years after the big bang.",
        "The authors cautioned that further research is needed before the results can be applied in clinics.",
        "Funding for the project came from a national science foundation and several private donors.",
        "The team used satellite data to track changes in sea ice over the past four decades.",
        "Participants who slept fewer than six hours a night reported higher levels of stress.",
        "The laboratory plans to share its data with other institutions later this year.",
        "Doctors said the new screening method could detect the disease at an earlier stage.",
    ),
    "government": (
        "The council in {city} voted to approve a new budget that increases spending on public transport.",
        "Lawmakers debated the proposal for several hours before the measure passed by a narrow margin.",
        "The minister said the government would publish a detailed plan for housing reform next month.",
        "Officials announced that repairs on the main highway will continue through the autumn.",
        "The committee will hold public hearings on the tax proposal in the coming weeks.",
        "Opposition leaders criticized the plan, arguing that it would raise costs for small businesses.",
        "The election commission reported that turnout was higher than in the previous national vote.",
        "Under the new rules, employers must report the pay gap between male and female staff each year.",
        "The mayor of {city} promised to hire more inspectors to enforce building safety codes.",
        "A spokesperson for the ministry said negotiations with the unions would resume on {day}.",
        "The court ruled that the regulation exceeded the authority granted by parliament.",
        "The bill now goes to the upper chamber, where its supporters expect a closer vote.",
    ),
    "sports": (
        "{team} defeated {team2} by three goals to one in front of a sold out crowd on {day}.",
        "The coach said after the match that the squad had struggled with injuries throughout the season.",
        "The striker scored twice in the second half, bringing his total for the season to a club record.",
        "The league announced that the final will be played at the national stadium in {city}.",
        "Ticket prices for the tournament have risen sharply compared with the previous edition.",
        "The goalkeeper made several important saves to keep his side level before halftime.",
        "Supporters of {team} celebrated in the streets long after the final whistle.",
        "The club confirmed that its captain will miss the next two games with a knee injury.",
        "Both teams will meet again in the cup semifinal later this month.",
        "The visitors controlled possession for most of the game but rarely tested the defense.",
        "Officials said the match was delayed by twenty minutes because of heavy rain.",
        "The win moves the club into second place in the table, four points behind the leaders.",
    ),
}


def _off_domain(rng: random.Random) -> str:
    topic = rng.choice(sorted(_NEWS))
    teams = rng.sample(_TEAMS, 2)
    values = {
        "company": rng.choice(_COMPANIES),
        "sector": rng.choice(_SECTORS),
        "region": rng.choice(_REGIONS),
        "city": rng.choice(_CITIES),
        "team": teams[0],
        "team2": teams[1],
        "day": rng.choice(_DAYS),
        "pct": rng.choice(_PERCENTS),
    }
    return _compose(rng, _NEWS[topic], values, first=_NEWS[topic][0])


# ------------------------------------------------------------------------------------------------ spam

_PRODUCTS = (
    "leather wallets",
    "replica watches",
    "diet pills",
    "running shoes",
    "phone chargers",
    "vitamin gummies",
    "designer handbags",
    "garden furniture",
    "hair growth serum",
    "solar panels",
)
_SERVICES = ("roof repair", "debt consolidation", "carpet cleaning", "car insurance", "tax preparation", "moving")

_SPAM = (
    "Get the lowest prices on {product} and enjoy free shipping on every order over fifty dollars!",
    "Our {product} are made from premium materials and come with a lifetime guarantee.",
    "Order today and save {pct} percent on your first purchase with this exclusive offer.",
    "Thousands of happy customers have already switched, and you can too.",
    "Limited stock is available, so act now before this special deal ends at midnight!",
    "We ship to every state and most countries within three business days.",
    "Why pay more at the mall when you can buy directly from the factory and keep the savings?",
    "Earn money from home with our simple program that takes only one hour a day.",
    "Lose weight fast with a natural formula that the experts do not want you to know about.",
    "Our friendly team in {city} is waiting to give you a free quote on {service} today.",
    "Best {product} for sale, cheap {product} online, with fast delivery to your door.",
    "Satisfaction is guaranteed or your money back, no questions asked.",
    "Join the rewards club and receive points on every purchase you make.",
    "We are the top rated {service} company in {city}, with same day appointments available.",
    "Compare our prices and see why we are the number one choice for smart shoppers.",
    "This offer is valid for new customers only while supplies last.",
    "Each order includes a free gift and a discount code for your next visit.",
    "Do not miss the biggest sale of the year, with prices slashed on every item in the store!",
    "Hurry, because the clock is ticking and prices go back up tomorrow morning.",
    "Make your dreams come true with an opportunity that changes lives in just a few weeks.",
    "No credit check is needed and approval takes less than five minutes.",
    "Treat yourself or a loved one to something special at a price that will make you smile.",
)


def _spam(rng: random.Random) -> str:
    values = {
        "product": rng.choice(_PRODUCTS),
        "service": rng.choice(_SERVICES),
        "city": rng.choice(_CITIES),
        "pct": rng.choice(("ten", "twenty", "thirty", "forty", "fifty")),
    }
    return _compose(rng, _SPAM, values, first=rng.choice(_SPAM[:3]))


# ------------------------------------------------------------------------------------------------ filler

_TOPICS = (
    "digital marketing",
    "remote work",
    "personal finance",
    "sustainable living",
    "online education",
    "content strategy",
    "customer experience",
    "home improvement",
    "time management",
    "social media",
)

_FILLER = (
    "In today's fast-paced world, {topic} has become more important than ever before.",
    "It is important to note that this topic plays a crucial role in many aspects of modern life.",
    "There are many factors to consider when it comes to {topic}.",
    "Furthermore, experts agree that a deeper understanding can lead to better outcomes.",
    "In this article, we will explore the key benefits and explain why they matter.",
    "Whether you are a beginner or an expert, there is always something new to learn.",
    "Additionally, it is worth mentioning that results can vary depending on a number of factors.",
    "On the other hand, some people believe that it is not as important as it seems.",
    "As a result, more and more people are turning to it in order to improve their lives.",
    "In conclusion, {topic} is a complex subject that requires careful thought and consideration.",
    "By following these simple tips, you can make the most of every opportunity.",
    "Ultimately, the right choice depends on your individual needs and goals.",
    "This is why it is essential to stay informed about the latest trends and developments.",
    "Many people wonder what the best approach really is.",
    "Overall, it offers a wide range of advantages for individuals and businesses alike.",
    "With the right strategy, anyone can achieve success in this area.",
    "Moreover, it is crucial to understand the various aspects involved in the process.",
    "Needless to say, the benefits are numerous and the possibilities are endless.",
    "Let us take a closer look at some of the most common questions people ask.",
    "At the end of the day, what matters most is finding a solution that works for you.",
)


def _filler(rng: random.Random) -> str:
    return _compose(rng, _FILLER, {"topic": rng.choice(_TOPICS)}, first=_FILLER[0])


# ------------------------------------------------------------------------------------------------ non-English

# (animals, friend animals, sentences) per language; {name} is a world name, {animal}/{friend} from the lists.
_STORIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fr": (
        ("chat", "chien", "lapin", "renard", "ours", "canard", "hibou", "cheval"),
        (
            "Il était une fois un petit {animal} qui s'appelait {name}.",
            "{name} habitait dans une jolie maison près de la rivière.",
            "Chaque matin, il se promenait dans la forêt avec sa famille.",
            "Un jour, {name} trouva une clé dorée sous un grand arbre.",
            "Son ami le {friend} arriva en courant pour voir ce trésor.",
            "Ensemble, ils cherchèrent la porte que cette clé pouvait ouvrir.",
            "Le soleil brillait et les oiseaux chantaient dans le ciel bleu.",
            "Tout à coup, ils entendirent un bruit étrange derrière les buissons.",
            "{name} avait un peu peur, mais il voulait être courageux.",
            "Ils découvrirent une vieille boîte remplie de jouets et de livres.",
            "Le soir, ils rentrèrent à la maison pour manger une bonne soupe.",
            "Sa maman lui raconta une histoire avant de dormir.",
            "Depuis ce jour, {name} et le {friend} sont les meilleurs amis du monde.",
            "Ils jouent souvent dans le jardin quand il fait beau.",
        ),
    ),
    "de": (
        ("Kater", "Hund", "Hase", "Fuchs", "Bär", "Igel", "Wolf", "Esel"),
        (
            "Es war einmal ein kleiner {animal}, der {name} hieß.",
            "{name} wohnte in einem gemütlichen Haus am Rand des Waldes.",
            "Jeden Morgen ging er mit seiner Familie zum See hinunter.",
            "Eines Tages fand {name} einen goldenen Schlüssel unter einem alten Baum.",
            "Sein Freund, der {friend}, kam schnell herbei, um den Schatz zu sehen.",
            "Gemeinsam suchten sie nach der Tür, die der Schlüssel öffnen konnte.",
            "Die Sonne schien warm und die Vögel sangen in den Bäumen.",
            "Plötzlich hörten sie ein seltsames Geräusch hinter den Büschen.",
            "{name} hatte ein wenig Angst, aber er wollte mutig sein.",
            "Sie entdeckten eine alte Kiste voller Spielsachen und Bücher.",
            "Am Abend gingen sie nach Hause und aßen eine warme Suppe.",
            "Seine Mutter erzählte ihm eine Geschichte, bevor er einschlief.",
            "Seit diesem Tag sind {name} und der {friend} die besten Freunde.",
            "Sie spielen oft zusammen im Garten, wenn das Wetter schön ist.",
        ),
    ),
    "es": (
        ("gato", "perro", "conejo", "zorro", "oso", "pato", "búho", "caballo"),
        (
            "Había una vez un pequeño {animal} que se llamaba {name}.",
            "{name} vivía en una casa bonita cerca del río.",
            "Todas las mañanas paseaba por el bosque con su familia.",
            "Un día, {name} encontró una llave dorada debajo de un árbol grande.",
            "Su amigo el {friend} llegó corriendo para ver el tesoro.",
            "Juntos buscaron la puerta que aquella llave podía abrir.",
            "El sol brillaba y los pájaros cantaban en el cielo azul.",
            "De repente, oyeron un ruido extraño detrás de los arbustos.",
            "{name} tenía un poco de miedo, pero quería ser valiente.",
            "Descubrieron una caja vieja llena de juguetes y de libros.",
            "Por la noche volvieron a casa para comer una sopa caliente.",
            "Su mamá le contó un cuento antes de dormir.",
            "Desde aquel día, {name} y el {friend} son los mejores amigos del mundo.",
            "Juegan a menudo en el jardín cuando hace buen tiempo.",
        ),
    ),
}


def _non_english(rng: random.Random) -> str:
    animals, sentences = _STORIES[rng.choice(sorted(_STORIES))]
    animal, friend = rng.sample(animals, 2)
    name = rng.choice([n for n, pronoun in world.NAMES.items() if pronoun == "he"])
    values = {"name": name, "animal": animal, "friend": friend}
    target = rng.randint(8, len(sentences) - 1)  # the story in order, some middle sentences left out
    keep = sorted([0, len(sentences) - 2, *rng.sample(range(1, len(sentences) - 2), target - 2)])
    body = [sentences[i].format_map(values) for i in keep]
    cut = rng.randint(3, len(body) - 3)
    return " ".join(body[:cut]) + "\n\n" + " ".join(body[cut:])


_WRITERS: dict[str, Callable[[random.Random], str]] = {
    "off_domain": _off_domain,
    "spam": _spam,
    "filler": _filler,
    "non_english": _non_english,
}
