"""Gateway building blocks without a relay: DICOM MIME, PGP/MIME, message/partial, MDN.

Keys are generated at test time (gpg --quick-gen-key in temporary GNUPGHOMEs)."""

from __future__ import annotations

import email
import email.policy
import io
import random
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from relay.gateway import dicommime as dm
from relay.gateway import message as M
from relay.gateway.mime import (
    Base64Decoder,
    Base64Encoder,
    MimeError,
    MultipartReader,
    copy_crlf,
)
from relay.gateway.pgp import Keyring, generate_key
from relay.gateway.synthetic import synthetic_study


def _feed_in_random_pieces(feed: object, data: bytes, rnd: random.Random, most: int) -> bytes:
    assert callable(feed)
    out = b""
    pos = 0
    while pos < len(data):
        n = rnd.randint(1, most)
        out += feed(data[pos:pos + n])
        pos += n
    return out


def test_base64_blocks_roundtrip_any_chunking() -> None:
    rnd = random.Random(7)
    data = rnd.randbytes(200_003)
    enc = Base64Encoder()
    out = _feed_in_random_pieces(enc.feed, data, rnd, 5000) + enc.finish()
    lines = out.split(b"\r\n")
    assert lines[-1] == b"" and all(len(x) <= 76 for x in lines)
    assert b"\n" not in out.replace(b"\r\n", b"")
    dec = Base64Decoder()
    back = _feed_in_random_pieces(dec.feed, out, rnd, 999)
    dec.finish()
    assert back == data


def test_base64_decoder_ignores_stray_characters_and_stops_at_padding() -> None:
    dec = Base64Decoder()
    assert dec.feed(b"aGVs!bG8g\r\nd2\t9y bGQ=\r\n") == b"hello world"
    dec.finish()
    dec = Base64Decoder()        # RFC 2045 6.8: "=" marks the end of the data
    assert dec.feed(b"aGVsbG8=\r\nIHdvcmxk\r\n") == b"hello"


def test_copy_crlf_normalises_across_blocks() -> None:
    src = io.BytesIO(b"a\nb\r\nc\r" + b"\n" + b"d\n" * 10)
    dst = io.BytesIO()
    copy_crlf(src, dst)
    assert dst.getvalue() == b"a\r\nb\r\nc\r\n" + b"d\r\n" * 10


def test_multipart_reader_finds_parts_across_block_edges(monkeypatch: pytest.MonkeyPatch) -> None:
    from relay.gateway import mime
    monkeypatch.setattr(mime, "BLOCK", 7)      # delimiters straddle every read
    body = (b"preamble\r\n--XYZ\r\nContent-Type: text/plain\r\n\r\nhello\r\n--XYZ\r\n"
            b"Content-Type: application/dicom\r\n\r\n" + b"w" * 50 + b"\r\n--XYZ--\r\nepilogue")
    parts = [(h.get_content_type(), b"".join(c)) for h, c in MultipartReader(io.BytesIO(body), "XYZ").parts()]
    assert parts == [("text/plain", b"hello"), ("application/dicom", b"w" * 50)]


def test_multipart_without_close_delimiter_is_an_error() -> None:
    body = b"--XYZ\r\nContent-Type: text/plain\r\n\r\nhello"
    with pytest.raises(MimeError):
        for _h, chunks in MultipartReader(io.BytesIO(body), "XYZ").parts():
            b"".join(chunks)


def test_study_mime_is_rfc3240_and_byte_exact(tmp_path: Path) -> None:
    files = synthetic_study(tmp_path / "in", n=3) + [Path(get_testdata_file("CT_small.dcm"))]
    studies = dm.group_studies(files)
    assert sorted(len(v) for v in studies.values()) == [1, 3]
    insts = max(studies.values(), key=len)
    size = dm.write_study(insts, tmp_path / "study.mime")
    raw = (tmp_path / "study.mime").read_bytes()
    assert len(raw) == size and b"\n" not in raw.replace(b"\r\n", b"")
    parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert parsed.get_content_type() == "multipart/mixed"
    for n, (part, inst) in enumerate(zip(parsed.get_payload(), insts, strict=True), 1):
        assert part.get_content_type() == "application/dicom"
        assert part.get_param("id") == f"IM{n:06d}"
        assert part.get_param("name") == inst.path.name
        assert part.get_param("filename", header="content-disposition") == inst.path.name
        assert part.get_payload(decode=True) == inst.path.read_bytes()
    out = dm.extract_study(tmp_path / "study.mime", tmp_path / "out")
    assert [e.path.read_bytes() for e in out] == [i.path.read_bytes() for i in insts]
    assert {e.instance.study_uid for e in out} == {insts[0].study_uid}


def test_non_dicom_input_and_parts_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_bytes(b"not dicom at all" * 20)
    with pytest.raises(dm.NotDicom):
        dm.group_studies([bad])
    mime = tmp_path / "m"
    mime.write_bytes(b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
                     b"Content-Type: application/dicom\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                     b"bm90IGRpY29t\r\n--b--\r\n")
    with pytest.raises(dm.NotDicom):
        dm.extract_study(mime, tmp_path / "o")


@pytest.fixture(scope="module")
def two_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    base = tmp_path_factory.mktemp("keys")
    return {n: generate_key(base / n, f"{n} <{n}@example.test>") for n in ("a", "b", "c")}


def _ring(tmp: Path, name: str, keys: dict[str, tuple[str, str]], *peers: str, home: str = "") -> Keyring:
    sec = tmp / f"{name}.sec.asc"
    sec.write_text(keys[name][0])       # test fixture key, generated above
    ring = Keyring(tmp / f"gnupg-{home or name}", sec)
    for p in peers:
        ring.import_public(keys[p][1])
    return ring


def test_pgp_mime_split_reassemble_decrypt(tmp_path: Path, two_keys: dict[str, tuple[str, str]]) -> None:
    a = _ring(tmp_path, "a", two_keys, "b")
    b = _ring(tmp_path, "b", two_keys, "a")
    c = _ring(tmp_path, "b", two_keys, home="b2")   # b's key without a's: a's signature is unknown
    try:
        insts = next(iter(dm.group_studies(synthetic_study(tmp_path / "in", n=2, rows=128, cols=128)).values()))
        dm.write_study(insts, tmp_path / "entity")
        mid = M.new_message_id("example.test")
        b_fpr = b.fingerprint
        M.build_encrypted(tmp_path / "entity", tmp_path / "msg", a, b_fpr, "a@example.test",
                          "b@example.test", mid)
        msg = email.message_from_bytes((tmp_path / "msg").read_bytes(), policy=email.policy.compat32)
        assert msg.get_content_type() == "multipart/encrypted"
        assert msg.get_param("protocol") == "application/pgp-encrypted"
        ctl, data = msg.get_payload()
        assert ctl.get_content_type() == "application/pgp-encrypted" and "Version: 1" in ctl.get_payload()
        assert data.get_payload().startswith("-----BEGIN PGP MESSAGE-----")

        ranges = M.plan_split(tmp_path / "msg", 40_000, "a@example.test", "b@example.test", mid, "example.test")
        assert len(ranges) >= 3
        stored = []
        for r in ranges:
            body = b"".join(M.iter_range(tmp_path / "msg", r))
            assert len(body) <= 40_000
            head = email.message_from_bytes(body.split(b"\r\n\r\n")[0])
            assert M.partial_info(head) == M.PartialInfo(mid, r.number, len(ranges))
            # RFC 5322 3.6: each part a message of its own; the receipt request in part 1 only
            # (RFC 2046 5.2.2.1 keeps part 1's enclosing fields; RFC 8098 2.1)
            assert head["Date"] and head["Message-ID"] and head["Message-ID"] != mid
            assert (head["Disposition-Notification-To"] is not None) is (r.number == 1)
            p = tmp_path / f"part{r.number}"
            p.write_bytes(b"Return-Path: <a@example.test>\r\nReceived: from x by y\r\n" + body)
            stored.append(p)
        M.reassemble(stored, tmp_path / "whole")
        whole = email.message_from_bytes((tmp_path / "whole").read_bytes(), policy=email.policy.compat32)
        assert whole["Message-ID"] == mid and whole.get_content_type() == "multipart/encrypted"
        assert whole["Return-Path"] == "<a@example.test>"
        assert whole.get_all("Disposition-Notification-To") == ["a@example.test"]

        M.extract_encrypted(tmp_path / "whole", tmp_path / "asc")
        v = b.decrypt_verify(tmp_path / "asc", tmp_path / "plain")
        assert v.decrypted and v.good and v.signer == a.fingerprint
        out = dm.extract_study(tmp_path / "plain", tmp_path / "out")
        assert [e.path.read_bytes() for e in out] == [i.path.read_bytes() for i in insts]

        v = c.decrypt_verify(tmp_path / "asc", tmp_path / "plain2")
        assert v.decrypted and v.signed and not v.good and v.key_id
        assert not (tmp_path / "plain2").exists()      # output removed unless good
        v = a.decrypt_verify(tmp_path / "asc", tmp_path / "plain3")   # not encrypted to a
        assert not v.decrypted and not (tmp_path / "plain3").exists()
    finally:
        for r in (a, b, c):
            r.close()


def test_mdn_roundtrip_plain_and_signed(tmp_path: Path, two_keys: dict[str, tuple[str, str]]) -> None:
    raw = M.build_mdn("b@example.test", "a@example.test", "<x1@example.test>", "2 DICOM objects imported")
    (tmp_path / "mdn").write_bytes(raw)
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "disposition-notification"
    assert msg["Auto-Submitted"] == "auto-replied"
    mdn = M.parse_mdn(tmp_path / "mdn")
    assert mdn == M.Mdn("<x1@example.test>", "automatic-action/MDN-sent-automatically; processed",
                        "b@example.test", "")

    a = _ring(tmp_path, "a", two_keys, "b")
    b = _ring(tmp_path, "b", two_keys, "a")
    try:
        signed = M.build_mdn("b@example.test", "a@example.test", "<x2@example.test>", "ok", b)
        msg = email.message_from_bytes(signed, policy=email.policy.compat32)
        assert msg.get_content_type() == "multipart/signed"
        assert msg.get_param("protocol") == "application/pgp-signature"
        assert str(msg.get_param("micalg")).startswith("pgp-sha")
        (tmp_path / "signed").write_bytes(signed)
        mdn = M.parse_mdn(tmp_path / "signed", a)
        assert mdn is not None and mdn.original_id == "<x2@example.test>" and mdn.signer == b.fingerprint
        (tmp_path / "tampered").write_bytes(signed.replace(b"<x2@example.test>\r\nDisposition",
                                                           b"<x3@example.test>\r\nDisposition"))
        mdn = M.parse_mdn(tmp_path / "tampered", a)
        assert mdn is not None and mdn.original_id == "<x3@example.test>" and mdn.signer == ""
        # a refusal (RFC 8098: `deleted` with the `error` modifier, the reason in Error:)
        (tmp_path / "neg").write_bytes(M.build_mdn("b@example.test", "a@example.test", "<x4@example.test>",
                                                   "refused", b, "deleted/error", "not-dicom: IM1 is a PDF"))
        mdn = M.parse_mdn(tmp_path / "neg", a)
        assert mdn == M.Mdn("<x4@example.test>", "automatic-action/MDN-sent-automatically; deleted/error",
                            "b@example.test", b.fingerprint, "not-dicom: IM1 is a PDF")
    finally:
        a.close()
        b.close()


def test_synthetic_study_is_valid_dicom(tmp_path: Path) -> None:
    files = synthetic_study(tmp_path, n=2)
    ds = pydicom.dcmread(files[0])
    assert ds.Rows == 64 and ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian


def test_a_long_running_receivers_summary_stays_bounded() -> None:
    from relay.gateway.receive import Summary
    s = Summary()
    for n in range(2500):
        s.imported.append(f"1.2.{n}")
        s.quarantined.append((f"q{n}", "not-dicom"))
        s.trim(1000)
    assert (len(s.imported), len(s.quarantined)) == (1000, 1000)
    assert (s.n_imported, s.n_quarantined) == (2500, 2500)
    assert s.imported[-1] == "1.2.2499" and s.imported[0] == "1.2.1500"
