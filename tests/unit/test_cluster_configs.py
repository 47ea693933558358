"""The cluster configs in cluster/: the launcher YAMLs pass Ray's own validator (the one `ray up` runs),
and the KubeRay manifests have the shape mixloop relies on. No cluster, no cloud, no network."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).parents[2]
CLUSTER = REPO / "cluster"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
RAY_MINOR = ".".join(ray.__version__.split(".")[:2])
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def validated(config: dict) -> dict:
    """What `ray up` does before touching the cloud: merge the provider's defaults, then validate."""
    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


def gpu_workers(config: dict) -> dict:
    return {name: node for name, node in config["available_node_types"].items() if name != config["head_node_type"]}


def pinned(package: str) -> str:
    """The requirement pyproject.toml gives for a package, e.g. 'torch==2.13.0'."""
    return next(dep for dep in PYPROJECT["project"]["dependencies"] if re.match(rf"{package}\b", dep))


def ray_version_of(image: str) -> str:
    """'2.60' from rayproject/ray:2.60.0-py311-gpu or REGISTRY/mixloop:ray2.60.0-py311-gpu."""
    match = re.search(r":(?:ray)?(\d+\.\d+)\.\d+-py\d+-(?:cpu|gpu)$", image)
    assert match, f"{image}: no Ray version in the tag"
    return match.group(1)


# ------------------------------------------------------------------ cluster launcher (AWS, GCP)


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_rays_validator(name):
    config = validated(load(name))
    assert config["cluster_name"] == "mixloop"


@pytest.mark.parametrize("name", LAUNCHER)
@pytest.mark.parametrize("where", ["node type", "top level"])
def test_rays_validator_rejects_a_misspelt_key(name, where):
    config = load(name)
    if where == "top level":
        config["idle_timout_minutes"] = config.pop("idle_timeout_minutes")
        typo = "idle_timout_minutes"
    else:
        node = next(iter(gpu_workers(config).values()))
        node["min_wrkers"] = node.pop("min_workers")
        typo = "min_wrkers"
    with pytest.raises(jsonschema.ValidationError, match=typo):
        validated(config)


@pytest.mark.parametrize("name", LAUNCHER)
def test_gpu_workers_scale_from_zero_and_declare_their_gpus(name):
    config = validated(load(name))
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    assert head["resources"]["CPU"] > 0
    workers = gpu_workers(config)
    assert workers
    for node_type, node in workers.items():
        assert node["min_workers"] == 0, node_type
        # Declared, since the autoscaler must know a node's GPUs before one exists to scale from zero.
        assert node["resources"]["GPU"] >= 1, node_type
    assert sum(node["max_workers"] for node in workers.values()) >= 2
    assert 1 <= config["idle_timeout_minutes"] <= 30


def test_aws_offers_spot_and_on_demand_gpus_with_an_on_demand_head():
    config = load("aws.yaml")
    market = {
        name: node["node_config"].get("InstanceMarketOptions", {}).get("MarketType")
        for name, node in gpu_workers(config).items()
    }
    assert "spot" in market.values() and None in market.values(), market
    assert "InstanceMarketOptions" not in config["available_node_types"][config["head_node_type"]]["node_config"]


def test_gcp_offers_preemptible_and_on_demand_gpus_with_an_on_demand_head():
    config = load("gcp.yaml")
    scheduling = {name: node["node_config"]["scheduling"] for name, node in gpu_workers(config).items()}
    for node_type, value in scheduling.items():
        # The Compute API takes a mapping; Ray's own examples show a list, which it refuses.
        assert isinstance(value, dict), node_type
        assert value["onHostMaintenance"] == "TERMINATE", f"{node_type}: GPU VMs cannot live-migrate"
    assert {value.get("preemptible", False) for value in scheduling.values()} == {True, False}
    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    assert not head.get("scheduling", {}).get("preemptible", False)


@pytest.mark.parametrize("name", LAUNCHER)
def test_every_node_installs_this_checkout_of_mixloop(name):
    config = validated(load(name))
    assert config["file_mounts"]["~/mixloop"] == "."
    extras = PYPROJECT["project"].get("optional-dependencies", {})
    for commands in (config["head_setup_commands"], config["worker_setup_commands"]):
        text = "\n".join(commands)
        assert f"pip install -q {pinned('torch')}" in text
        install = re.search(r'pip install -q -e "\$HOME/mixloop(?:\[(\w+)\])?"', text)
        assert install, text
        if install.group(1):
            assert install.group(1) in extras, f"pyproject.toml has no [{install.group(1)}] extra"
        # Ray's defaults would otherwise add a nightly wheel of Ray itself.
        assert "ray-wheels" not in text


@pytest.mark.parametrize("name", LAUNCHER)
def test_images_match_the_installed_ray(name):
    docker = load(name)["docker"]
    assert docker["head_image"].endswith("-cpu") and docker["worker_image"].endswith("-gpu")
    for image in (docker["head_image"], docker["worker_image"]):
        assert image.startswith("rayproject/ray:")
        assert ray_version_of(image) == RAY_MINOR


@pytest.mark.parametrize("name", LAUNCHER)
def test_dashboard_stays_on_loopback_and_token_auth_is_on(name):
    config = validated(load(name))
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = next(command for command in commands if "ray start" in command)
        assert "RAY_AUTH_MODE=token ray start" in start
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


# ------------------------------------------------------------------ KubeRay


def manifests(name: str) -> dict[str, dict]:
    documents = list(yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()))
    return {document["kind"]: document for document in documents}


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def check_cluster_spec(spec: dict) -> None:
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    assert ".".join(spec["rayVersion"].split(".")[:2]) == RAY_MINOR
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "reach the head through port-forward only"
    assert all("nvidia.com/gpu" not in c["resources"].get("limits", {}) for c in containers(head))
    groups = spec["workerGroupSpecs"]
    gpu_groups = [g for g in groups if any("nvidia.com/gpu" in c["resources"]["limits"] for c in containers(g))]
    assert gpu_groups == groups, "every worker group has GPUs"
    for group in gpu_groups:
        assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0, group["groupName"]
        assert group["maxReplicas"] >= 2, group["groupName"]
        for container in containers(group):
            limits = container["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1
            assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
    images = {c["image"] for group in [head, *groups] for c in containers(group)}
    assert len(images) == 1, images
    assert ray_version_of(images.pop()) == RAY_MINOR


def test_raycluster_autoscales_a_gpu_group_from_zero():
    objects = manifests("raycluster.yaml")
    cluster = objects["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    check_cluster_spec(cluster["spec"])


def test_rayjob_runs_a_pipeline_and_shuts_its_cluster_down():
    objects = manifests("rayjob.yaml")
    job = objects["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    entrypoint = job["spec"]["entrypoint"].split()
    assert entrypoint[:2] == ["mixloop", "run"]
    # Without an address, mixloop would start a private Ray inside the head pod.
    assert entrypoint[entrypoint.index("--address") + 1] == "auto"
    check_cluster_spec(job["spec"]["rayClusterSpec"])


def test_rayjob_spec_is_the_quickstart_on_gpus_with_its_workdir_on_a_bucket(tmp_path):
    pytest.importorskip("s3fs")
    from mixloop.config import load_spec

    objects = manifests("rayjob.yaml")
    spec_path = Path(objects["RayJob"]["spec"]["entrypoint"].split()[2])
    head = objects["RayJob"]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for c in head["containers"] for m in c.get("volumeMounts", [])}
    volume = next(
        v for v in head["volumes"] if v.get("configMap", {}).get("name") == objects["ConfigMap"]["metadata"]["name"]
    )
    assert mounts[volume["name"]] == str(spec_path.parent), "the ConfigMap is mounted where the entrypoint reads"

    text = objects["ConfigMap"]["data"][spec_path.name]
    (tmp_path / spec_path.name).write_text(text)
    spec = load_spec(tmp_path / spec_path.name, files=False)  # the bucket is a placeholder: no write probe
    assert spec.workdir.startswith(("s3://", "gs://"))

    quickstart = yaml.safe_load((REPO / "jobs" / "quickstart.yaml").read_text())
    embedded = yaml.safe_load(text)
    assert embedded["defaults"].pop("use_gpu") is True
    assert {key: value for key, value in embedded.items() if key != "workdir"} == {
        key: value for key, value in quickstart.items() if key != "workdir"
    }, "keep the RayJob's copy of jobs/quickstart.yaml in step with it"


def test_image_is_rays_own_plus_mixloop():
    dockerfile = (CLUSTER / "kuberay" / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)$", dockerfile, re.MULTILINE).group(1)
    assert base.startswith("rayproject/ray:") and base.endswith("-gpu")
    assert ray_version_of(base) == RAY_MINOR
    assert f"pip install --no-cache-dir {pinned('torch')}" in dockerfile
    assert re.search(r'pip install --no-cache-dir "/home/ray/mixloop\[[\w,]+\]"', dockerfile)


# ------------------------------------------------------------------ the fake cluster of tests/ray


def test_fake_cluster_mirrors_aws_and_passes_rays_validator_as_it_is():
    """tests/ray/fake_cluster.yaml (read by the autoscaler unmerged) keeps aws.yaml's worker types, from zero."""
    fake = yaml.safe_load((REPO / "tests" / "ray" / "fake_cluster.yaml").read_text())
    validate_config(copy.deepcopy(fake))
    aws = load("aws.yaml")
    assert fake["provider"]["type"] == "fake_multinode" and fake["provider"]["use_node_id_as_ip"] is True
    assert fake["head_node_type"] == "ray.head.default", "the fake provider tags its head with this type"
    assert set(gpu_workers(fake)) == set(gpu_workers(aws))
    for name, node in gpu_workers(fake).items():
        assert node["min_workers"] == 0 and node["resources"]["GPU"] == 1
        assert (node["max_workers"] > 0) == (aws["available_node_types"][name]["max_workers"] > 0)
    assert fake["available_node_types"]["ray.head.default"]["resources"].get("GPU", 0) == 0
