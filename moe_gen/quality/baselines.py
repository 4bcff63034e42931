"""Classical baselines on raw features: the majority class, logistic regression and k-NN
(scikit-learn), trained on all training rows and scored on the held-out rows the models see.

Numbers are standardised with statistics of the training rows; text becomes TF-IDF of word
uni- and bigrams (k-NN on it uses cosine distance).

The best baseline *by held-out score* (of the three: ``report._classical_bar``) is a bar picked
with the held-out rows, so it sits above what either model is expected to score there, most
where those rows are few (89 for diabetes: one row is 1.1 points). Each baseline is therefore also scored by 5-fold
cross-validation on the training rows alone (``"cv"``): the model a user without held-out rows
would choose (``cv_choice``).
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from moe_gen.quality.suite import SuiteTask
from moe_gen.tasks import metrics as metric_fns

if TYPE_CHECKING:
    from moe_gen.tasks import Task

__all__ = ["CLASSICAL", "CV_FOLDS", "FROZEN_STATES", "classical_scores", "cross_validated_scores", "cv_choice",
           "frozen_states_score"]

CLASSICAL = ("majority", "logreg", "knn")
FROZEN_STATES = "logreg_states"  # logistic regression on a frozen encoder's mean-pooled states
CV_FOLDS = 5


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


def _features(task: SuiteTask, rows: Sequence[dict]):
    x = task.features(rows)
    return x if task.text_features else np.asarray(x, np.float64)


def _labels(task: SuiteTask, rows: Sequence[dict]) -> list[str]:
    return [str(row[task.label_column]) for row in rows]


def classical_scores(task: SuiteTask, train_rows: Sequence[dict], test_rows: Sequence[dict]) -> dict:
    """``{"majority": s, "logreg": s, "knn": s, "cv": {"logreg": s, "knn": s}}``: each baseline's
    held-out score in the task's metric, and under ``"cv"`` the cross-validated scores on the
    training rows (``cross_validated_scores``)."""
    if not task.classification:
        raise ValueError(f"task {task.name!r} has no classical baseline (not a classification task)")
    y_train, y_test = _labels(task, train_rows), _labels(task, test_rows)
    majority = collections.Counter(y_train).most_common(1)[0][0]
    scores = {"majority": metric_fns.compute([task.metric], [majority] * len(y_test), y_test)[task.metric]}
    x_train, x_test = _features(task, train_rows), _features(task, test_rows)
    for name, model in _models(task.text_features).items():
        model.fit(x_train, y_train)
        predictions = [str(p) for p in model.predict(x_test)]
        scores[name] = metric_fns.compute([task.metric], predictions, y_test)[task.metric]
    scores["cv"] = cross_validated_scores(task, train_rows)
    return scores


def cross_validated_scores(task: SuiteTask, train_rows: Sequence[dict]) -> dict[str, float]:
    """``{"logreg": s, "knn": s}``: each model scored on the training rows alone, by ``CV_FOLDS``-fold
    cross-validation (folds shuffled with seed 0, not stratified: some classes have fewer rows
    than folds); the task's metric over all out-of-fold predictions."""
    from sklearn.model_selection import KFold, cross_val_predict

    x, y = _features(task, train_rows), _labels(task, train_rows)
    folds = KFold(CV_FOLDS, shuffle=True, random_state=0)
    return {name: metric_fns.compute([task.metric], [str(p) for p in cross_val_predict(model, x, y, cv=folds)],
                                     y)[task.metric]
            for name, model in _models(task.text_features).items()}


def cv_choice(baselines: dict) -> Optional[str]:
    """The baseline of ``CLASSICAL`` with the best cross-validated score (``baselines["cv"]``; the
    first listed on a tie), or None for a report made before cross-validation was scored."""
    cv = baselines.get("cv")
    return max((c for c in CLASSICAL if c in cv), key=lambda c: cv[c]) if cv else None


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
