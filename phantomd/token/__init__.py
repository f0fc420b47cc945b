"""The token side: from an opaque token to a JWT or a refusal (gate, cache,
coalescer, introspection, JOSE, sender-constrained proofs)."""
