"""Sans-IO SMTP (RFC 5321) and LMTP (RFC 2033) cores: server and client state machines, replies, framing.

Modules: `server` (ServerConnection), `client` (ClientConnection), `replies` (Reply and named codes),
`address` (RFC 5321 §4.1.2 paths), `data` (DATA/BDAT framing), `errors`.
"""
