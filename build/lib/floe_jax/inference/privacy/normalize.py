"""Text normalisation before matching, with a map back to the original offsets.

An attacker (or a model) can write a private value so that it looks the same to a reader but not
to a pattern: a double space, a tab or a no-break space between the names, a zero-width space or a
soft hyphen inside a word, a Cyrillic `а` for a Latin `a`, fullwidth digits, an en-dash in a phone
number. `normalize` folds all of these to one canonical form, character by character, and keeps
for every output character the offset of the original character it came from, so a match on the
normalised text redacts exactly the right characters of the original:

1. invisible characters (Unicode category `Cf`: zero-width space and joiners, soft hyphen, BOM,
   word joiner, bidi controls) are dropped;
2. any run of whitespace (space, tab, newline, NBSP, thin and ideographic spaces...) becomes one
   space;
3. each other character is NFKD-decomposed (compatibility forms: fullwidth, superscripts,
   ligatures, math alphanumerics) and its combining marks are dropped (`É` -> `E`), which NFKC
   followed by accent stripping would also give;
4. letters of other scripts that render like Latin ones are mapped to them (`CONFUSABLES`);
5. dashes (category `Pd`) become `-`, typographic apostrophes become `'`;
6. the result is case-folded.

Why a table for confusables rather than Unicode's `confusables.txt` skeleton (UTS #39): the
skeleton maps in every direction and across digits and letters (`0`/`O`, `1`/`l`/`I`, `rn`/`m`),
which would make ordinary text collide with names and numbers; the guard needs only the one-way
map from non-Latin letters that are drawn like Latin letters (Cyrillic, Greek, Armenian, a few
Latin extensions) onto those letters.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import unicodedata

# Non-Latin letters drawn like a Latin letter (upper and lower case): Cyrillic, Greek, Armenian.
_LOOKALIKES = {
    # Cyrillic
    "a": "аӑӓα",
    "b": "Ьв",
    "c": "сϲ",
    "d": "ԁ",
    "e": "еёҽε",
    "h": "һ",
    "i": "іїɩι",
    "j": "ј",
    "k": "кκ",
    "m": "м",
    "n": "п",
    "o": "оοօ",
    "p": "рρ",
    "q": "ԛ",
    "s": "ѕ",
    "u": "υս",
    "v": "ѵν",
    "w": "ԝѡ",
    "x": "хχ",
    "y": "уү",
    "A": "АΑ",
    "B": "ВΒ",
    "C": "СϹ",
    "E": "ЕΕ",
    "H": "НΗ",
    "I": "ІΙӀ",
    "J": "Ј",
    "K": "КΚ",
    "M": "МΜ",
    "N": "Ν",
    "O": "ОΟՕ",
    "P": "РΡ",
    "S": "Ѕ",
    "T": "ТΤ",
    "X": "ХΧ",
    "Y": "УΥҮ",
    "Z": "Ζ",
    "l": "ӏ",
    "'": "\u2018\u2019\u02bc\u2032\u00b4`",
}
CONFUSABLES: dict[str, str] = {ch: latin for latin, chars in _LOOKALIKES.items() for ch in chars}
CONFUSABLES["ı"] = "i"  # dotless i


@functools.lru_cache(maxsize=4096)
def fold_char(ch: str) -> str:
    """The normalised form of one (visible, non-space) character: may be empty or several."""
    out = []
    for c in unicodedata.normalize("NFKD", ch):
        if unicodedata.combining(c):
            continue
        c = CONFUSABLES.get(c, c)
        if unicodedata.category(c) == "Pd":
            c = "-"
        out.append(c)
    return "".join(out).casefold()


def is_invisible(ch: str) -> bool:
    """Format characters (zero-width, soft hyphen, BOM, joiners, bidi controls)."""
    return unicodedata.category(ch) == "Cf"


@dataclasses.dataclass(frozen=True)
class Normalized:
    """A normalised text and, for each of its characters, the offset of the original character
    it came from (`origin[i]`); `origin[len(text)] == len(original)`."""

    text: str
    origin: tuple[int, ...]

    def span(self, start: int, end: int) -> tuple[int, int]:
        """Original `[start, end)` of the normalised `[start, end)` (end > start)."""
        return self.origin[start], self.origin[end - 1] + 1

    def at(self, start: int) -> int:
        """Original offset where normalised position `start` begins (or the original's end)."""
        return self.origin[start]


_ASCII_SPACES = re.compile(r"[^\S ]|  ")  # whitespace other than single spaces


@functools.lru_cache(maxsize=256)
def normalize(text: str) -> Normalized:
    """Normalises `text` (see the module docstring), keeping the map back to its offsets."""
    if text.isascii() and "`" not in text and not _ASCII_SPACES.search(text):
        return Normalized(text.lower(), tuple(range(len(text) + 1)))  # the common case, fast
    out: list[str] = []
    origin: list[int] = []
    for i, ch in enumerate(text):
        if ch.isspace():
            if not out or out[-1] != " ":
                out.append(" ")
                origin.append(i)
            continue
        if is_invisible(ch):
            continue
        for c in fold_char(ch):
            out.append(c)
            origin.append(i)
    origin.append(len(text))
    return Normalized("".join(out), tuple(origin))


def skeleton(text: str) -> str:
    """The letters and digits of the normalised text (for comparing values however written)."""
    return "".join(c for c in normalize(text).text if c.isalnum())
