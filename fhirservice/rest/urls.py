"""FHIR routes below the base. $operation routes and the built-in OperationDefinitions come
first (both served from the plug-in registry, ``fhirservice.plugins``), then the REST
interactions."""

from django.urls import re_path

from fhirservice.access.audit import AuditEventInstanceView, AuditEventView
from fhirservice.rest import operations, views

TYPE = r"(?P<resource_type>[A-Z][A-Za-z]+)"
ID = r"(?P<resource_id>[^/$][^/]*)"
CODE = r"\$(?P<code>[a-z][a-z0-9\-]*)"
# Ids not starting with "_": ``OperationDefinition/_history`` is the generic type history.
PLAIN_ID = r"(?P<resource_id>[^/$_][^/]*)"

urlpatterns = [
    re_path(r"^metadata$", views.MetadataView.as_view()),
    re_path(r"^_history$", views.HistoryView.as_view()),
    re_path(
        r"^(?P<resource_type>OperationDefinition)$",
        operations.OperationDefinitionSearchView.as_view(),
    ),
    re_path(rf"^OperationDefinition/{PLAIN_ID}$", operations.OperationDefinitionView.as_view()),
    re_path(rf"^{CODE}$", operations.operation_route),
    re_path(rf"^{TYPE}/{CODE}$", operations.operation_route),
    re_path(rf"^{TYPE}/{PLAIN_ID}/{CODE}$", operations.operation_route),
    re_path(r"^AuditEvent$", AuditEventView.as_view()),
    re_path(r"^AuditEvent/(?P<resource_id>[^/$_][^/]*)$", AuditEventInstanceView.as_view()),
    re_path(rf"^{TYPE}$", views.TypeView.as_view()),
    re_path(rf"^{TYPE}/_search$", views.TypeSearchView.as_view()),
    re_path(rf"^{TYPE}/_history$", views.HistoryView.as_view()),
    re_path(rf"^{TYPE}/{ID}$", views.InstanceView.as_view()),
    re_path(rf"^{TYPE}/{ID}/_history$", views.HistoryView.as_view()),
    re_path(rf"^{TYPE}/{ID}/_history/(?P<version_id>[^/]+)$", views.VersionView.as_view()),
    re_path(r"^.*$", views.UnknownRouteView.as_view()),
]
