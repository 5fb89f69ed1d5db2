"""Training from recipes with Lightning: the module, optimizer and schedule, callbacks,
tracking, and the ``hybrid train`` run (:func:`hybrid.train.run.train`)."""
