"""Mail authentication as library functions: SPF (RFC 7208), DKIM (RFC 6376, RFC 8463), DMARC (RFC 7489,
RFC 9989) and Authentication-Results (RFC 8601), each over a `postier.resolver` lookup and returning
status enums. Modules: `spf`, `dkim`, `dmarc`, `authresults`.
"""
