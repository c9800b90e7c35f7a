"""DR channels: psk (a pre-shared key, our framing) and mtls (TLS 1.3, certificates on both
sides). The contract is `ahvbackup.core.drivers.DrTransport`; docs/dr.md has the design."""
