"""The admin as ``make run`` serves it: gunicorn started by ``scripts/serve.sh``.

Everything runs as a user would run it, in processes of its own: ``manage.py migrate`` and
``migrate_clickhouse`` (what ``make migrate`` runs), ``createsuperuser``, then
``scripts/serve.sh`` (collectstatic, then gunicorn) on the embedded defaults (SQLite + chdb)
in a temporary directory, with access control off as ``make run`` has it. Groups are written
over HTTP. Debian's headless Chromium then checks that Django's admin stylesheet is applied
(computed styles, not only a 200), that the Group list fits a 1400 px wide window, and
leaves screenshots in ``$FHIR_TEST_ARTIFACTS/admin-served/``.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.browser.test_admin_browser import CHROMIUM, CHROMIUM_ARGS
from tests.served import serve

USERNAME = "ops"
PASSWORD = "served-admin-password"  # noqa: S105 (a throwaway account of a throwaway server)
EMAIL = "ops@example.org"
# Django's admin header colour (--header-bg, base.css): only there when the CSS loaded.
HEADER_BG = "rgb(65, 118, 144)"
# Group ids as clients choose them (PUT): long enough that a careless column wraps them.
LONG_IDS = [f"cohort-2026-north-region-oncology-screening-{n:04d}" for n in range(3)]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed"),
]


@dataclass
class Served:
    """A running ``make run`` server and what was written to it."""

    url: str
    group_ids: list[str]


def _request(method: str, url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/fhir+json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 (loopback)
        text = response.read()
    return json.loads(text) if text else {}


def _group(name: str, refs: list[str]) -> dict:
    return {
        "resourceType": "Group",
        "type": "person",
        "actual": True,
        "name": name,
        "member": [{"entity": {"reference": ref}} for ref in refs],
    }


def _write_groups(url: str) -> list[str]:
    """Groups with long ids, one of them renamed (two versions) to view as of version 1."""
    base = f"{url}/4_0_0/Group"
    for n, gid in enumerate(LONG_IDS):
        refs = [f"Patient/served-{n}-{i:03d}" for i in range(120)]
        body = _group(f"North region oncology screening cohort {n}", refs)
        _request("PUT", f"{base}/{gid}", {**body, "id": gid})
    renamed = {"op": "replace", "path": "/name", "value": "Renamed cohort"}
    request = urllib.request.Request(
        f"{base}/{LONG_IDS[0]}",
        data=json.dumps([renamed]).encode(),
        method="PATCH",
        headers={"Content-Type": "application/json-patch+json"},
    )
    with urllib.request.urlopen(request, timeout=30):  # noqa: S310 (loopback)
        pass
    return LONG_IDS


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``make run`` in a temporary directory: migrate, a superuser, serve.sh, some Groups."""
    superuser = ("createsuperuser", "--noinput", "--username", USERNAME, "--email", EMAIL)
    with serve(
        tmp_path_factory.mktemp("served"),
        setup=[superuser],
        DJANGO_SUPERUSER_PASSWORD=PASSWORD,
    ) as server:
        yield Served(server.root, _write_groups(server.root))


@pytest.fixture
def artifacts() -> Path:
    """Where this module's screenshots go."""
    path = Path(os.environ.get("FHIR_TEST_ARTIFACTS") or "test-artifacts") / "admin-served"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def browser_page(served: Served) -> Iterator:
    """A logged-in admin page in headless Chromium, 1400 px wide."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(30_000)
        try:
            page.goto(f"{served.url}/admin/login/?next=/admin/")
            page.fill("#id_username", USERNAME)
            page.fill("#id_password", PASSWORD)
            page.click("input[type=submit]")
            expect(page.locator("#content")).to_contain_text("Site administration")
            yield page
        finally:
            browser.close()


def _computed(page, selector: str, prop: str) -> str:
    return page.evaluate(
        "([s, p]) => getComputedStyle(document.querySelector(s)).getPropertyValue(p)",
        [selector, prop],
    )


def test_the_admin_is_styled_when_served_by_gunicorn(served, browser_page, artifacts):
    page = browser_page
    css = page.request.get(f"{served.url}/static/admin/css/base.css")
    assert css.status == 200 and css.headers["content-type"].startswith("text/css")
    assert _computed(page, "#header", "background-color") == HEADER_BG
    # Without base.css the admin falls back to the browser's serif font and default margins.
    assert "serif" != _computed(page, "body", "font-family").split(",")[-1].strip()
    assert _computed(page, "body", "margin-top") == "0px"
    page.screenshot(path=artifacts / "01-index.png", full_page=True)


def test_the_group_list_fits_1400_pixels(served, browser_page, artifacts):
    page = browser_page
    page.goto(f"{served.url}/admin/groups/groupresource/")
    links = page.locator("#result_list th.field-group_id a")
    assert sorted(links.all_inner_texts()) == sorted(served.group_ids)
    # An inline element that wraps has one client rectangle per line.
    lines = links.evaluate_all("links => links.map(a => a.getClientRects().length)")
    assert lines == [1] * len(served.group_ids), "ids wrap"
    overflow = page.evaluate(
        "() => { const t = document.querySelector('#result_list');"
        " const box = t.closest('.results') || t.parentElement;"
        " return [t.getBoundingClientRect().right, box.getBoundingClientRect().right,"
        " document.documentElement.scrollWidth, window.innerWidth]; }"
    )
    table_right, box_right, page_width, window_width = overflow
    assert table_right <= box_right + 1, "the table is cut off by its container"
    assert page_width <= window_width, "the page scrolls sideways"
    page.screenshot(path=artifacts / "02-group-list-1400px.png", full_page=True)


def test_a_group_page_as_of_an_older_version(served, browser_page, artifacts):
    page = browser_page
    gid = served.group_ids[0]
    page.goto(f"{served.url}/admin/groups/groupresource/")
    page.click(f"text={gid}")
    assert "Renamed cohort" in page.locator("#resource").inner_text()
    page.screenshot(path=artifacts / "03-group-page.png", full_page=True)
    page.select_option("#as-of", "1")
    page.click("#roster-show")
    resource = page.locator("#resource").inner_text()
    assert "North region oncology screening cohort 0" in resource
    assert "Renamed cohort" not in resource
    assert page.locator("#group-version").inner_text().startswith("1")
    page.screenshot(path=artifacts / "04-group-page-as-of-version-1.png", full_page=True)
