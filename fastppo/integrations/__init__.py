"""Drop-in fast loss backends for other trainers: ``fastppo.integrations.trl``, ``.verl`` and
``.openrlhf``. Each adapter has the peer's own signatures and return values, and ``patch()`` /
``unpatch()`` / ``patched()`` to swap them into the peer. Importing this package imports no peer.
"""
