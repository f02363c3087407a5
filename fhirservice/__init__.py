"""FHIR R4 data service: the Django project and the shared FHIR core."""
