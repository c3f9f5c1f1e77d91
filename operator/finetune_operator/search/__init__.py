"""Hyperparameter search (spec.search): the search space, the Optuna study rebuilt from the trial
records on every pass, the report and the promotion of the best trial."""
