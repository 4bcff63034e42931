"""Classical baselines on raw features: the majority class, logistic regression and k-NN
(scikit-learn), trained on all training rows and scored on the held-out rows the models see.

Numbers are standardised with statistics of the training rows; text becomes TF-IDF of word
uni- and bigrams (k-NN on it uses cosine distance).
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Sequence

import numpy as np

from moe_gen.quality.suite import SuiteTask
from moe_gen.tasks import metrics as metric_fns

if TYPE_CHECKING:
    from moe_gen.tasks import Task

__all__ = ["CLASSICAL", "FROZEN_STATES", "classical_scores", "frozen_states_score"]

CLASSICAL = ("majority", "logreg", "knn")
FROZEN_STATES = "logreg_states"  # logistic regression on a frozen encoder's mean-pooled states


def _models(text: bool):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def prep():
        return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True) if text else StandardScaler()

    return {
        "logreg": make_pipeline(prep(), LogisticRegression(max_iter=5000, C=1.0)),
        "knn": make_pipeline(prep(), KNeighborsClassifier(n_neighbors=5, metric="cosine" if text else "minkowski")),
    }


def classical_scores(task: SuiteTask, train_rows: Sequence[dict], test_rows: Sequence[dict]) -> dict[str, float]:
    """``{"majority": s, "logreg": s, "knn": s}``: each baseline's held-out score in the task's metric."""
    if not task.classification:
        raise ValueError(f"task {task.name!r} has no classical baseline (not a classification task)")
    column = task.label_column
    y_train = [str(row[column]) for row in train_rows]
    y_test = [str(row[column]) for row in test_rows]
    majority = collections.Counter(y_train).most_common(1)[0][0]
    scores = {"majority": metric_fns.compute([task.metric], [majority] * len(y_test), y_test)[task.metric]}
    x_train, x_test = task.features(train_rows), task.features(test_rows)
    if not task.text_features:
        x_train, x_test = np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)
    for name, model in _models(task.text_features).items():
        model.fit(x_train, y_train)
        predictions = [str(p) for p in model.predict(x_test)]
        scores[name] = metric_fns.compute([task.metric], predictions, y_test)[task.metric]
    return scores


def _pooled_states(task: "Task", preprocess: str) -> np.ndarray:
    """``[N, H]``: per row of ``task``, the mean of the feature rows its ``preprocess`` slot encodes to."""
    from moe_gen.tasks import Tokenizer

    plan = task.plan(Tokenizer.default())
    pooled = []
    for i in range(len(task)):
        sample = plan.encode(task.data[i], i, training=False)
        rows = [c.rows for c in sample.encoder if c.rows is not None and c.adaptor == preprocess]
        if len(rows) != 1:
            raise ValueError(f"task {task.name!r}, row {i}: expected one {preprocess} slot, found {len(rows)}")
        pooled.append(rows[0].mean(0).numpy())
    return np.stack(pooled).astype(np.float64)


def frozen_states_score(suite_task: SuiteTask, train: "Task", test: "Task") -> float:
    """Held-out score of a logistic regression on the mean-pooled states of the frozen encoder that
    reads ``suite_task``'s input (``suite_task.frozen_states``), trained on all of ``train``'s rows
    (``Task`` objects, encoded by their own plans): what a linear model makes of the same features."""
    column = suite_task.label_column
    model = _models(text=False)["logreg"]  # the raw-feature baseline's own pipeline
    model.fit(_pooled_states(train, suite_task.frozen_states), [str(r[column]) for r in train.data])
    predictions = [str(p) for p in model.predict(_pooled_states(test, suite_task.frozen_states))]
    return metric_fns.compute([suite_task.metric], predictions, [str(r[column]) for r in test.data])[suite_task.metric]
