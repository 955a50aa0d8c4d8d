-- relay store on PostgreSQL, schema version 1 (relay/store/postgresql/schema.py applies it
-- once, under an advisory lock, and records it in schema_version).

CREATE TABLE accounts (
    address        text PRIMARY KEY,            -- normalised (relay.store.address)
    domain         text NOT NULL,
    password_hash  text,                         -- argon2id (PHC string); NULL = receive only
    quota_bytes    bigint,                       -- NULL = the config default; 0 = unlimited
    quota_messages bigint,
    created        double precision NOT NULL,    -- Unix time
    uidvalidity    bigint NOT NULL,              -- RFC 9051 2.3.1.1
    uidnext        bigint NOT NULL DEFAULT 1,
    modseq         bigint NOT NULL DEFAULT 1,    -- bumped by every change of the mailbox
    usage_bytes    bigint NOT NULL DEFAULT 0,    -- the ledger: stored and not yet expunged
    usage_messages bigint NOT NULL DEFAULT 0,
    last_poll      double precision NOT NULL DEFAULT 0
);
CREATE INDEX accounts_domain ON accounts (domain);

-- UIDVALIDITY of a new mailbox (RFC 9051 2.3.1.1: a re-created name gets a greater one), for
-- every node: starts at the Unix time the schema was made, one more per account created.
CREATE SEQUENCE uidvalidity_seq;
SELECT setval('uidvalidity_seq', extract(epoch FROM now())::bigint);

-- Relay nodes using this database. A node is dead when the session it keeps open (its
-- LISTEN connection: pid + backend_start on the server started at server_started) is gone,
-- or when its heartbeat is stale (a node cut off by the network, a server restarted since):
-- the survivors' sweeper deletes its row, which drops its reservations and unsealed bodies.
CREATE TABLE nodes (
    id             text PRIMARY KEY,
    heartbeat      timestamptz NOT NULL DEFAULT now(),
    started        timestamptz NOT NULL DEFAULT now(),
    pid            integer,
    backend_start  timestamptz,
    server_started timestamptz
);

-- Message bodies (relay/store/postgresql/bodies.py): written in chunks before the commit,
-- complete = true in the commit's transaction. Shared by every recipient's message row.
CREATE TABLE bodies (
    id         bigserial PRIMARY KEY,
    node       text,                             -- the writer, while incomplete
    chunk_size integer NOT NULL,
    size       bigint NOT NULL DEFAULT 0,
    complete   boolean NOT NULL DEFAULT false,
    created    timestamptz NOT NULL DEFAULT now(),
    orphaned   timestamptz                       -- no message row left since then: deleted
                                                 -- after a grace period (readers finish)
);
CREATE INDEX bodies_incomplete ON bodies (node) WHERE NOT complete;
CREATE INDEX bodies_orphaned ON bodies (orphaned) WHERE orphaned IS NOT NULL;

CREATE TABLE body_chunks (
    body bigint NOT NULL REFERENCES bodies (id) ON DELETE CASCADE,
    seq  integer NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (body, seq)
);
-- Message bodies are mostly base64 of compressed images: pglz would spend CPU for nothing.
ALTER TABLE body_chunks ALTER COLUMN data SET STORAGE EXTERNAL;

CREATE TABLE messages (
    address      text NOT NULL REFERENCES accounts (address) ON DELETE CASCADE,
    uid          bigint NOT NULL,
    body         bigint NOT NULL REFERENCES bodies (id),
    size         bigint NOT NULL,
    internaldate double precision NOT NULL,
    flags        integer NOT NULL DEFAULT 0,     -- relay.store.api.Flag bits
    fetched      boolean NOT NULL DEFAULT false,
    ext_id       text,                           -- MessageInfo.id when imported (POP3 UIDL kept);
                                                 -- NULL: "<uidvalidity>.<uid>"
    PRIMARY KEY (address, uid)
);
CREATE INDEX messages_body ON messages (body);

-- Quota held for deliveries in flight, by the node that streams them.
CREATE TABLE reservations (
    id       bigserial PRIMARY KEY,
    node     text NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    address  text NOT NULL REFERENCES accounts (address) ON DELETE CASCADE,
    nbytes   bigint NOT NULL,
    streamed bigint NOT NULL DEFAULT 0
);
CREATE INDEX reservations_address ON reservations (address);
