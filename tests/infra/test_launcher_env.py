"""What every Ray worker's environment carries (unit: no Ray started)."""

from __future__ import annotations

import pytest

from infra.launcher import worker_env
from infra.settings import Settings


def test_thread_variables_follow_threads_per_worker(tmp_path):
    env = worker_env(Settings(home=tmp_path, threads_per_worker=3))
    assert env["OMP_NUM_THREADS"] == "3"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE", "spinning OpenMP barriers burn shared cores"


def test_single_threaded_workers_leave_the_wait_policy_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert "OMP_WAIT_POLICY" not in worker_env(Settings(home=tmp_path, threads_per_worker=1))


def test_a_wait_policy_in_the_driver_environment_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert worker_env(Settings(home=tmp_path, threads_per_worker=2))["OMP_WAIT_POLICY"] == "ACTIVE"


def test_medfoundry_settings_travel_to_workers(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFOUNDRY_SEED", "7")
    assert worker_env(Settings(home=tmp_path))["MEDFOUNDRY_SEED"] == "7"


@pytest.mark.parametrize("niceness", [-21, 20])
def test_worker_niceness_is_validated(tmp_path, niceness):
    with pytest.raises(ValueError):
        Settings(home=tmp_path, ray_worker_niceness=niceness)
