"""Load generator: replays a DICOM e-mail network's traffic against SMTP + IMAP/POP3 servers."""
