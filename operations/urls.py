"""Routes of $operations: ``[base]/$op``, ``[base]/[type]/$op``, ``[base]/[type]/[id]/$op``.

The groups app contributes the roster read ``Group/[id]/$members``.
"""

from django.urls import re_path

from groups.views import GroupMembersView

urlpatterns = [
    re_path(r"^Group/(?P<resource_id>[^/$][^/]*)/\$members$", GroupMembersView.as_view()),
]
