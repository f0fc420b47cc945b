"""Across processes and machines: the shared Redis tier, revocation, and
revocation from the parent to its workers."""
