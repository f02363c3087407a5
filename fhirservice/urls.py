"""URL routes: the admin, the OAuth2 token endpoint, and the FHIR API under BASE_PATH."""

from django.contrib import admin
from django.urls import include, path, re_path
from oauth2_provider import views as oauth2_views

from fhirservice.conf import fhir_settings
from fhirservice.rest.views import SystemView

urlpatterns = [
    path("admin/", admin.site.urls),
    # Client-credentials tokens (and their revocation); see fhirservice.access.
    path("oauth/token/", oauth2_views.TokenView.as_view(), name="oauth2_token"),
    path("oauth/revoke_token/", oauth2_views.RevokeTokenView.as_view(), name="oauth2_revoke"),
    re_path(rf"^{fhir_settings.BASE_PATH}/?$", SystemView.as_view()),
    path(f"{fhir_settings.BASE_PATH}/", include("fhirservice.rest.urls")),
]

handler404 = "fhirservice.rest.errors.not_found"
handler500 = "fhirservice.rest.errors.server_error"
