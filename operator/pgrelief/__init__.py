"""pgrelief keeps PostgreSQL connection slots free.

The package is one pipeline, observe -> diagnose -> plan -> act, used by the troubleshooter
CLI, the standalone loop and the Kubernetes operator alike (see DESIGN.md).
"""

__version__ = "0.1.0"
