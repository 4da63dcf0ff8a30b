"""The I/O nucleus: listeners, the client connection driver, upstream pools, relays.

The only package that touches trio sockets.
"""
