"""Trust, used by both sides: TLS contexts and identities (tls), CRLs (crl), the CA and
certificates (pki, with `cryptography` loaded on demand through native)."""
