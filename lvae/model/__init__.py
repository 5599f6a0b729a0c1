"""The model: the paper's equations as PyTorch modules and functions (sections 2.1-2.3).

* ``gaussian`` -- diagonal-Gaussian and Bernoulli densities, the closed-form KL, the precision-weighted merge;
* ``layers`` -- the MLP d(y), the Gaussian head mu(y), sigma^2(y), the likelihoods p(x|z_1) (eqs 3, 10-12);
* ``blocks`` -- one block per stochastic layer z_i: its prior, posterior, draw and KL (eqs 2, 7-19);
* ``network`` -- the VAE and the LVAE: the blocks run in plain loops (eqs 1-3), ``build_model``;
* ``bounds`` -- the ELBO, the importance-weighted bound L_K and the training bound (eqs 4-6, 20);
* ``warmup`` -- the deterministic warm-up beta (eq 20);
* ``checkpoint_format`` -- reading the state dicts written before the blocks (``lvae_format`` 1).

May import: lvae.config
"""
