"""Spam and abuse defence at the MX: connection screening (DNSBL/DNSWL), greylisting, Rspamd, learning.

Each module decides; none owns a socket or a listener. The SMTP session asks them at its stages
(connect, RCPT, end of DATA) through the inbound pipeline.
"""
