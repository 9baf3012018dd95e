"""The built-in DEMO data set: SYNTHETIC, generated, deterministic, no download.

Nothing here is real user behaviour: the items, titles and users are made up by the rules
below, so that the default run is small (prep + the tiny model in minutes on 2 CPU cores)
and has structure a sequential recommender can learn beyond "the most popular items", and
K-means clients that differ in taste (federated recommendation's premise). Results on it
say whether the pipeline learns; real-data results (Amazon Games) are reported separately.

- Items: per genre 15 *series* of 1-5 installments ("Galaxy Racer", "Galaxy Racer 2", ...)
  and 15 standalone games ("Midnight Sprint"). Titles come from per-genre word lists. Two raw
  titles carry the HTML entity ``&amp;`` (cleaned like real data), and 4 "re-releases"
  repeat an existing title under a new id, as real catalogues do.
- Users: group g prefers genre g (75% of picks), likes genre g+1 (15%), rest at random.
  A sequence (5-20 items, no repeats) starts on a first installment or standalone game;
  after an installment the next one follows with probability 0.6 (series continuation);
  otherwise the next genre is drawn from the group's taste and an item by popularity
  (Zipf within the genre), favouring games whose previous installment the user has played.
  So "last item -> next" (a first-order Markov baseline) beats popularity clearly, and
  the history's genres tell a user's group.

The catalogue and its popularity come from a fixed seed of their own (DEMO_SEED); users
from a separate stream, so `generate_users(seed=...)` can draw OTHER users from the same
world: the tiny model's public warm-up (`fellrec_flwr.model.tiny`) uses such users, never the
clients' (public users have no taste group: every genre equally likely). The data never
depend on the run's seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from data_prep.readers import SourceData, clean_title, finish_source

DEMO_VERSION = 2  # bump when the generator changes (part of the cache key)
DEMO_SEED = 20240517  # the catalogue, its popularity, and the clients' users
PUBLIC_SEED = 777  # users of the tiny model's public warm-up: same world, other people
NUM_USERS = 800
SERIES_PER_GENRE = 15
STANDALONE_PER_GENRE = 15
DUPLICATE_TITLES = 4
SEQ_MIN, SEQ_MAX = 5, 20
P_CONTINUE_SERIES = 0.6
TASTE_PRIMARY, TASTE_SECONDARY = 0.75, 0.15

# genre -> (series first words, series second words, subtitle adjectives, subtitle nouns)
WORDS: dict[str, tuple[list[str], list[str], list[str], list[str]]] = {
    "racing": (["Galaxy", "Turbo", "Street", "Nitro", "Asphalt", "Rally", "Drift", "Velocity", "Apex"],
               ["Racer", "Rush", "Kings", "Circuit", "Legends", "Fever", "Riders", "Grid", "Motors"],
               ["Neon", "Midnight", "Desert", "Arctic", "Coastal", "Urban", "Electric", "Wild", "Burning"],
               ["Drift", "Highway", "Grand Prix", "Showdown", "Sprint", "Overdrive", "Getaway", "Rally", "Boost"]),
    "fantasy": (["Dragon", "Crystal", "Eternal", "Shadow", "Mythic", "Rune", "Elder", "Celestial", "Frost"],
                ["Saga", "Chronicles", "Quest", "Legacy", "Realms", "Tales", "Knights", "Covenant", "Crown"],
                ["Forgotten", "Silver", "Ancient", "Cursed", "Hidden", "Fallen", "Sacred", "Twilight", "Lost"],
                ["Kingdom", "Prophecy", "Oath", "Tower", "Blade", "Throne", "Grimoire", "Relic", "Dawn"]),
    "shooter": (["Iron", "Strike", "Delta", "Steel", "Ghost", "Rogue", "Tactical", "Black", "Omega"],
                ["Front", "Squad", "Warfare", "Protocol", "Division", "Ops", "Recon", "Battalion", "Siege"],
                ["Red", "Silent", "Total", "Urban", "Final", "Broken", "Hostile", "Covert", "Modern"],
                ["Offensive", "Assault", "Frontier", "Dawn", "Storm", "Reckoning", "Uprising", "Horizon", "Zero"]),
    "puzzle": (["Block", "Color", "Tiny", "Word", "Gem", "Logic", "Bubble", "Pixel", "Mind"],
               ["Blast", "Garden", "Puzzle", "Match", "Maze", "Tiles", "Party", "Bloom", "Quest"],
               ["Sweet", "Happy", "Cosmic", "Clever", "Lucky", "Sunny", "Magic", "Jolly", "Fuzzy"],
               ["Island", "Journey", "Carnival", "Paradise", "Factory", "Festival", "Adventure", "Kingdom", "Voyage"]),
    "sports": (["Pro", "Super", "Ultimate", "Champion", "Total", "World", "All-Star", "Power", "Legend"],
               ["Soccer", "Tennis", "Golf", "Hoops", "Hockey", "Baseball", "Boxing", "Skate", "Football"],
               ["Season", "Global", "Pro", "Street", "Classic", "Arena", "Club", "Elite", "League"],
               ["Edition", "Tour", "Cup", "Challenge", "Series", "Showdown", "Finals", "Stars", "Open"]),
    "horror": (["Dead", "Silent", "Dark", "Crimson", "Hollow", "Grim", "Night", "Blood", "Ashen"],
               ["Manor", "Asylum", "Harvest", "Woods", "Whispers", "Hollow", "Signal", "Rites", "Tide"],
               ["Rotting", "Endless", "Pale", "Drowned", "Twisted", "Burning", "Haunted", "Sunken", "Hungry"],
               ["Nightmare", "Descent", "Awakening", "Remains", "Requiem", "Outbreak", "Echoes", "Cellar", "Eclipse"]),
}
GENRES = list(WORDS)
# Raw titles with an HTML entity, as in real Amazon metadata (cleaned to "&").
ENTITY_SERIES = {("fantasy", 0): "Swords &amp; Sorcery", ("puzzle", 0): "Cats &amp;  Crates"}
INSTALLMENT_WEIGHTS = {1: 0.2, 2: 0.25, 3: 0.25, 4: 0.2, 5: 0.1}


@dataclass
class DemoWorld:
    """Everything the generator knows; `items` has raw titles plus genre/series metadata."""

    items: pd.DataFrame  # item_id, raw_title, genre, series (-1 = standalone), installment
    sequences: dict[int, list[int]]
    user_group: np.ndarray  # user -> preferred genre index


def _catalogue(rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    series_id = 0
    for g, genre in enumerate(GENRES):
        first, second, adjs, nouns = WORDS[genre]
        names = [f"{a} {b}" for a in first for b in second]
        subtitles = [f"{a} {n}" for a in adjs for n in nouns]
        name_pick = rng.permutation(len(names))
        sub_pick = iter(rng.permutation(len(subtitles)).tolist())
        for s in range(SERIES_PER_GENRE):
            name = ENTITY_SERIES.get((genre, s), names[name_pick[s]])
            count = int(rng.choice(list(INSTALLMENT_WEIGHTS), p=list(INSTALLMENT_WEIGHTS.values())))
            for k in range(1, count + 1):
                # "Name 2", "Name 3": a sequel's title says what it continues, as "Halo 3" does.
                title = name if k == 1 else f"{name} {k}"
                rows.append((title, genre, series_id, k))
            series_id += 1
        # Standalone games reuse unused subtitle phrases, so they never clash with a series.
        for _ in range(STANDALONE_PER_GENRE):
            rows.append((subtitles[next(sub_pick)], genre, -1, 1))
    # Re-releases: the same title under a new id (ids differ, titles equal, no successor).
    for idx in rng.choice(len(rows), size=DUPLICATE_TITLES, replace=False).tolist():
        title, genre, _, _ = rows[idx]
        rows.append((title, genre, -1, 1))
    items = pd.DataFrame(rows, columns=["raw_title", "genre", "series", "installment"])
    items.insert(0, "item_id", np.arange(len(items), dtype=np.int64))
    return items


def _taste(group: int) -> np.ndarray:
    """Genre probabilities of a taste group; group -1 (public users) likes every genre equally."""
    if group < 0:
        return np.full(len(GENRES), 1 / len(GENRES))
    taste = np.full(len(GENRES), (1 - TASTE_PRIMARY - TASTE_SECONDARY) / (len(GENRES) - 2))
    taste[group] = TASTE_PRIMARY
    taste[(group + 1) % len(GENRES)] = TASTE_SECONDARY
    return taste


def _sequence(rng: np.random.Generator, group: int, items: pd.DataFrame, popularity: np.ndarray,
              by_genre: list[np.ndarray], next_of: dict[int, int], prev_of: dict[int, int]) -> list[int]:
    taste = _taste(group)
    length = int(rng.integers(SEQ_MIN, SEQ_MAX + 1))
    seen: list[int] = []
    seen_set: set[int] = set()
    while len(seen) < length:
        last = seen[-1] if seen else None
        if last is not None and last in next_of and next_of[last] not in seen_set and rng.random() < P_CONTINUE_SERIES:
            pick = next_of[last]
        else:
            candidates = by_genre[int(rng.choice(len(GENRES), p=taste))]
            candidates = candidates[[c not in seen_set for c in candidates]]
            if len(candidates) == 0:
                continue
            # Prefer games that can be started now: first installments, standalones, or the
            # sequel of something already played.
            ready = np.array([c not in prev_of or prev_of[c] in seen_set for c in candidates])
            weights = popularity[candidates] * np.where(ready, 1.0, 0.1)
            pick = int(rng.choice(candidates, p=weights / weights.sum()))
        seen.append(pick)
        seen_set.add(pick)
    return seen


@dataclass
class _World:
    items: pd.DataFrame
    popularity: np.ndarray
    by_genre: list[np.ndarray]
    next_of: dict[int, int]
    prev_of: dict[int, int]


def _world() -> _World:
    """The catalogue with its popularity and series links (DEMO_SEED only)."""
    rng = np.random.default_rng(DEMO_SEED)
    items = _catalogue(rng)
    # Zipf popularity within each genre, over a random order of its items.
    popularity = np.zeros(len(items))
    by_genre = []
    for genre in GENRES:
        ids = items.index[items["genre"] == genre].to_numpy()
        ranks = rng.permutation(len(ids))
        popularity[ids] = 1.0 / (ranks + 1) ** 0.8
        by_genre.append(ids)
    next_of, prev_of = {}, {}
    series_items = items[items["series"] >= 0].sort_values(["series", "installment"])
    for _, group in series_items.groupby("series"):
        ids = group["item_id"].tolist()
        for a, b in zip(ids, ids[1:]):
            next_of[a], prev_of[b] = b, a
    return _World(items, popularity, by_genre, next_of, prev_of)


def generate_users(seed: int = DEMO_SEED, num_users: int = NUM_USERS,
                   taste_groups: bool = True) -> tuple[dict[int, list[int]], np.ndarray]:
    """Users of the demo world: ({user: item ids, oldest first}, user -> taste group or -1).

    With taste_groups=False every user likes every genre equally (the public population).
    """
    world = _world()
    rng = np.random.default_rng([DEMO_SEED, seed])  # users never share a stream with the catalogue
    groups = rng.integers(0, len(GENRES), size=num_users) if taste_groups else np.full(num_users, -1)
    sequences = {u: _sequence(rng, int(g), world.items, world.popularity, world.by_genre, world.next_of,
                              world.prev_of) for u, g in enumerate(groups.tolist())}
    return sequences, groups


def generate_demo() -> DemoWorld:
    items = _world().items
    sequences, user_group = generate_users()
    return DemoWorld(items=items, sequences=sequences, user_group=user_group)


def public_title_sequences(num_users: int, seed: int = PUBLIC_SEED) -> list[list[str]]:
    """Cleaned-title sequences of `num_users` public demo users (no taste group, other seed).

    For the tiny model's warm-up: the same catalogue and behaviour rules as the clients'
    users, but none of them. Titles, not ids, because prepared ids are re-indexed.
    """
    if seed == DEMO_SEED:
        raise ValueError(f"seed={seed} would draw the clients' own users; public users need another seed.")
    items = _world().items
    titles = [clean_title(t) for t in items["raw_title"]]
    sequences, _ = generate_users(seed, num_users, taste_groups=False)
    return [[titles[i] for i in seq] for seq in sequences.values()]


def read_demo() -> SourceData:
    """The demo as a reader's SourceData: titles cleaned; items no user picked are dropped
    and ids re-indexed, as for any source."""
    world = generate_demo()
    titles = {int(i): clean_title(t) for i, t in zip(world.items["item_id"], world.items["raw_title"])}
    return finish_source(titles, world.sequences, {})
