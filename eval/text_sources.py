"""Real text that ships with every CPython, and text generated from a seed: nothing is downloaded.

- `docs_sections()`: the language-reference topics of `pydoc_data.topics` (what `help("assert")` prints;
  ~700 KB of English prose with grammar rules and examples), as (title, body) sections in a fixed order.
- `stdlib_sources()`: the source of a fixed list of standard-library modules (real Python code).
- `WORDS`: a fixed list of common English words (keys of the needle tasks, the common-word task).
- procedural haystacks, a pure function of (seed, size) and the same on every Python version:
  `story_text()` (narrative prose from sentence templates), `log_lines()` (application log lines with
  timestamps and levels), `csv_rows()` (a sales table in CSV).

The text depends on the CPython version (topics are regenerated for each release): results record
`sys.version` and a fingerprint of the prompts, so that runs are compared on identical data.
"""

from __future__ import annotations

import os
import sysconfig
from functools import lru_cache

# Modules present in CPython 3.10 .. 3.13 as plain files (zipfile became a package in 3.12: left out).
STDLIB_FILES = (
    "argparse.py", "tarfile.py", "ftplib.py", "imaplib.py", "smtplib.py", "poplib.py", "tokenize.py",
    "gzip.py", "calendar.py", "pickle.py", "subprocess.py", "shutil.py", "textwrap.py", "http/client.py",
    "json/encoder.py", "logging/__init__.py", "logging/handlers.py", "email/utils.py", "locale.py",
    "mailbox.py", "plistlib.py", "pydoc.py", "sre_constants.py", "socket.py", "ssl.py", "uuid.py",
    "wave.py", "aifc.py", "bz2.py", "lzma.py", "telnetlib.py", "nntplib.py", "netrc.py", "pstats.py",
    "random.py", "statistics.py", "decimal.py", "_pydecimal.py", "fractions.py", "colorsys.py",
    "zipapp.py", "webbrowser.py", "urllib/parse.py", "urllib/request.py", "http/server.py",
    "http/cookiejar.py", "xml/dom/minidom.py", "sched.py", "selectors.py", "platform.py",
)

# 292 common English words (nouns and adjectives), fixed here so that keys do not depend on the Python version.
WORDS = tuple("""
apple river mountain garden window candle silver orange pencil bottle forest island mirror rabbit
violin ticket castle dragon planet rocket harbor lemon basket jacket kitten meadow pepper saddle
tunnel valley wagon anchor button cactus dolphin engine falcon ginger helmet igloo jungle kettle
ladder magnet napkin oyster parrot quartz radish salmon tomato umbrella velvet walnut yogurt zebra
acorn bamboo cherry desert eagle feather glacier hammer insect jewel koala lantern marble needle
orchid piano quiver ribbon spider turtle unicorn vessel whistle anthem beacon canyon dagger ember
fountain goblet hazel ivory jasmine kernel lobster mango nectar olive pebble quilt raven scarlet
thistle tulip vapor willow almond barley cobalt denim elbow fabric gravel hollow indigo jigsaw
kayak lilac mosaic nutmeg onion pillow quarry rustic sponge timber urchin vinyl wizard banner
cobweb domino eclipse fossil garnet hermit iceberg juniper knight locket mustard nickel oasis
pirate quokka riddle shadow tiger utensil voyage walrus bishop copper dancer emerald frost gadget
harvest icicle jester kingdom legend meteor nomad orbit puzzle quest rider saffron thunder
upland vertex wander beetle cedar drizzle estate fiddle goose hurdle iris jockey koi lagoon
marsh noble opera prism quarter rover sapphire tundra ulcer vault wheat bronze cabin daisy
empire fable granite hatchet inkwell jaguar kiosk lotus mammoth nozzle otter paddle quince
raft scroll torch usher venom wedge blossom cricket dune ermine flute grotto husky ignite jelly
kelp lark mint nest oak plume quail reef sloth trout vane wren badge chalk ditch elm flint gull
hinge ivy jar kite lime moss nook owl pine quill rust sage tide vine yarn axle brook clover dusk
fern grape heron inlet jade keel loom maple nettle opal pearl ruby spruce thorn vase wool zinc
amber basil comet delta elder fjord glade haven inch jolly karma lumen melon north ocean petal
""".split())

DOCS_TOPIC_SEPARATOR = "\n\n"


@lru_cache(maxsize=1)
def docs_sections() -> tuple[tuple[str, str], ...]:
    """(title, text) of each pydoc topic, in sorted-key order; text includes the title line."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        text = topics[key].strip("\n")
        title = text.split("\n", 1)[0].strip()
        out.append((title, text))
    return tuple(out)


@lru_cache(maxsize=1)
def stdlib_sources() -> tuple[tuple[str, str], ...]:
    """(relative path, source) of the modules of STDLIB_FILES that exist in this Python."""
    stdlib = sysconfig.get_paths()["stdlib"]
    out = []
    for rel in STDLIB_FILES:
        path = os.path.join(stdlib, rel)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                out.append((rel, f.read()))
    if len(out) < 10:
        raise RuntimeError(f"only {len(out)} of the standard-library files were found under {stdlib}")
    return tuple(out)


def docs_corpus(order_seed: int | None = None) -> str:
    """All docs sections joined, in sorted order or shuffled by `order_seed`."""
    import random

    sections = [text for _, text in docs_sections()]
    if order_seed is not None:
        random.Random(order_seed).shuffle(sections)
    return DOCS_TOPIC_SEPARATOR.join(sections)


# ---------------------------------------------------------------------------------------------------
# procedural haystacks: generated from a seed, no outside text (the same on every Python version)
# ---------------------------------------------------------------------------------------------------
# Every generator draws its pieces one after the other from its own random.Random(seed), so a longer
# haystack of a seed starts with the shorter one (the task sizing relies on length growing with `n_chars`).
# None of them writes a number of more than 6 digits: the needles' 7-digit values cannot be mistaken.

STORY_NAMES = tuple("""
Mara Tobin Elise Rafael Ingrid Oskar Nadia Teodor Lucia Anselm Greta Milo Petra Joaquin Selma Bruno
Alma Cyrus Dagny Emil Flora Gideon Hanna Ivo Jonas Katya Leon Maren Nico Olga Pavel Rosa Silas Thea
Ugo Vera Wendel Yara Zeno Beatrix
""".split())
STORY_PLACES = tuple("""
harbour market bakery lighthouse library orchard station workshop chapel bridge mill courtyard
greenhouse tavern schoolhouse boathouse quarry vineyard observatory ferry-dock meadow-path
""".split())
STORY_THINGS = tuple("""
lantern letter map compass basket kettle shawl ledger telescope key parcel violin notebook umbrella
rope saddlebag clock photograph recipe candle-box
""".split())
STORY_MOODS = ("quietly", "briskly", "with a sigh", "cheerfully", "without a word", "slowly", "in a hurry", "carefully")
STORY_TIMES = ("In the morning", "Later that day", "Before noon", "At dusk", "By evening", "The next day",
               "Just after sunrise", "Around midday", "When the bells rang", "Some hours later")
STORY_WEATHER = ("rain drummed on the roofs", "the wind came in from the sea", "fog hid the hills",
                 "the sun warmed the stones", "snow fell in thin flakes", "the air smelled of salt",
                 "clouds gathered over the valley", "the streets were still wet")
STORY_SENTENCES = (
    "{time}, {a} walked {mood} to the {place}.",
    "{a} found a {thing} near the {place} and showed it to {b}.",
    "\"Have you seen the {thing}?\" {a} asked {b}.",
    "\"It must be at the {place},\" {b} answered.",
    "Outside, {weather}.",
    "{a} remembered the day the {place} had been painted blue.",
    "{b} wrote a short note about the {thing} and left it at the {place}.",
    "Nobody at the {place} could say where {a} had gone.",
    "{time}, {weather}, and {b} stayed by the window.",
    "{a} and {b} shared bread and cheese at the {place}.",
    "The {thing} had belonged to {a}'s grandmother.",
    "{b} laughed {mood} and handed the {thing} back.",
    "On the way to the {place}, {a} met {b}, who was carrying a {thing}.",
    "{a} counted the steps from the {place} to the {place2}: there were {small} of them.",
    "\"We will need the {thing} before winter,\" said {a}.",
    "{b} repaired the {thing} {mood}, as always.",
    "It took {small} minutes to walk from the {place} to the {place2}.",
    "{a} waited at the {place2} until {b} arrived.",
)


def story_text(seed: int, n_chars: int) -> str:
    """Narrative prose of ~n_chars characters: sentences from STORY_SENTENCES about a cast of six drawn
    from STORY_NAMES, in paragraphs of 4-7 sentences (a new scene every few paragraphs)."""
    import random

    r = random.Random(seed)
    cast = r.sample(STORY_NAMES, 6)
    paragraphs, total, last = [], 0, None
    while total < n_chars:
        sentences = []
        for _ in range(r.randint(4, 7)):
            a, b = r.sample(cast, 2)
            p1, p2 = r.sample(STORY_PLACES, 2)
            last = template = r.choice([t for t in STORY_SENTENCES if t != last])  # never one template twice in a row
            text = template.format(
                a=a, b=b, place=p1, place2=p2, thing=r.choice(STORY_THINGS), mood=r.choice(STORY_MOODS),
                time=r.choice(STORY_TIMES), weather=r.choice(STORY_WEATHER), small=r.randint(12, 400))
            sentences.append(text[0].upper() + text[1:])
        paragraphs.append(" ".join(sentences))
        total += len(paragraphs[-1]) + 2
    return "\n\n".join(paragraphs)


LOG_COMPONENTS = ("auth", "scheduler", "db-pool", "http", "cache", "billing", "mailer", "storage", "search",
                  "metrics", "gateway", "worker", "config", "backup", "queue")
LOG_MESSAGES = {
    "DEBUG": ("cache lookup key=session:{n4} hit={bool}", "pool stats active={n2} idle={n2} waiting={n1}",
              "parsed request headers in {n2} us", "retry budget left={n1} for job {n4}"),
    "INFO": ("user u{n4} logged in from 10.{n1}.{n2}.{n2}", "GET /api/v2/items/{n4} 200 {n3} ms",
             "POST /api/v2/orders 201 {n3} ms", "job {n4} finished in {n3} ms",
             "flushed {n3} rows to table events_{n2}", "connection opened to replica-{n1} ({n2} ms)",
             "scheduled backup of volume vol-{n3} at {hh}:{mm}", "sent {n2} emails from queue outbound",
             "rotated log file app.log.{n1} ({n5} bytes)", "reloaded {n2} feature flags"),
    "WARN": ("slow query on orders took {n4} ms", "retrying request to storage-{n1} (attempt {n1})",
             "disk usage at {n2}% on /var/data", "rate limit reached for client c{n4}"),
    "ERROR": ("timeout after {n4} ms calling billing-{n1}", "failed to parse payload of job {n4}: unexpected EOF",
              "connection reset by peer 10.{n1}.{n2}.{n2}:{n4}"),
}
LOG_LEVELS = (("DEBUG", 0.15), ("INFO", 0.7), ("WARN", 0.1), ("ERROR", 0.05))


def log_lines(seed: int, n_chars: int) -> list[str]:
    """Application log lines (~n_chars characters with their newlines): `YYYY-MM-DD HH:MM:SS.mmm LEVEL
    [component] message`, timestamps increasing from a seeded start, levels DEBUG/INFO/WARN/ERROR
    (15/70/10/5%), messages from LOG_MESSAGES with seeded numbers (at most 6 digits)."""
    import datetime
    import random

    r = random.Random(seed)
    t = datetime.datetime(2024, 1, 1) + datetime.timedelta(days=r.randrange(365), seconds=r.randrange(86400))
    lines, total = [], 0
    levels, weights = zip(*LOG_LEVELS)
    while total < n_chars:
        t += datetime.timedelta(milliseconds=r.randint(1, 4000))
        level = r.choices(levels, weights)[0]
        msg = r.choice(LOG_MESSAGES[level]).format(
            n1=r.randint(1, 9), n2=r.randint(10, 99), n3=r.randint(100, 999), n4=r.randint(1000, 9999),
            n5=r.randint(10000, 999999), bool=r.choice(("true", "false")), hh=f"{r.randrange(24):02d}",
            mm=f"{r.randrange(60):02d}")
        lines.append(f"{log_timestamp(t)} {level:<5} [{r.choice(LOG_COMPONENTS)}] {msg}")
        total += len(lines[-1]) + 1
    return lines


def log_timestamp(t) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S.") + f"{t.microsecond // 1000:03d}"


CSV_HEADER = "date,time,store,city,product,units,unit_price,total,customer,note"
CSV_STORES = ("north", "south", "harbour", "central", "airport", "old-town", "riverside", "campus")
CSV_CITIES = ("Lisbon", "Ghent", "Bergen", "Tartu", "Lyon", "Bilbao", "Graz", "Aarhus", "Turin", "Krakow")
CSV_PRODUCTS = (("notebook", 3.5), ("fountain pen", 24.0), ("desk lamp", 39.9), ("tea tin", 7.25), ("umbrella", 18.0),
                ("wool scarf", 29.5), ("coffee mug", 9.9), ("backpack", 54.0), ("bike light", 15.75),
                ("water bottle", 12.4), ("puzzle", 21.0), ("candle", 6.8))
CSV_NOTES = ("gift wrap", "paid by card", "returned next day", "loyalty discount", "delivered late", "phone order")


def csv_rows(seed: int, n_chars: int) -> list[str]:
    """Rows of a sales table in CSV (header CSV_HEADER, not included; ~n_chars characters with newlines):
    date and time increasing from a seeded start, store, city, product, units, unit price, total,
    customer (first name + initial), and a note that is empty on most rows."""
    import datetime
    import random

    r = random.Random(seed)
    t = datetime.datetime(2023, 1, 1) + datetime.timedelta(days=r.randrange(365), minutes=r.randrange(600))
    rows, total = [], 0
    while total < n_chars:
        t += datetime.timedelta(minutes=r.randint(1, 90))
        product, price = r.choice(CSV_PRODUCTS)
        units = r.randint(1, 12)
        note = r.choice(CSV_NOTES) if r.random() < 0.15 else ""
        customer = f"{r.choice(STORY_NAMES)} {r.choice('ABCDEFGHIJKLMNOPRSTVW')}."
        rows.append(csv_row(t, r.choice(CSV_STORES), r.choice(CSV_CITIES), product, units, price, customer, note))
        total += len(rows[-1]) + 1
    return rows


def csv_row(t, store, city, product, units, price, customer, note) -> str:
    quoted = f'"{note}"' if ("," in note or ":" in note) else note
    return (f"{t:%Y-%m-%d},{t:%H:%M},{store},{city},{product},{units},{price:.2f},{units * price:.2f},"
            f"{customer},{quoted}")
