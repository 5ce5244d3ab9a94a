"""The Raft protocol's rules as pure, synchronous functions and small state objects.

Nothing here awaits, reads a clock, draws a random number or touches storage or the
network: the caller passes in the time and the facts, and gets back a decision. That
makes every rule testable with a table of cases, and leaves the asyncio code in
``raft/node.py`` and ``raft/replication.py`` to do only the I/O the rules decide.
"""
