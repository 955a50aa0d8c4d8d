"""The store on PostgreSQL (issue 14): accounts, the mailbox index, the quota ledger with
in-flight reservations, the change feed (LISTEN/NOTIFY) and message bodies, shared by any
number of relay nodes. docs/cluster.md explains the design and its operation.

    store.py     PgStore: relay.store.api.MessageStore
    bodies.py    BodyStore (the seam for an object store) and PgBodyStore (bytea chunks)
    schema.py    versioned migrations (migrations/NNNN_*.sql, package data)
    importer.py  copy a store into PostgreSQL (`relay store migrate`), cli.py its command

Nothing is imported here: `relay` commands that do not use PostgreSQL do not load its driver.
"""
