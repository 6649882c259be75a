"""What the tests and the bench share: a real redis-server process (``redis_server``), the real
server on a free loopback port (``server``), and real speech to register (``clips``).

Shipped with the package so that the bench, which is no test, needs nothing from ``tests/``.
"""
