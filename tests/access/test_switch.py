"""FHIR_AUTH: parsed from the environment, validated, and what "off" means."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from fhirservice.conf import fhir_settings
from fhirservice.models import ResourceVersion
from fhirservice.settings import _on_off
from tests.access.conftest import TokenClient


def test_on_off_parsing() -> None:
    assert (_on_off("on"), _on_off("OFF"), _on_off(None)) == (True, False, None)
    assert _on_off("maybe") == "maybe"  # left for conf's validation to refuse


def test_a_bad_value_refuses_to_start() -> None:
    with override_settings(FHIR_SERVICE={"AUTH": "maybe"}):
        with pytest.raises(ImproperlyConfigured, match="FHIR_SERVICE\\['AUTH'\\] has a bad value"):
            fhir_settings.AUTH  # noqa: B018


@pytest.mark.parametrize(("value", "expected"), [(None, "True"), ("off", "False"), ("on", "True")])
def test_the_environment_switches_it_and_on_is_the_default(value, expected) -> None:
    # tests/conftest.py switches the default off for the rest of the suite: ask a fresh process.
    env = {k: v for k, v in os.environ.items() if k != "FHIR_AUTH"}
    if value is not None:
        env["FHIR_AUTH"] = value
    code = "from fhirservice.conf import fhir_settings; print(fhir_settings.AUTH)"
    out = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.stdout.strip().splitlines()[-1] == expected


def test_off_serves_everyone_unrestricted(settings, db: None) -> None:
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "AUTH": False}
    anonymous = TokenClient(None)
    created = anonymous.post("/Patient", {"resourceType": "Patient"})
    assert created.status == 201
    assert "security" not in created.body["meta"]
    assert anonymous.get(f"/Patient/{created.body['id']}").status == 200
    version = ResourceVersion.objects.get(key=f"Patient/{created.body['id']}/_history/1")
    assert (version.actor, version.organization) == ("", "")
    assert anonymous.get("/AuditEvent").status == 200
