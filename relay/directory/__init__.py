"""The participant directory: participants and their OpenPGP keys, the signed directory
document, its e-mail commands, pushes, and its HTTP/WKD pages. Format: docs/directory.md.

The gateway needs only `verify_document` and `DirectoryError`. Names are imported on first
use, so that `relay --help` does not pay for pgpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from relay.directory.errors import DirectoryError

if TYPE_CHECKING:
    from relay.directory.document import verify_document
    from relay.directory.service import DirectoryService

__all__ = ["DirectoryError", "DirectoryService", "verify_document"]


def __getattr__(name: str) -> Any:
    if name == "verify_document":
        from relay.directory.document import verify_document
        return verify_document
    if name == "DirectoryService":          # the server side, imported only by the server
        from relay.directory.service import DirectoryService
        return DirectoryService
    raise AttributeError(name)
