"""The paper's mathematics: masks, score-gradient estimators, and the budget projection.

- :mod:`~cpusparse.method.masks`: Bernoulli masks over the keep probabilities (the
  one place random numbers are drawn) and the score function;
- :mod:`~cpusparse.method.estimators`: REINFORCE and VR-PGE, and the registry of
  score-gradient estimators the training step reads;
- :mod:`~cpusparse.method.exact`: the exact gradient by enumeration (the oracle);
- :mod:`~cpusparse.method.projection`: the projection onto the budget set.

Nothing here knows about layers or networks: every function takes flat arrays.
"""

from .estimators import (
    SCORE_ESTIMATORS,
    ScoreEstimator,
    get_score_estimator,
    reinforce_grad,
    vrpge_grad,
)
from .exact import exact_expectation, exact_grad
from .masks import sample_masks, score_function
from .projection import concat_scores, project_scores, split_scores

__all__ = [
    "sample_masks",
    "score_function",
    "reinforce_grad",
    "vrpge_grad",
    "ScoreEstimator",
    "SCORE_ESTIMATORS",
    "get_score_estimator",
    "exact_expectation",
    "exact_grad",
    "project_scores",
    "concat_scores",
    "split_scores",
]
