"""Optuna search: two worker processes share one study in PostgreSQL (127.0.0.1:5432) without duplicate trials."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import free_port

pytestmark = pytest.mark.training

REPO = Path(__file__).resolve().parent.parent
PG_URLS = [os.environ["EDGECAST_TEST_PG_URL"]] if os.environ.get("EDGECAST_TEST_PG_URL") else [
    "postgresql+psycopg2://postgres@127.0.0.1:5432/test", "postgresql+psycopg2://root@127.0.0.1:5432/test"]


@pytest.fixture(scope="module")
def pg_url():
    """The first PostgreSQL URL that accepts a connection; a clear failure (not a skip) when none does."""
    import sqlalchemy

    errors = []
    for url in PG_URLS:
        try:
            engine = sqlalchemy.create_engine(url)
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("select 1"))
            engine.dispose()
            return url
        except Exception as exc:  # noqa: BLE001 - report every attempt
            errors.append(f"{url}: {str(exc).splitlines()[0]}")
    pytest.fail("PostgreSQL is not reachable at 127.0.0.1:5432 (database `test`, trust auth, user postgres or root); "
                "start it before running this test (CI starts it). Tried: " + "; ".join(errors))


def test_two_workers_share_one_postgres_study_without_duplicate_trials(pg_url):
    """Two concurrent `search` processes on one RDB study: every trial once, both workers contribute, no repeats."""
    import optuna

    study_name = f"edgecast-test-{uuid.uuid4().hex[:12]}"
    cmd = [sys.executable, "-m", "training", "search", "--storage", pg_url, "--study", study_name, "--sampler", "random",
           "--trials", "3", "--synthetic-devices", "1", "--synthetic-hours", "8", "--lookback", "24", "--horizon", "3",
           "--epochs", "1", "--max-batches", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        workers = [subprocess.Popen(cmd + ["--worker", str(i)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for i in range(2)]
        outputs = [w.communicate(timeout=240) for w in workers]
        for w, (out, err) in zip(workers, outputs):
            assert w.returncode == 0, err[-2000:]
        study = optuna.load_study(study_name=study_name, storage=pg_url)
        trials = study.get_trials(deepcopy=False)
        assert len(trials) == 6
        assert sorted(t.number for t in trials) == list(range(6))
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        by_worker = {}
        for t in trials:
            by_worker.setdefault(t.user_attrs["worker"], []).append(t.number)
        assert len(by_worker) == 2 and all(len(n) == 3 for n in by_worker.values())
        params = [tuple(sorted(t.params.items())) for t in trials]
        assert len(set(params)) == 6, "two workers proposed the same parameters"
    finally:
        try:
            optuna.delete_study(study_name=study_name, storage=pg_url)
        except KeyError:
            pass


def test_unreachable_storage_is_named_in_the_error():
    """A study storage that cannot be reached ends the worker with exit 2 and names the storage."""
    port = free_port()
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/test"
    done = subprocess.run([sys.executable, "-m", "training", "search", "--storage", url, "--study", "nowhere",
                           "--trials", "1", "--synthetic-devices", "1", "--synthetic-hours", "8", "--lookback", "24",
                           "--horizon", "3", "--epochs", "1", "--max-batches", "1"],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "cannot open study 'nowhere'" in done.stderr and f"127.0.0.1:{port}" in done.stderr


def test_fit_search_folds_stay_inside_the_training_rows():
    """`fit --search` folds expand in time order and validate only on rows before the fit's validation split."""
    import numpy as np

    from training.search import fold_splits, lookback_choices

    grid = np.arange(1000)
    folds = fold_splits((0.7, 0.15, 0.15), 3)
    bounds = [f.bounds(grid) for f in folds]
    assert all(b["val"][1] <= 700 for b in bounds)
    assert [b["train"][1] for b in bounds] == sorted(b["train"][1] for b in bounds)  # expanding
    assert all(b["train"][1] == b["val"][0] for b in bounds)
    assert bounds[-1]["val"][1] == 700
    assert lookback_choices(60, 10, 400) == [30, 60, 120] and lookback_choices(60, 10, 100) == [30]
