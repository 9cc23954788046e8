"""sendscript: dispatches scripts to the phones of a device farm."""

__version__ = "0.1.0"
