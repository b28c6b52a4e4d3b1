"""Automatic certificates (ACME, RFC 8555): the client, the challenge answers, the renewal manager."""
