"""URL routes: the admin, and the FHIR API under BASE_PATH (default ``4_0_0``)."""

from django.contrib import admin
from django.urls import include, path, re_path

from fhirservice.conf import fhir_settings
from fhirservice.rest.views import SystemView

urlpatterns = [
    path("admin/", admin.site.urls),
    re_path(rf"^{fhir_settings.BASE_PATH}/?$", SystemView.as_view()),
    path(f"{fhir_settings.BASE_PATH}/", include("fhirservice.rest.urls")),
]

handler404 = "fhirservice.rest.errors.not_found"
handler500 = "fhirservice.rest.errors.server_error"
