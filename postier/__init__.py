"""postier: a complete, self-hostable mail system (MTA, MDA, IMAP, POP3) in one Python package."""

__version__ = "0.1.0"
