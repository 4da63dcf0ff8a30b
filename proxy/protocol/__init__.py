"""Sans-IO protocol code: bytes and events in, bytes and decisions out.

Nothing in this package may import trio, open sockets or talk to a store; the I/O nucleus
in ``proxy.net`` drives it. A test enforces that importing it does not import trio.
"""

from proxy.protocol import strict_h11 as _strict_h11

_strict_h11.install()
