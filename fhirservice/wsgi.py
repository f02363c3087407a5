"""WSGI entry point (gunicorn fhirservice.wsgi:application)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fhirservice.settings")
application = get_wsgi_application()

# Before gunicorn hands this worker a request: open ClickHouse, build roster digests.
from fhirservice.serving import warm_up  # noqa: E402 - needs the apps loaded above

warm_up()
