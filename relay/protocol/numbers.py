"""Numbers on the wire: ASCII digits only, with a bounded length.

`str.isdigit()` is true for "²" and other Unicode digits that `int()` refuses (ValueError) or
reads as a different number ("١٢" is 12), and `int()` of more than 4300 digits raises
(`sys.get_int_max_str_digits`). Every protocol number goes through `ascii_number` with the
bound its RFC gives, so a hostile number is a syntax error with a reply, never an exception.
"""

from __future__ import annotations


def ascii_number(text: str, max_digits: int) -> int | None:
    """The value of `text` when it is 1 to `max_digits` ASCII digits, else None."""
    if not text or len(text) > max_digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)
