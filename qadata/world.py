"""A small fictional world, deterministic from a seed, rendered as Wikipedia-style paragraphs with
HotpotQA-style bridge and comparison questions of one to four hops.

Every name and fact is invented, so no model can answer from memory: it has to search (the AutoCoA
paper's own argument for agent models, its appendix). Each paragraph is a list of sentences, one
fact per sentence, so supporting facts point at the sentence that holds the fact, as in HotpotQA.

A question's hop count is the number of paragraphs its answer needs (its distinct supporting-fact
titles, stored as ``hops``): 2-hop questions are HotpotQA's bridge and comparison kinds; 1-hop
lookups and 3- and 4-hop composed bridges (work -> creator -> birth city -> country -> capital)
give accuracy by number of actions (the paper's Figure 3) something to show.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from qadata.sampling import largest_remainder

_ONSETS = [
    "b",
    "br",
    "c",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "kr",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "st",
    "t",
    "th",
    "v",
    "w",
    "z",
    "sh",
    "tr",
    "vel",
    "cor",
    "mar",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou", "y"]
_CODAS = ["", "n", "r", "s", "th", "l", "x", "nd", "rk", "m", "sk", "v"]

OCCUPATIONS = [
    "novelist",
    "film director",
    "composer",
    "painter",
    "architect",
    "physicist",
    "poet",
    "sculptor",
    "chemist",
    "playwright",
]
WORK_KIND = {
    "novelist": "novel",
    "film director": "film",
    "composer": "symphony",
    "painter": "painting",
    "architect": "building",
    "physicist": "treatise",
    "poet": "poetry collection",
    "sculptor": "sculpture",
    "chemist": "monograph",
    "playwright": "play",
}
CREATOR_VERB = {
    "novel": "written by",
    "film": "directed by",
    "symphony": "composed by",
    "painting": "painted by",
    "building": "designed by",
    "treatise": "written by",
    "poetry collection": "written by",
    "sculpture": "made by",
    "monograph": "written by",
    "play": "written by",
}
_ACTIVE_VERB = {
    "written by": "wrote",
    "directed by": "directed",
    "composed by": "composed",
    "painted by": "painted",
    "designed by": "designed",
    "made by": "made",
}
_BLOCKED_NAMES = {"Sex", "Nazi", "Rape", "Kill", "Dick"}
ORG_KINDS = [
    "publishing house",
    "film studio",
    "university",
    "shipping company",
    "research institute",
    "orchestra",
    "bank",
    "newspaper",
]
_WORK_WORDS = [
    "Glass",
    "Orchard",
    "River",
    "Lantern",
    "Winter",
    "Silent",
    "Harbour",
    "Copper",
    "Garden",
    "Empty",
    "Crown",
    "Hollow",
    "Ember",
    "Salt",
    "Tide",
    "Mirror",
    "Iron",
    "Violet",
    "Paper",
    "Thread",
    "Meadow",
    "Ash",
    "Northern",
    "Quiet",
    "Falling",
    "Seventh",
    "Amber",
    "Stone",
]
_ORG_SUFFIX = {
    "publishing house": "Press",
    "film studio": "Pictures",
    "university": "University",
    "shipping company": "Lines",
    "research institute": "Institute",
    "orchestra": "Philharmonic",
    "bank": "Bank",
    "newspaper": "Gazette",
}


@dataclass
class Entity:
    kind: str  # person | place | country | org | work
    name: str
    attrs: dict = field(default_factory=dict)
    sentences: list[str] = field(default_factory=list)
    # attribute name -> index of the sentence that states it (for supporting facts)
    fact_sentence: dict = field(default_factory=dict)

    def say(self, attr: str | None, sentence: str) -> None:
        if attr is not None:
            self.fact_sentence[attr] = len(self.sentences)
        # HotpotQA sentences after the first carry their own leading space
        self.sentences.append(sentence if not self.sentences else " " + sentence)


@dataclass
class WorldSpec:
    seed: int = 13
    countries: int = 24
    places: int = 300
    people: int = 1200
    orgs: int = 300
    works: int = 1200
    questions: int = 600
    dev_fraction: float = 0.2
    distractors: int = 8  # per 2-hop question; every question has ``distractors + 2`` context paragraphs
    # share of questions with 1, 2, 3 and 4 hops (2-hop: half bridge, half comparison). (0, 1, 0, 0) gives
    # the 2-hop-only set of earlier versions, question for question and id for id.
    hop_mix: tuple[float, float, float, float] = (0.1, 0.5, 0.25, 0.15)


class _Names:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: int) -> str:
        s = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(syllables))
        return (s + self.rng.choice(_CODAS)).capitalize()

    def unique(self, make) -> str:
        for _ in range(1000):
            name = make()
            if name not in self.used and not _BLOCKED_NAMES & set(name.split()):
                self.used.add(name)
                return name
        raise RuntimeError("name space exhausted; lower the world size")


def _a(word: str) -> str:
    """The indefinite article and the word: "an orchestra", "a bank"."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def _pronoun(person: Entity) -> tuple[str, str]:
    return ("She", "Her") if person.attrs["gender"] == "f" else ("He", "His")


class World:
    """Entities plus their paragraphs; :func:`build_world` makes one."""

    def __init__(self, spec: WorldSpec):
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.names = _Names(self.rng)
        self.entities: dict[str, Entity] = {}
        self.by_kind: dict[str, list[Entity]] = {}

    def add(self, e: Entity) -> Entity:
        self.entities[e.name] = e
        self.by_kind.setdefault(e.kind, []).append(e)
        return e

    def paragraph(self, name: str) -> dict:
        e = self.entities[name]
        return {"title": e.name, "sentences": list(e.sentences)}


def build_world(spec: WorldSpec) -> World:
    w = World(spec)
    r, n = w.rng, w.names
    for _ in range(spec.countries):
        name = n.unique(lambda: n.word(r.randint(2, 3)))
        w.add(
            Entity(
                "country",
                name,
                {
                    "demonym": name + ("n" if name[-1] in "aeiou" else "ian"),
                    "capital": None,
                    "founded": r.randint(1200, 1900),
                },
            )
        )
    for _ in range(spec.places):
        name = n.unique(lambda: n.word(r.randint(2, 3)))
        country = r.choice(w.by_kind["country"])
        e = w.add(
            Entity(
                "place",
                name,
                {
                    "country": country.name,
                    "population": r.randint(8, 2400) * 1000,
                    "founded": r.randint(900, 1850),
                    "river": n.word(2),
                },
            )
        )
        if country.attrs["capital"] is None:
            country.attrs["capital"] = name
            e.attrs["capital_of"] = country.name
    for _ in range(spec.people):
        name = n.unique(lambda: f"{n.word(r.randint(1, 2))} {n.word(r.randint(2, 3))}")
        occ = r.choice(OCCUPATIONS)
        city = r.choice(w.by_kind["place"])
        w.add(
            Entity(
                "person",
                name,
                {
                    "gender": r.choice("fm"),
                    "occupation": occ,
                    "birth_city": city.name,
                    "birth_year": r.randint(1820, 1995),
                    "nationality": w.entities[city.attrs["country"]].attrs["demonym"],
                },
            )
        )
    people = w.by_kind["person"]
    for _ in range(spec.orgs):
        kind = r.choice(ORG_KINDS)
        name = n.unique(lambda: f"{n.word(2)} {_ORG_SUFFIX[kind]}")  # noqa: B023 - called at once
        w.add(
            Entity(
                "org",
                name,
                {
                    "kind": kind,
                    "founded": r.randint(1700, 1990),
                    "headquarters": r.choice(w.by_kind["place"]).name,
                    "founder": r.choice(people).name,
                },
            )
        )
    orgs = w.by_kind["org"]
    for p in people:
        p.attrs["employer"] = r.choice(orgs).name
    for _ in range(spec.works):
        creator = r.choice(people)
        kind = WORK_KIND[creator.attrs["occupation"]]
        name = n.unique(lambda: "The " + " ".join(r.sample(_WORK_WORDS, 2)) + r.choice(["", " of " + n.word(2)]))
        year = creator.attrs["birth_year"] + r.randint(20, 60)
        w.add(
            Entity(
                "work", name, {"kind": kind, "creator": creator.name, "year": year, "publisher": r.choice(orgs).name}
            )
        )
        creator.attrs.setdefault("works", []).append(name)
    _render(w)
    return w


def _render(w: World) -> None:
    for c in w.by_kind["country"]:
        a = c.attrs
        c.say(None, f"{c.name} is a sovereign state whose people are called {a['demonym']}s.")
        c.say("founded", f"It was established as an independent country in {a['founded']}.")
        if a["capital"]:
            c.say("capital", f"Its capital and largest city is {a['capital']}.")
    for p in w.by_kind["place"]:
        a = p.attrs
        p.say("country", f"{p.name} is a city in {a['country']}.")
        p.say("population", f"At the last census it had a population of {a['population']:,}.")
        p.say("founded", f"The city was founded in {a['founded']} on the banks of the {a['river']} River.")
        if "capital_of" in a:
            p.say(None, f"It is the capital of {a['capital_of']}.")
    for e in w.by_kind["person"]:
        a = e.attrs
        he, his = _pronoun(e)
        surname = e.name.split()[-1]
        e.say("occupation", f"{e.name} (born {a['birth_year']}) is {_a(a['nationality'])} {a['occupation']}.")
        e.say("birth_city", f"{he} was born in the city of {a['birth_city']}.")
        e.say("employer", f"{surname} has been associated with the {a['employer']} for most of {his.lower()} career.")
        if a.get("works"):
            first = w.entities[a["works"][0]]
            e.say("works", f"{his} best-known work is the {first.attrs['kind']} {first.name} ({first.attrs['year']}).")
    for o in w.by_kind["org"]:
        a = o.attrs
        o.say("kind", f"The {o.name} is {_a(a['kind'])}.")
        o.say("founded", f"It was founded in {a['founded']} by {a['founder']}.")
        o.fact_sentence["founder"] = o.fact_sentence["founded"]
        o.say("headquarters", f"Its headquarters are in {a['headquarters']}.")
    for k in w.by_kind["work"]:
        a = k.attrs
        k.say("creator", f"{k.name} is a {a['year']} {a['kind']} {CREATOR_VERB[a['kind']]} {a['creator']}.")
        k.fact_sentence["year"] = k.fact_sentence["creator"]
        k.say("publisher", f"It was first presented to the public by the {a['publisher']}.")


# -- questions ----------------------------------------------------------------------------------
# Each template returns (question, answer, [(title, attr)...] supporting facts, level) or None.


def _bridge_work_creator_city(w: World, r: random.Random):
    work = r.choice(w.by_kind["work"])
    creator = w.entities[work.attrs["creator"]]
    verb = _ACTIVE_VERB[CREATOR_VERB[work.attrs["kind"]]]
    q = f"In which city was the person who {verb} the {work.attrs['kind']} {work.name} born?"
    return q, creator.attrs["birth_city"], [(work.name, "creator"), (creator.name, "birth_city")], "medium"


def _bridge_work_creator_year(w: World, r: random.Random):
    work = r.choice(w.by_kind["work"])
    creator = w.entities[work.attrs["creator"]]
    q = f"In what year was the creator of {work.name} born?"
    return q, str(creator.attrs["birth_year"]), [(work.name, "creator"), (creator.name, "occupation")], "medium"


def _bridge_person_employer_hq(w: World, r: random.Random):
    person = r.choice(w.by_kind["person"])
    org = w.entities[person.attrs["employer"]]
    q = f"In which city are the headquarters of the organisation that {person.name} has been associated with?"
    return q, org.attrs["headquarters"], [(person.name, "employer"), (org.name, "headquarters")], "hard"


def _bridge_birthplace_country(w: World, r: random.Random):
    person = r.choice(w.by_kind["person"])
    city = w.entities[person.attrs["birth_city"]]
    q = f"{person.name} was born in a city of which country?"
    return q, city.attrs["country"], [(person.name, "birth_city"), (city.name, "country")], "easy"


def _bridge_founder_occupation(w: World, r: random.Random):
    org = r.choice(w.by_kind["org"])
    founder = w.entities[org.attrs["founder"]]
    q = f"What was the occupation of the founder of the {org.name}?"
    return q, founder.attrs["occupation"], [(org.name, "founder"), (founder.name, "occupation")], "hard"


def _compare_born_first(w: World, r: random.Random):
    a, b = r.sample(w.by_kind["person"], 2)
    if a.attrs["birth_year"] == b.attrs["birth_year"]:
        return None
    first = a if a.attrs["birth_year"] < b.attrs["birth_year"] else b
    q = f"Who was born first, {a.name} or {b.name}?"
    return q, first.name, [(a.name, "occupation"), (b.name, "occupation")], "medium"


def _compare_org_older(w: World, r: random.Random):
    a, b = r.sample(w.by_kind["org"], 2)
    if a.attrs["founded"] == b.attrs["founded"]:
        return None
    first = a if a.attrs["founded"] < b.attrs["founded"] else b
    q = f"Which was founded earlier, the {a.name} or the {b.name}?"
    return q, first.name, [(a.name, "founded"), (b.name, "founded")], "medium"


def _compare_bigger_city(w: World, r: random.Random):
    a, b = r.sample(w.by_kind["place"], 2)
    if a.attrs["population"] == b.attrs["population"]:
        return None
    big = a if a.attrs["population"] > b.attrs["population"] else b
    q = f"Which city has the larger population, {a.name} or {b.name}?"
    return q, big.name, [(a.name, "population"), (b.name, "population")], "hard"


def _compare_same_nationality(w: World, r: random.Random):
    a, b = r.sample(w.by_kind["person"], 2)
    same = a.attrs["nationality"] == b.attrs["nationality"]
    q = f"Are {a.name} and {b.name} of the same nationality?"
    return q, "yes" if same else "no", [(a.name, "occupation"), (b.name, "occupation")], "easy"


def _compare_same_occupation(w: World, r: random.Random):
    a, b = r.sample(w.by_kind["person"], 2)
    same = a.attrs["occupation"] == b.attrs["occupation"]
    q = f"Do {a.name} and {b.name} share the same occupation?"
    return q, "yes" if same else "no", [(a.name, "occupation"), (b.name, "occupation")], "easy"


BRIDGE = [
    _bridge_work_creator_city,
    _bridge_work_creator_year,
    _bridge_person_employer_hq,
    _bridge_birthplace_country,
    _bridge_founder_occupation,
]
COMPARISON = [
    _compare_born_first,
    _compare_org_older,
    _compare_bigger_city,
    _compare_same_nationality,
    _compare_same_occupation,
]


# -- one-hop lookups and three- and four-hop composed bridges -----------------------------------------
def _single_birth_city(w: World, r: random.Random):
    person = r.choice(w.by_kind["person"])
    return f"In which city was {person.name} born?", person.attrs["birth_city"], [(person.name, "birth_city")], "easy"


def _single_org_founded(w: World, r: random.Random):
    org = r.choice(w.by_kind["org"])
    return f"In what year was the {org.name} founded?", str(org.attrs["founded"]), [(org.name, "founded")], "easy"


def _single_work_publisher(w: World, r: random.Random):
    work = r.choice(w.by_kind["work"])
    return (
        f"Which organisation first presented {work.name} to the public?",
        work.attrs["publisher"],
        [(work.name, "publisher")],
        "easy",
    )


def _hop3_work_creator_country(w: World, r: random.Random):
    work = r.choice(w.by_kind["work"])
    creator = w.entities[work.attrs["creator"]]
    city = w.entities[creator.attrs["birth_city"]]
    q = f"In which country was the creator of {work.name} born?"
    facts = [(work.name, "creator"), (creator.name, "birth_city"), (city.name, "country")]
    return q, city.attrs["country"], facts, "hard"


def _hop3_person_employer_country(w: World, r: random.Random):
    person = r.choice(w.by_kind["person"])
    org = w.entities[person.attrs["employer"]]
    city = w.entities[org.attrs["headquarters"]]
    q = f"In which country are the headquarters of the organisation that {person.name} has been associated with?"
    facts = [(person.name, "employer"), (org.name, "headquarters"), (city.name, "country")]
    return q, city.attrs["country"], facts, "hard"


def _hop3_publisher_founder_year(w: World, r: random.Random):
    work = r.choice(w.by_kind["work"])
    org = w.entities[work.attrs["publisher"]]
    founder = w.entities[org.attrs["founder"]]
    q = f"In what year was the founder of the organisation that first presented {work.name} born?"
    return (
        q,
        str(founder.attrs["birth_year"]),
        [(work.name, "publisher"), (org.name, "founder"), (founder.name, "occupation")],
        "hard",
    )


def _hop3_founder_country(w: World, r: random.Random):
    org = r.choice(w.by_kind["org"])
    founder = w.entities[org.attrs["founder"]]
    city = w.entities[founder.attrs["birth_city"]]
    q = f"In which country was the founder of the {org.name} born?"
    facts = [(org.name, "founder"), (founder.name, "birth_city"), (city.name, "country")]
    return q, city.attrs["country"], facts, "hard"


def _hop4_creator_country_capital(w: World, r: random.Random):
    work = r.choice(w.by_kind["work"])
    creator = w.entities[work.attrs["creator"]]
    city = w.entities[creator.attrs["birth_city"]]
    country = w.entities[city.attrs["country"]]
    if not country.attrs["capital"]:
        return None
    q = f"What is the capital of the country in which the creator of {work.name} was born?"
    return (
        q,
        country.attrs["capital"],
        [(work.name, "creator"), (creator.name, "birth_city"), (city.name, "country"), (country.name, "capital")],
        "hard",
    )


def _hop4_creator_employer_country(w: World, r: random.Random):
    work = r.choice(w.by_kind["work"])
    creator = w.entities[work.attrs["creator"]]
    org = w.entities[creator.attrs["employer"]]
    city = w.entities[org.attrs["headquarters"]]
    q = (
        f"In which country are the headquarters of the organisation that the creator of {work.name} "
        f"has been associated with?"
    )
    return (
        q,
        city.attrs["country"],
        [(work.name, "creator"), (creator.name, "employer"), (org.name, "headquarters"), (city.name, "country")],
        "hard",
    )


def _hop4_publisher_founder_country(w: World, r: random.Random):
    work = r.choice(w.by_kind["work"])
    org = w.entities[work.attrs["publisher"]]
    founder = w.entities[org.attrs["founder"]]
    city = w.entities[founder.attrs["birth_city"]]
    q = f"In which country was the founder of the organisation that first presented {work.name} born?"
    return (
        q,
        city.attrs["country"],
        [(work.name, "publisher"), (org.name, "founder"), (founder.name, "birth_city"), (city.name, "country")],
        "hard",
    )


SINGLE = [_single_birth_city, _single_org_founded, _single_work_publisher]
HOP3 = [_hop3_work_creator_country, _hop3_person_employer_country, _hop3_publisher_founder_year, _hop3_founder_country]
HOP4 = [_hop4_creator_country_capital, _hop4_creator_employer_country, _hop4_publisher_founder_country]
# hops -> templates; 1-, 3- and 4-hop questions are bridges (HotpotQA knows only bridge and comparison)
TEMPLATES_BY_HOPS = {1: SINGLE, 3: HOP3, 4: HOP4}


def hop_counts(spec: WorldSpec) -> dict[int, int]:
    """Questions per hop count: ``spec.questions`` split by ``spec.hop_mix`` (largest remainders, exact)."""
    if len(spec.hop_mix) != 4 or any(x < 0 for x in spec.hop_mix) or sum(spec.hop_mix) <= 0:
        raise ValueError(f"hop_mix must be four non-negative shares for 1..4 hops, got {spec.hop_mix!r}")
    return dict(zip((1, 2, 3, 4), largest_remainder(list(spec.hop_mix), spec.questions)))


def generate_questions(w: World) -> list[dict]:
    """HotpotQA-layout rows (HF style) of 1 to 4 hops, with their gold paragraphs and same-kind distractors.

    Each hop count is its own stream (own random generator, own ids, own dev tail), so the 2-hop
    questions are those of the 2-hop-only world whatever the mix: ``emb-<seed>-<n>`` for 2 hops,
    ``emb-<seed>-h<hops>-<n>`` for the others. Rows come in hop order, 1 to 4.
    """
    spec = w.spec
    counts = hop_counts(spec)
    seen: set[str] = set()
    streams = {2: _stream(w, 2, counts[2], random.Random(spec.seed + 1), seen)}
    for hops in (1, 3, 4):
        streams[hops] = _stream(w, hops, counts[hops], random.Random(f"{spec.seed}/hops{hops}"), seen)
    return [row for hops in (1, 2, 3, 4) for row in streams[hops]]


def _stream(w: World, hops: int, n: int, r: random.Random, seen: set[str]) -> list[dict]:
    spec = w.spec
    rows: list[dict] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > n * 50:
            raise RuntimeError(f"could not generate {n} distinct {hops}-hop questions; enlarge the world")
        if hops == 2:
            qtype = "bridge" if len(rows) % 2 == 0 else "comparison"
            made = r.choice(BRIDGE if qtype == "bridge" else COMPARISON)(w, r)
        else:
            qtype = "bridge"
            made = r.choice(TEMPLATES_BY_HOPS[hops])(w, r)
        if made is None or made[0] in seen:
            continue
        question, answer, facts, level = made
        seen.add(question)
        gold = list(dict.fromkeys(title for title, _ in facts))
        # sorted: a set of strings iterates in an order that changes with PYTHONHASHSEED, which made the
        # distractors (not the questions) differ between processes
        kinds = sorted({w.entities[t].kind for t in gold})
        pool = [e.name for k in kinds for e in w.by_kind[k] if e.name not in gold]
        # HotpotQA's ten paragraphs per question, whatever the number of gold ones
        distractors = r.sample(pool, min(max(spec.distractors + 2 - len(gold), 0), len(pool)))
        titles = gold + distractors
        r.shuffle(titles)
        paragraphs = [w.paragraph(t) for t in titles]
        rows.append(
            {
                "id": f"emb-{spec.seed}-{len(rows):05d}" if hops == 2 else f"emb-{spec.seed}-h{hops}-{len(rows):05d}",
                "question": question,
                "answer": answer,
                "type": qtype,
                "level": level,
                "hops": len(gold),
                "supporting_facts": {
                    "title": [t for t, _ in facts],
                    "sent_id": [w.entities[t].fact_sentence[a] for t, a in facts],
                },
                "context": {
                    "title": [p["title"] for p in paragraphs],
                    "sentences": [p["sentences"] for p in paragraphs],
                },
            }
        )
    n_dev = int(round(len(rows) * spec.dev_fraction))
    for i, row in enumerate(rows):
        row["split"] = "dev" if i >= len(rows) - n_dev else "train"
    return rows


def all_paragraphs(w: World) -> list[dict]:
    """Every entity's paragraph (the world's whole 'Wikipedia'), title order."""
    return [w.paragraph(name) for name in sorted(w.entities)]
