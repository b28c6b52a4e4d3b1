"""Message views for IMAP (ENVELOPE, BODYSTRUCTURE, sections, SEARCH, SORT, THREAD), trace headers, DSNs."""

#: Bumped whenever ENVELOPE, BODYSTRUCTURE or BODY of some message would come out differently, so
#: that views cached by an older version (the store's index) are recomputed.
VIEWS_VERSION = "2"
