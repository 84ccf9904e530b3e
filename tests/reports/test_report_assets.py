"""The pinned web assets the offline reports load are the files their pages ask for, with their licences."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import great_expectations.render.view as gx_view
import pytest

from components.validate import DATA_DOCS_CDN_FILES, REPORT_ASSETS, make_data_docs_offline

GX_TEMPLATES = Path(gx_view.__file__).parent / "templates"
GX_CDN_TAG = re.compile(r'<(?:script|link)\b[^>]*\b(?:src|href)="(https://[^"]+)"[^>]*>')
DVC_TEMPLATE = REPORT_ASSETS / "dvc_plots.html"


def gx_cdn_tags() -> list[tuple[str, str]]:
    """(URL, whole tag) of every script and stylesheet the installed GX's Data Docs templates load from the web."""
    return [
        (match.group(1), match.group(0))
        for template in sorted(GX_TEMPLATES.glob("*.j2"))
        for match in GX_CDN_TAG.finditer(template.read_text(encoding="utf-8"))
    ]


def test_every_script_and_stylesheet_gx_loads_from_a_cdn_has_a_pinned_copy() -> None:
    tags = gx_cdn_tags()
    assert len(tags) > 10  # the templates still name their CDN files this way
    unmapped = sorted({url for url, _ in tags if url not in DATA_DOCS_CDN_FILES})
    assert unmapped == [], "vendor these in common/report_assets and map them in DATA_DOCS_CDN_FILES"
    assert all((REPORT_ASSETS / name).is_file() for name in DATA_DOCS_CDN_FILES.values())


def test_pinned_copies_match_the_integrity_hashes_gx_names() -> None:
    pinned = {url: re.search(r'integrity="sha384-([^"]+)"', tag) for url, tag in gx_cdn_tags()}
    checked = 0
    for url, integrity in pinned.items():
        if integrity is None:
            continue
        digest = hashlib.sha384((REPORT_ASSETS / DATA_DOCS_CDN_FILES[url]).read_bytes()).digest()
        assert base64.b64encode(digest).decode() == integrity.group(1), url
        checked += 1
    assert checked == 2  # popper.js and bootstrap's script


def test_dvc_plots_template_loads_only_the_pinned_vega() -> None:
    template = DVC_TEMPLATE.read_text(encoding="utf-8")
    assert "{plot_divs}" in template
    assert "{scripts}" not in template  # DVC would put its CDN script tags there
    sources = re.findall(r'<script src="([^"]+)"', template)
    assert [Path(s).parts[1].split("@")[0] for s in sources] == ["vega", "vega-lite", "vega-embed"]
    assert all(s.startswith("vendor/") and (REPORT_ASSETS / s.removeprefix("vendor/")).is_file() for s in sources)
    assert "//" not in "".join(sources)


def test_every_pinned_package_ships_its_licence() -> None:
    packages = [folder for folder in sorted(REPORT_ASSETS.iterdir()) if folder.is_dir()]
    assert len(packages) == 10
    assert [p.name for p in packages if not list(p.glob("LICENSE*"))] == []


def test_a_page_that_still_loads_from_the_web_is_named(tmp_path: Path) -> None:
    page = tmp_path / "validations" / "new_suite.html"
    page.parent.mkdir(parents=True)
    page.write_text('<html><head><script src="https://cdn.example.org/new-widget.js"></script></head></html>')
    with pytest.raises(ValueError, match=r"validations/new_suite.html still loads https://cdn.example.org/new-widget"):
        make_data_docs_offline(tmp_path)


def test_offline_pages_point_at_the_copies_inside_the_site(tmp_path: Path) -> None:
    page = tmp_path / "validations" / "suite" / "run" / "page.html"
    page.parent.mkdir(parents=True)
    page.write_text(
        '<script src="https://code.jquery.com/jquery-3.7.1.min.js"></script>'
        '<script src="https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js" '
        'integrity="sha384-JjSmVgyd0p3pXB1rRibZUAYoIIy6OrQ6VrjIEaFf/nJGzIxFDsf4x0xIM+B07jRM" crossorigin="anonymous">'
        "</script>"
    )
    make_data_docs_offline(tmp_path)
    assert page.read_text() == (
        '<script src="../../../static/vendor/jquery@3.7.1/jquery.min.js"></script>'
        '<script src="../../../static/vendor/bootstrap@4.3.1/bootstrap.min.js"></script>'
    )
    assert (tmp_path / "static" / "vendor" / "jquery@3.7.1" / "jquery.min.js").is_file()
