"""Shared state beside the log: delivery state and refused requests.

The embedded shape keeps both in SQLite in the data directory
(``headwater.destinations.state``, ``headwater.log.rejections``); the
scale-out shape keeps them in PostgreSQL, in the store's schema
(``headwater.state.postgres``).  ``headwater.backends`` chooses.
"""
