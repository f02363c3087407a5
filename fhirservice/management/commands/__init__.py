"""``manage.py`` commands of the shared FHIR core."""
