"""Routes of $operations: ``[base]/$op``, ``[base]/[type]/$op``, ``[base]/[type]/[id]/$op``."""

urlpatterns: list = []
