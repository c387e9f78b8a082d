"""A sweep's Optuna study in a database (``sweep.study_storage``), for ``optuna-dashboard`` and resumes.

Ray's ``OptunaSearch`` keeps its study in memory unless given an Optuna storage. With
``sweep.study_storage`` (``sqlite:///optuna.db`` or ``postgresql://user@host/db``) the study is
created there under the sweep's name, with the sweep's objectives as its directions, and every
trial's sampled parameters and final objective values land in it as Tune reports them; so
``optuna-dashboard STORAGE`` shows the front and parameter importances natively. A resumed sweep
(``Tuner.restore`` unpickles the searcher, whose study points at the same database) goes on in
the same study. Passwords are never part of the URI (``config.check_study_storage``): PostgreSQL
reads them from ``PGPASSWORD`` or ``~/.pgpass``.

The study may live on the same PostgreSQL server or sqlite folder as MLflow, but not in the same
database: both keep their schema version in an ``alembic_version`` table.
"""
from __future__ import annotations

import logging

from .errors import UserError
from .tracking import redact

__all__ = ["open_storage", "check_new_study", "close_study", "dashboard_command", "study_tag"]

_logger = logging.getLogger(__name__)

STUDY_TAG = "prunetune.optuna_study"  # on a sweep's parent run: the study's name and (redacted) storage


def _same_database(study_uri: str, tracking_uri: str | None) -> bool:
    from sqlalchemy.engine import make_url

    try:
        a, b = make_url(study_uri), make_url(tracking_uri or "")
    except Exception:  # the tracking URI is a server (http://...): never the same database
        return False
    return (a.get_backend_name(), a.host, a.port, a.database) == (b.get_backend_name(), b.host, b.port, b.database)


def open_storage(uri: str, tracking_uri: str | None = None):
    """An Optuna ``RDBStorage`` on ``uri`` (tables created on first use).

    Raises:
        UserError: ``uri`` is the MLflow store's own database, or cannot be opened.
    """
    import optuna

    if _same_database(uri, tracking_uri):
        raise UserError(
            f"sweep.study_storage {redact(uri)!r} is the MLflow tracking database: Optuna needs its own "
            "(e.g. sqlite:///optuna.db beside it, or another database on the same PostgreSQL server)"
        )
    try:
        return optuna.storages.RDBStorage(uri, engine_kwargs={"pool_pre_ping": True})
    except Exception as e:  # sqlalchemy/psycopg2 raise many kinds; the message may carry the URI
        raise UserError(f"sweep.study_storage {redact(uri)!r} cannot be opened ({type(e).__name__})") from None


def check_new_study(storage, name: str) -> None:
    """A new sweep must not write into an existing study of the same name (``--resume`` continues one)."""
    import optuna

    if name in {s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)}:
        raise UserError(f"sweep {name!r}: the study storage already holds a study of that name; choose another --name, or --resume {name}")


def close_study(uri: str, name: str) -> int:
    """Mark the study's trials still RUNNING as FAIL (a sweep that finished left them behind: suggested
    but never run, e.g. just before an interrupt); returns how many."""
    import optuna
    from optuna.trial import TrialState

    storage = optuna.storages.RDBStorage(uri)
    study = optuna.load_study(study_name=name, storage=storage)
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    if stale:
        _logger.info("study %s: %d trials left RUNNING by an earlier interrupt marked FAIL", name, len(stale))
    return len(stale)


def dashboard_command(uri: str) -> str:
    """How to browse the study: ``optuna-dashboard URI`` (password hidden)."""
    return f"optuna-dashboard {redact(uri)}"


def study_tag(uri: str, name: str) -> dict[str, str]:
    return {STUDY_TAG: f"{name} @ {redact(uri)}"}
