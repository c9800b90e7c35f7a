"""DR replication above the transport: the push protocol, the receiver's store, the source push.

Everything here runs over any `trio.abc.Stream`; the DR transports (psk, mtls) give an
authenticated, encrypted one (`DrTransport.connect` / `serve`). docs/dr.md describes it.
"""
