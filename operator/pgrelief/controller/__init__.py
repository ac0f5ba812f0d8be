"""The Kubernetes operator: the only package that imports kopf and the kubernetes client.

``handlers`` is kopf wiring only; ``worker`` drives one ConnectionPolicy's cycles (the same
``pgrelief.cycle`` the standalone runner drives); ``kube`` is every API call pgrelief makes
itself; ``credentials``, ``status_store`` and ``events`` turn the pure builders of
``pgrelief.manifests`` into API writes; ``main`` starts kopf with the operator's settings.
"""
