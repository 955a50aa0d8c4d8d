"""The relay: central mail server of DICOM e-mail teleradiology networks."""

__version__ = "0.1.0"
