"""An input error found while a Ray actor is being built reaches the user as one line
(``distributed/actors/start_errors.py``, docs/reliability.md "Bad input"), not as Ray's
``ActorDiedError`` traceback text; a bug in a constructor still kills the actor."""

from __future__ import annotations

import pytest

from correction_rl.config import ConfigError
from correction_rl.errors import is_expected, one_line


class _Built:
    """Stands in for an actor class outside Ray: the wrapper is plain Python."""

    def __init__(self, value: str):
        if value == "bad input":
            raise ConfigError("learner.lora.target_modules: ['nosuch'] match no Linear layer")
        if value == "bug":
            raise TypeError("a bug")
        self.value = value

    def pid(self) -> int:
        return 7


def test_an_expected_constructor_error_is_kept_and_raised_by_the_start_up_call():
    from correction_rl.distributed.actors.start_errors import reporting_start_errors

    cls = reporting_start_errors(_Built)
    assert cls is reporting_start_errors(_Built) and cls.__name__ == "_Built"
    assert cls("fine").pid() == 7
    built = cls("bad input")  # does not raise: Ray would turn it into ActorDiedError text
    with pytest.raises(ConfigError, match="learner.lora.target_modules"):
        built.pid()
    with pytest.raises(TypeError):  # a bug is not the user's: the actor dies with its traceback
        cls("bug")


@pytest.mark.slow
def test_a_lora_target_naming_no_layer_ends_the_ray_start_in_one_line(tmp_path, ray_local, warm_policy_dir):
    """The check runs inside the learner actor's constructor (peft wraps the model there)."""
    import ray

    from correction_rl.distributed.cluster import start_cluster
    from correction_rl.prompts.split import train_and_held_out

    from test_distributed import system_config

    cfg = system_config(tmp_path, warm_policy_dir, "bad-lora", mode="sync",
                        learner__lora={"enabled": True, "target_modules": ["nosuch_proj"]})
    train, _ = train_and_held_out(cfg)
    with pytest.raises(Exception) as caught:
        start_cluster(cfg, train)
    assert is_expected(caught.value), type(caught.value)
    line = one_line(caught.value)
    assert line.startswith("learner.lora.target_modules:") and "nosuch_proj" in line, line
    # the cluster was shut down: its placement group is gone, nothing holds the CPUs
    assert all(g["state"] == "REMOVED" for g in ray.util.placement_group_table().values())
