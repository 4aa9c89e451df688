"""The memory backends: one module per backend, each registering its class by name.

Every module in this package is imported by :mod:`knn_memory.registry` the first time a backend is
looked up, so a new backend is one module here whose class carries ``@register_backend("name")``;
nothing else changes. Backends in other packages register through the ``knn_memory.backends`` entry
point group instead.
"""
