"""The Group admin in a real browser: an operator's path from login to a verified roster.

Playwright drives Debian's headless Chromium (``/usr/bin/chromium``; never a downloaded
browser) against pytest-django's live server. The operator logs in, opens the Group list,
finds the Groups of a member, opens a 10,000-member Group, pages its roster, switches the
roster to an older version, and verifies it. Each step leaves a screenshot in
``$FHIR_TEST_ARTIFACTS/admin/`` (default ``test-artifacts/admin/``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fhirservice.store.handlers import WriteContext
from fhirservice.store.services import resource_create, resource_patch

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MEMBERS = 10_000
SHARED = "Patient/shared-1"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed"),
    pytest.mark.django_db(transaction=True),
]


@pytest.fixture
def artifacts() -> Path:
    """Where this test's screenshots go."""
    path = Path(os.environ.get("FHIR_TEST_ARTIFACTS") or "test-artifacts") / "admin"
    path.mkdir(parents=True, exist_ok=True)
    return path


def group_body(name: str, refs: list[str]) -> dict:
    """A Group with these members."""
    return {
        "resourceType": "Group",
        "type": "person",
        "actual": True,
        "name": name,
        "member": [{"entity": {"reference": ref}} for ref in refs],
    }


@pytest.fixture
def rosters() -> dict[str, str]:
    """A 10,000-member Group (then a second version by "ops-alice") and a small one.

    Both contain SHARED. Written through the store services, so the batches ship to
    ClickHouse on commit, as for API writes.
    """
    refs = [f"Patient/b{i:05d}" for i in range(MEMBERS - 1)] + [SHARED]
    context = WriteContext(actor="loader", source="rest")
    big = resource_create(
        resource_type="Group", body=group_body("Browser cohort", refs), context=context
    ).row.resource_id
    resource_patch(
        resource_type="Group",
        resource_id=big,
        ops=[
            {"op": "remove", "path": "/member", "value": {"entity": {"reference": refs[0]}}},
            {"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/a-new"}}},
        ],
        context=WriteContext(actor="ops-alice", source="operation"),
    )
    small = resource_create(
        resource_type="Group", body=group_body("Small panel", [SHARED]), context=context
    ).row.resource_id
    return {"big": big, "small": small, "first": refs[0]}


def test_an_operator_finds_pages_and_verifies_a_roster(
    live_server, admin_user, rosters, artifacts, monkeypatch
):
    from playwright.sync_api import expect, sync_playwright

    # Playwright's sync API runs an event loop in this thread; the ORM is not used here
    # any more (the live server runs in its own thread), so Django's guard can stand down.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1680, "height": 1050})
        page.set_default_timeout(30_000)
        try:
            page.goto(f"{live_server.url}/admin/login/?next=/admin/groups/groupresource/")
            page.fill("#id_username", admin_user.username)
            page.fill("#id_password", "password")
            page.click("input[type=submit]")
            expect(page.locator("#result_list")).to_be_visible()
            expect(page.locator("#result_list")).to_contain_text("Browser cohort")
            page.screenshot(path=artifacts / "01-group-list.png", full_page=True)

            page.fill("#searchbar", SHARED)
            page.press("#searchbar", "Enter")
            results = page.locator("#result_list tbody tr")
            expect(results).to_have_count(2)
            expect(page.locator("#result_list")).to_contain_text("Small panel")
            page.screenshot(path=artifacts / "02-groups-of-a-member.png", full_page=True)

            page.click(f"text={rosters['big']}")
            expect(page.locator("#group-quantity")).to_have_text(str(MEMBERS))
            rows = page.locator("#roster-table tbody tr")
            expect(rows).to_have_count(100)
            expect(rows.first).to_contain_text("Patient/a-new")
            expect(page.locator("#timeline-table")).to_contain_text("ops-alice")
            expect(page.locator("#history-table")).to_contain_text("1 removed")
            page.screenshot(path=artifacts / "03-group-page.png")
            page.locator("#timeline").screenshot(path=artifacts / "03b-member-timeline.png")
            page.locator("#history").screenshot(path=artifacts / "03c-version-history.png")

            last_of_first_page = rows.last.locator("td").first.inner_text()
            page.click("#roster-next")
            expect(rows).to_have_count(100)
            first_of_second_page = rows.first.locator("td").first.inner_text()
            assert first_of_second_page > last_of_first_page
            page.locator("#roster").screenshot(path=artifacts / "04-roster-page-2.png")

            page.select_option("#as-of", "1")
            page.click("#roster-show")
            expect(page.locator("#roster h2")).to_have_text("Roster as of version 1")
            expect(rows.first).to_contain_text(rosters["first"])
            page.locator("#roster").screenshot(path=artifacts / "05-roster-as-of-version-1.png")

            page.click("#verify-roster")
            expect(page.locator(".verify-result")).to_contain_text("Consistent")
            expect(page.locator(f"#report-{rosters['big']}")).to_contain_text(str(MEMBERS))
            page.screenshot(path=artifacts / "06-verify.png", full_page=True)
        finally:
            browser.close()
