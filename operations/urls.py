"""Routes of $operations: ``[base]/$op``, ``[base]/[type]/$op``, ``[base]/[type]/[id]/$op``.

``Group/[id]/$members`` (the paged roster) is the groups app's own view; built-in
OperationDefinitions are served before the generic store sees the id.
"""

from django.urls import re_path

from groups.views import GroupMembersView
from operations.views import OperationDefinitionView, OperationView

CODE = r"\$(?P<code>[a-z][a-z0-9\-]*)"
TYPE = r"(?P<resource_type>[A-Z][A-Za-z]+)"
# Not "_history" and friends: ``OperationDefinition/_history`` is the generic type history.
ID = r"(?P<resource_id>[^/$_][^/]*)"

urlpatterns = [
    re_path(rf"^Group/{ID}/\$members$", GroupMembersView.as_view()),
    re_path(rf"^OperationDefinition/{ID}$", OperationDefinitionView.as_view()),
    re_path(rf"^{CODE}$", OperationView.as_view()),
    re_path(rf"^{TYPE}/{CODE}$", OperationView.as_view()),
    re_path(rf"^{TYPE}/{ID}/{CODE}$", OperationView.as_view()),
]
