"""URL routes: the admin, the OAuth2 token endpoint, SMART discovery, health and metrics, and
the FHIR API under BASE_PATH."""

from django.contrib import admin
from django.urls import include, path, re_path

from fhirservice import health, metrics
from fhirservice.access import oauth
from fhirservice.access.smart import REVOKE_PATH, TOKEN_PATH, smart_configuration
from fhirservice.conf import fhir_settings
from fhirservice.rest.views import SystemView

urlpatterns = [
    # The FHIR API first: Django tries the patterns in order on every request, and nearly
    # every request is a FHIR one. SMART discovery below the base and the base itself come
    # before the base's catch-all (the unknown-route answer).
    path(f"{fhir_settings.BASE_PATH}/.well-known/smart-configuration", smart_configuration),
    re_path(rf"^{fhir_settings.BASE_PATH}/?$", SystemView.as_view()),
    path(f"{fhir_settings.BASE_PATH}/", include("fhirservice.rest.urls")),
    path("admin/", admin.site.urls),
    # Client-credentials tokens (and their revocation), failed client authentications
    # throttled; see fhirservice.access.oauth.
    path(TOKEN_PATH, oauth.TokenView.as_view(), name="oauth2_token"),
    path(REVOKE_PATH, oauth.RevokeTokenView.as_view(), name="oauth2_revoke"),
    # SMART App Launch discovery (public) at the site root, as below the FHIR base.
    path(".well-known/smart-configuration", smart_configuration),
    # Operability (unauthenticated, cheap): liveness, readiness, Prometheus metrics.
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics.metrics_view, name="metrics"),
]

handler400 = "fhirservice.rest.errors.bad_request"
handler404 = "fhirservice.rest.errors.not_found"
handler500 = "fhirservice.rest.errors.server_error"
