"""Poison messages shared by the hostile-input and poison end-to-end tests."""

from __future__ import annotations


def nested_rfc822(depth: int, numbered: bool = False) -> bytes:
    """`depth` message/rfc822 parts, one inside the other (comments numbered on request)."""
    m = b"From: leaf@x.test\r\nSubject: leaf\r\n\r\nleaf\r\n"
    for i in range(depth):
        comment = b"(c%d)" % i if numbered else b"(c)"
        m = b"From: " + comment + b" a@b.test\r\nContent-Type: message/rfc822\r\n\r\n" + m
    return m


def nested_multipart(depth: int) -> bytes:
    m = b"leaf\r\n"
    for i in range(depth):
        b = b"b%d" % i
        m = (b"Content-Type: multipart/mixed; boundary=" + b + b"\r\n\r\n--" + b + b"\r\n" + m
             + b"\r\n--" + b + b"--\r\n")
    return m
