"""Real text that ships with every CPython: nothing is downloaded.

- `docs_sections()`: the language-reference topics of `pydoc_data.topics` (what `help("assert")` prints;
  ~700 KB of English prose with grammar rules and examples), as (title, body) sections in a fixed order.
- `stdlib_sources()`: the source of a fixed list of standard-library modules (real Python code).
- `WORDS`: a fixed list of common English words (keys of the needle tasks, the common-word task).

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
