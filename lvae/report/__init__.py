"""Reporting: the paper's numbers against ours, with their uncertainty and a verdict.

* ``paper`` -- every number the paper reports, transcribed;
* ``protocol`` -- where every default of the configuration comes from;
* ``stats`` -- means over seeds with confidence intervals, paired differences;
* ``analysis`` -- the numbers and table rows the chapters show, read from stored runs;
* ``claims`` -- every claim of the paper with the verdict our runs give it;
* ``probes`` -- probes of a trained model (posterior means, traversals, the merge, L_K as K grows);
* ``benchmark_tables`` -- the speed benchmarks' results as tables.

May import: lvae.config, lvae.model, lvae.data, lvae.registry, lvae.training
"""
