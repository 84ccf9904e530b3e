"""Brand from a product name: a known multi-word brand at the start, else the first word."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

# Invisible characters that some catalog names start with (left-to-right marks, zero-width spaces).
_INVISIBLE = re.compile(r"[\u200b-\u200f\u202a-\u202e\u2060\ufeff]")


def clean_name(name: str) -> str:
    return " ".join(_INVISIBLE.sub("", name).split())


class BrandExtractor:
    """Extracts a canonical brand spelling from product names.

    Multi-word brands ("Western Digital", "be quiet!") are matched case-insensitively at the start
    of the name, longest first; any other brand is the first word. `canonical` maps a lower-cased
    brand to one spelling (the most common in the catalog), so "SHARKOON" and "Sharkoon" are one brand.
    """

    def __init__(self, multi_word_brands: Iterable[str], canonical: dict[str, str] | None = None):
        self.multi_word = sorted((clean_name(b) for b in multi_word_brands), key=len, reverse=True)
        self.canonical = dict(canonical or {})

    def raw_brand(self, name: str) -> str:
        name = clean_name(name)
        lowered = name.lower()
        for brand in self.multi_word:
            key = brand.lower()
            if lowered.startswith(key) and (len(lowered) == len(key) or lowered[len(key)] == " "):
                return brand
        return name.split(" ", 1)[0] if name else ""

    def brand(self, name: str) -> str:
        raw = self.raw_brand(name)
        return self.canonical.get(raw.lower(), raw)

    @classmethod
    def fitted(cls, multi_word_brands: Iterable[str], names: Iterable[str]) -> BrandExtractor:
        """An extractor whose canonical spelling of each brand is the one most names use."""
        extractor = cls(multi_word_brands)
        spellings: dict[str, Counter[str]] = {}
        for name in names:
            raw = extractor.raw_brand(name)
            spellings.setdefault(raw.lower(), Counter())[raw] += 1
        for brand in extractor.multi_word:  # a listed multi-word brand keeps the params spelling
            spellings[brand.lower()] = Counter({brand: 1})
        extractor.canonical = {key: counts.most_common(1)[0][0] for key, counts in spellings.items()}
        return extractor
