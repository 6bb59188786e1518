"""Linear probe (MIX'EM Table 3): a linear classifier on frozen representations."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def linear_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                          max_iter: int = 1000) -> float:
    """Fit standardisation + multinomial logistic regression on the train split's frozen
    representations and return its accuracy on the test split."""
    keep = train_y >= 0
    if len(np.unique(train_y[keep])) < 2:
        raise ValueError("the linear probe needs labelled training samples of at least two classes")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    if keep.all():  # no unlabelled rows (STL-10's are): no (N, D) copy of the features
        probe.fit(train_x, train_y)
    else:
        probe.fit(train_x[keep], train_y[keep])
    return float((probe.predict(test_x) == test_y).mean())
