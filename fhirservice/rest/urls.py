"""FHIR routes below the base. $operation routes come first, then the REST interactions."""

from django.urls import include, re_path

from fhirservice.access.audit import AuditEventInstanceView, AuditEventView
from fhirservice.rest import views

TYPE = r"(?P<resource_type>[A-Z][A-Za-z]+)"
ID = r"(?P<resource_id>[^/$][^/]*)"

urlpatterns = [
    re_path(r"^metadata$", views.MetadataView.as_view()),
    re_path(r"^_history$", views.HistoryView.as_view()),
    re_path(r"", include("operations.urls")),
    re_path(r"^AuditEvent$", AuditEventView.as_view()),
    re_path(r"^AuditEvent/(?P<resource_id>[^/$_][^/]*)$", AuditEventInstanceView.as_view()),
    re_path(rf"^{TYPE}$", views.TypeView.as_view()),
    re_path(rf"^{TYPE}/_history$", views.HistoryView.as_view()),
    re_path(rf"^{TYPE}/{ID}$", views.InstanceView.as_view()),
    re_path(rf"^{TYPE}/{ID}/_history$", views.HistoryView.as_view()),
    re_path(rf"^{TYPE}/{ID}/_history/(?P<version_id>[^/]+)$", views.VersionView.as_view()),
    re_path(r"^.*$", views.UnknownRouteView.as_view()),
]
