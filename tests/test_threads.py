"""lf.threads: the kernels' thread count on a busy machine and the OpenMP wait policy lf sets."""

import pytest
import torch

from lf import threads
from lf.errors import ConfigError
from lf.kernels import _checks, rms_norm
from lf.kernels.rms_norm import rms_norm_reference


@pytest.fixture
def machine(monkeypatch):
    """A 4-core machine whose runnable-thread count the test sets; the load sample is taken afresh."""
    state = {"running": 1}
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "running_threads", lambda: state["running"])
    monkeypatch.setattr(threads, "SAMPLE_S", -1.0)
    monkeypatch.delenv(threads.ENV_VAR, raising=False)
    return state


@pytest.mark.parametrize(("running", "expected"), [(1, 4), (2, 3), (4, 1), (40, 1)])
def test_kernel_threads_leave_cores_held_by_others(machine, running, expected):
    machine["running"] = running
    assert threads.kernel_threads(8) == expected


def test_kernel_threads_fixed_policy_and_one_thread(machine, monkeypatch):
    machine["running"] = 40
    assert threads.kernel_threads(1) == 1
    monkeypatch.setenv(threads.ENV_VAR, "fixed")
    assert threads.kernel_threads(3) == 3


def test_bad_policy_names_the_choices(machine, monkeypatch):
    monkeypatch.setenv(threads.ENV_VAR, "fast")
    with pytest.raises(ConfigError, match="LF_THREADS_POLICY='fast' is not a policy; use 'adaptive'"):
        threads.kernel_threads(2)


def test_running_threads_reads_this_machine():
    assert threads.running_threads() >= 1


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "PASSIVE"),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
    ({"GOMP_SPINCOUNT": "1000"}, None),
    ({threads.ENV_VAR: "fixed"}, None),
])
def test_wait_policy_only_where_the_environment_is_silent(monkeypatch, env, expected):
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", threads.ENV_VAR):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    threads.apply_wait_policy()
    assert threads.os.environ.get("OMP_WAIT_POLICY") == expected


@pytest.mark.parametrize("running", [1, 40])
def test_cpu_kernel_on_a_busy_machine_matches_reference(machine, running):
    """The thread count lf picks changes how rows are shared out, never the result."""
    machine["running"] = running
    assert _checks.threads() == threads.kernel_threads(torch.get_num_threads())
    x = torch.randn(37, 96, requires_grad=True)
    w = torch.randn(96, requires_grad=True)
    out = rms_norm(x, w, 1e-6)
    torch.testing.assert_close(out, rms_norm_reference(x, w, 1e-6))
