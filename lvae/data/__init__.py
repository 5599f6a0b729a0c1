"""The data: the datasets' files and what the model sees in each epoch (paper section 3).

* ``datasets`` -- MNIST, OMNIGLOT and NORB: download with checksums, the splits, the loaders;
* ``batches`` -- the training data rules: re-binarized training images every epoch, a test set
  binarized once, seeded batches.

May import: lvae.config
"""
