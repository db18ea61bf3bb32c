"""The part of the callbacks that needs no framework: checking the
agent's arguments early, starting once, and never raising."""

import warnings

import pytest

from wandb_offline_sync import integrations
from wandb_offline_sync.agent import FarmWarning


def _farm_warnings(caught):
    return [str(w.message) for w in caught
            if issubclass(w.category, FarmWarning)]


def test_a_misspelt_agent_argument_fails_when_the_callback_is_made():
    with pytest.raises(TypeError, match="frequncy"):
        integrations._AgentStarter(frequncy=60)


def test_a_process_that_does_not_log_never_starts_an_agent():
    starter = integrations._AgentStarter(frequency=60)

    starter._start_agent(lambda: False)

    assert starter._settled and starter.agent is None


def test_a_failing_hook_warns_once_and_stops_trying():
    starter = integrations._AgentStarter()
    calls = []

    def create_run():
        calls.append(1)
        raise RuntimeError("logger exploded")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        starter._start_agent(lambda: True, create_run)
        starter._start_agent(lambda: True, create_run)

    assert len(calls) == 1
    assert _farm_warnings(caught) == [
        "_AgentStarter stopped: RuntimeError: logger exploded"]
    assert starter.agent is None


def test_warnings_configured_as_errors_do_not_reach_training():
    starter = integrations._AgentStarter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        starter._start_agent(lambda: 1 / 0)
    assert starter._settled


def test_training_without_a_run_is_reported_once_and_may_start_later():
    starter = integrations._AgentStarter()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        starter._check_started(lambda: True)
        starter._check_started(lambda: True)

    assert len(_farm_warnings(caught)) == 1
    assert "without a wandb run" in _farm_warnings(caught)[0]
    assert not starter._settled


def test_only_the_callback_classes_are_built_on_demand():
    assert {"LightningCallback", "PyTorchLightningCallback",
            "TransformersCallback"} <= set(dir(integrations))
    with pytest.raises(AttributeError, match="NoSuchCallback"):
        integrations.NoSuchCallback
