"""The Maildir + sqlite backend (the embedded default): `MaildirStore` implements
relay.store.api on top of the synchronous engine (`Store`: accounts, index, ledger, Maildirs),
which the admin tools (relay/store/maildir/admin.py, `relay user`, `relay quota`) use directly.
"""

from relay.store.maildir.core import Store
from relay.store.maildir.delivery import Delivery
from relay.store.maildir.ledger import Held, MaildirLedger
from relay.store.maildir.mailbox import Mailbox, MessageInfo

__all__ = ["Delivery", "Held", "MaildirLedger", "Mailbox", "MessageInfo", "Store"]
