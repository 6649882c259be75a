"""Benchmarks of the voice cache and the live path, side by side in one run, with plots.

``python -m bench`` (or ``livevoice bench``) starts the real server in this process on a free
loopback port, a real ``redis-server``, and drives both with real WebSocket clients. Scenarios:
``lookup``, ``hot_voices``, ``live_sessions``, ``outage``, ``memory``, ``fanout`` (its
listeners and producer in processes of their own), ``matching`` (voice matching on and off),
and, only when named, ``load``: a ``livevoice serve`` subprocess and ``wyoming-piper`` (the peer,
the ``bench`` extra) under the same fixed schedule from talker processes (``bench.load``). See
``docs/benchmarks.md``.

It runs the server, a redis-server and the clips from ``live.testing`` (shipped with the
package; nothing comes from ``tests/``) and needs the test extras (matplotlib among them).
"""

from __future__ import annotations

from .cli import SCENARIOS, main

__all__ = ["SCENARIOS", "main"]
