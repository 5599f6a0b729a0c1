"""The run registry: every number the book shows comes from a run stored here.

* ``storage`` -- atomic writes, JSON lines, the training lock, provenance;
* ``runs`` -- a stored run (config, metrics, weights), its key, where the registries are;
* ``archive`` -- ``lvae runs export`` / ``import``: runs between machines, with digests checked;
* ``commands`` -- how a run's configuration is spelled on the ``lvae`` command line;
* ``experiments`` -- the paper's experiments (variants x depths) as named run configurations;
* ``profiles`` -- the book's execution profiles (``smoke``, ``cpu``, ``paper``, ...: budgets, not
  performance profiling), read from ``profiles.yml``.

May import: lvae.config, lvae.model, lvae.data
"""
