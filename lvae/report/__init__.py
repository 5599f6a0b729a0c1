"""Reporting: the paper's numbers against ours, with their uncertainty and a verdict.

* ``paper`` -- every number the paper reports, transcribed;
* ``protocol`` -- where every default of the configuration comes from;
* ``stats`` -- means over seeds with confidence intervals, paired differences;
* ``run_values`` -- what one stored run measured: its history, final values, L_K, the run at an epoch;
* ``seed_means`` -- a model's numbers over its seeds with their CI, and differences between models;
* ``paper_tables`` -- the paper's results next to ours: the headline numbers, the Fig 3 grid, Tables 1-2;
* ``latent_units`` -- active units, the KL per layer and the share above z1 (Figs 4-5);
* ``budgets`` -- every training budget in the registry (a profile at an epoch) and its rows (Fig 2);
* ``registry_tables`` -- the profiles and the run registry as tables;
* ``claims`` -- every claim of the paper with the verdict our runs give it;
* ``probes`` -- probes of a trained model (posterior means, traversals, the merge, L_K as K grows);
* ``benchmark_tables`` -- the speed benchmarks' results as tables.

May import: lvae.config, lvae.model, lvae.data, lvae.registry, lvae.training
"""
