"""Django's PostgreSQL backend with a connection health check that costs no round trip
(``fhirservice.pgbackend.base``); settings select it for every ``postgres://`` URL."""
