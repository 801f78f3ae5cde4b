"""The ``ftune`` command, the demo and the configuration reference: the layer on top of every package.

The core package ``ftune`` and the apps ``train``, ``tune``, ``serve`` and ``cluster`` never import
this package; it imports them.
"""
