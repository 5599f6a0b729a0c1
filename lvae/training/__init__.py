"""Training: the step, the epoch loop and the ways to run it (paper section 3, "Optimisation").

* ``optim`` -- Adam over one flat buffer (the numbers of ``torch.optim.Adam``);
* ``step`` -- the training step (objective, clipping, precision) and the evaluation of a model or a stored run;
* ``checkpoints`` -- a run folder opened for training: restore, checkpoints, roll-back;
* ``loop`` -- the one epoch loop for a stack of M >= 1 runs, ``get_or_train``;
* ``grid`` -- many runs of one protocol trained as one vmapped stack;
* ``executors`` -- a grid spread over a cluster (submitit);
* ``profile_runs`` -- the runs a profile names, read from the registry or trained when missing;
* ``campaign`` -- the long runs on the paper's schedule, trained in the background across sessions.

May import: lvae.config, lvae.model, lvae.data, lvae.registry
"""
