"""The member event outbox (ADR 0004): a write's member events commit with its Group version
in the metadata store and reach ClickHouse after commit.

- ``record``: store a version's events as outbox rows, inside its transaction;
- ``background``: after commit, ship in the request or hand over to a thread per process;
  each server process's relay for what is left behind;
- ``ship``: insert batches into ClickHouse, mark them shipped, the relay's round, the
  quantities of versions written blind;
- ``pending``: the states of batches not shipped yet, which roster reads merge, and the
  backlog (metrics, readiness, the relay command).

The rows themselves are ``groups.models.MemberOutbox``.
"""
