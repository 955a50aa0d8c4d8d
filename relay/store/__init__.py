"""The store: accounts (sqlite + argon2id), Maildir delivery, mailbox index, quota ledger.

The interface is docs/architecture.md, "relay.store"; docs/store.md explains the design.
"""

from relay.store.accounts import Account
from relay.store.address import normalize_address
from relay.store.core import MailboxStats, Reservation, Store, StoreStats, Usage
from relay.store.delivery import Delivery
from relay.store.errors import (
    NoSuchMessage,
    AccountExists,
    AddressError,
    NoSuchAccount,
    QuotaExceeded,
    StorageFull,
    StoreError,
)
from relay.store.mailbox import Mailbox, MessageInfo

__all__ = ["Account", "AccountExists", "AddressError", "Delivery", "Mailbox", "MailboxStats", "MessageInfo",
           "NoSuchAccount", "NoSuchMessage", "QuotaExceeded", "Reservation", "StorageFull", "Store", "StoreError",
           "StoreStats", "Usage", "normalize_address"]
