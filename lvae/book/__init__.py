"""The executable book: what a chapter calls, its figures and widgets, and ``lvae book``.

* ``plan`` -- a chapter's parameters and the run registry it reads (imported by the command line: no figures);
* ``chapter`` -- a chapter's set-up, ``glue``, tables, listings;
* ``plots`` -- the matplotlib figures (paper Figs 2-7, 9-10);
* ``widgets`` -- the layer/unit explorer, live and in static HTML;
* ``build`` -- execute the chapters with papermill and build the HTML;
* ``assets`` -- the book's JavaScript, served from the book itself;
* ``bibstyle`` -- author-year labels for the bibliography.

May import: lvae.config, lvae.model, lvae.data, lvae.registry, lvae.training, lvae.report
"""
