"""lf.threads: the OpenMP wait policy lf sets when it is imported."""

import pytest

from lf import threads
from lf.errors import ConfigError

NAMES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", threads.ENV_VAR)


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "PASSIVE"),
    ({threads.ENV_VAR: "passive"}, "PASSIVE"),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
    ({"GOMP_SPINCOUNT": "1000"}, None),
    ({threads.ENV_VAR: "fixed"}, None),
])
def test_wait_policy_only_where_the_environment_is_silent(monkeypatch, env, expected):
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    threads.apply_wait_policy()
    assert threads.os.environ.get("OMP_WAIT_POLICY") == expected


def test_bad_policy_names_the_choices(monkeypatch):
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(threads.ENV_VAR, "fast")
    with pytest.raises(ConfigError, match="LF_THREADS_POLICY='fast' is not a policy; use 'passive'"):
        threads.policy()
    threads.apply_wait_policy()  # importing lf does not fail on it, and sets nothing
    assert "OMP_WAIT_POLICY" not in threads.os.environ


def test_lf_refuses_a_bad_policy_in_one_line(monkeypatch, capsys):
    from lf.cli import main

    monkeypatch.setenv(threads.ENV_VAR, "fast")
    assert main(["version"]) == 2
    assert capsys.readouterr().err == ("lf: LF_THREADS_POLICY='fast' is not a policy; use 'passive' (the default) "
                                       "or 'fixed'\n")
