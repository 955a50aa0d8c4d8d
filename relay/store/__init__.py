"""The store: accounts (sqlite + argon2id), Maildir delivery, mailbox index, quota ledger.

The interface is docs/architecture.md, "relay.store"; docs/store.md explains the design.
"""

from relay.store.accounts import Account
from relay.store.address import normalize_address
from relay.store.core import Reservation, Store, Usage
from relay.store.delivery import Delivery
from relay.store.errors import (
           AccountExists,
           AddressError,
           NoSuchAccount,
           QuotaExceeded,
           StoreError,
)

__all__ = ["Account", "AccountExists", "AddressError", "Delivery", "NoSuchAccount", "QuotaExceeded",
           "Reservation", "Store", "StoreError", "Usage", "normalize_address"]
