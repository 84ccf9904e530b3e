from __future__ import annotations

from recommender.brands import BrandExtractor

MULTI = ["Western Digital", "Cooler Master", "be quiet!", "Lian Li", "SK Hynix"]


def test_multi_word_brands_are_matched_case_insensitively_and_spelled_as_listed() -> None:
    brands = BrandExtractor(MULTI)
    assert brands.brand("Western Digital Blue SN580") == "Western Digital"
    assert brands.brand("COOLER MASTER MasterBox Q300L") == "Cooler Master"
    assert brands.brand("be quiet! Pure Base 500DX") == "be quiet!"
    assert brands.brand("SK hynix Platinum P41") == "SK Hynix"


def test_other_brands_are_the_first_word_including_dotted_names() -> None:
    brands = BrandExtractor(MULTI)
    assert brands.brand("G.Skill Flare X5 32 GB") == "G.Skill"
    assert brands.brand("Logitech G305 LIGHTSPEED") == "Logitech"
    assert brands.brand("Lian") == "Lian"  # a word that only starts a multi-word brand is not that brand
    assert brands.brand("Western Electric Thing") == "Western"


def test_invisible_characters_and_case_variants_become_one_brand() -> None:
    brands = BrandExtractor.fitted(MULTI, ["Sharkoon A", "Sharkoon B", "SHARKOON C", "\u200eFFF Mouse"])
    assert brands.brand("SHARKOON Elite Shark") == "Sharkoon"
    assert brands.brand("\u200eFFF Mouse") == "FFF"
