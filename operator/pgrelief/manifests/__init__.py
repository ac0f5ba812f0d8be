"""Pure builders of what pgrelief writes into Kubernetes: status, Events, and workloads.

Dicts and models in, dicts and models out, no I/O: the controller package decides when to
write them, these modules decide what they say, and unit tests check them without a cluster
(the layout CloudNativePG uses: desired-object builders apart from reconcile).
"""
