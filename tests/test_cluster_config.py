"""cluster.yaml: a valid Ray cluster launcher config with the shape the README promises."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).parent.parent / "cluster.yaml"


def test_cluster_yaml_is_valid_for_the_ray_cluster_launcher():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(prepare_config(config))  # what `ray up` checks: Ray's own JSON schema
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # nothing scheduled on the head
    (worker,) = [spec for name, spec in config["available_node_types"].items() if name != config["head_node_type"]]
    assert worker["node_config"]["InstanceType"] in {"p4de.24xlarge", "p5.48xlarge"}  # 8 x 80 GB GPUs
    assert 0 <= worker["min_workers"] <= worker["max_workers"] <= config["max_workers"]


def test_every_node_installs_this_project_and_keeps_token_auth():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    assert config["file_mounts"]["~/bread_ray"] == "."
    setup = "\n".join(config["setup_commands"])
    assert "pip install -q -e ~/bread_ray" in setup and "BREAD_STORE=s3://" in setup
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "RAY_AUTH_MODE=disabled" not in command
        if command.endswith("ray stop"):
            continue
        assert command.startswith("RAY_AUTH_MODE=token ray start")
