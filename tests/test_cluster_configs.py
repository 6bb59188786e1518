"""The deployment files (docker/, cluster_configs/) agree with the code and with each other.

Static checks, fast, with no network, Docker, Kubernetes or Ray cluster: every YAML parses;
every image tag carries the Ray version pinned in pyproject.toml (client and cluster must run
the same Ray) and torch's CUDA build that constraints.txt names, which the nodes' NVIDIA driver
must run; the compose MLflow server installs constraints.txt's MLflow, as the client does; every `clusterlab ...` command the configs run or print exists in the CLI and
its arguments parse (a renamed subcommand, flag or config key fails here); the tracking URI and
the shared storage reach every node; the compose stack's MLflow flags exist in the installed
`mlflow server`; the launcher YAMLs pass Ray's own schema.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from clusterlab.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
CONFIGS = ROOT / "cluster_configs"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
LAUNCHERS = {"aws": CONFIGS / "aws.yaml", "gcp": CONFIGS / "gcp.yaml"}
KUBERAY = CONFIGS / "kuberay"
RAYCLUSTER = KUBERAY / "raycluster.yaml"
RAYJOB = KUBERAY / "rayjob.yaml"
SHARED_PVC = KUBERAY / "shared-storage.yaml"
KUBE_MLFLOW = KUBERAY / "mlflow.yaml"
TWO_NODE = CONFIGS / "local_two_node.sh"
# Where docker/Dockerfile puts the project (and its search spaces) inside the image.
IMAGE_PROJECT_DIR = "/home/ray/clusterlab"
SHARED_MOUNT = "/mnt/shared"
TRACKING_ENV = "CLUSTERLAB_TRACKING_URI"
LOCK = ROOT / "constraints.txt"
# What a deployment file says its nodes' NVIDIA driver runs: a GCP Deep Learning VM image family
# (common-cu128-ubuntu-2204-nvidia-570) or a comment "NVIDIA driver R570 (CUDA 12.8)".
NODE_CUDA = re.compile(r"\bcommon-cu(\d+)(\d)-|NVIDIA driver R\d+ \(CUDA (\d+)\.(\d+)\)")


def ray_pin() -> str:
    """The exact Ray version pyproject.toml pins: the single source of truth for every tag."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_deps = [d for d in deps if re.match(r"ray(\[|[=<>~! ]|$)", d)]
    assert len(ray_deps) == 1, f"expected one ray requirement in pyproject.toml, got {ray_deps}"
    match = re.fullmatch(r"ray(?:\[[^\]]*\])?\s*==\s*(\d+\.\d+\.\d+)", ray_deps[0])
    assert match, f"pyproject.toml must pin Ray exactly (ray[...]==X.Y.Z), got {ray_deps[0]!r}"
    return match.group(1)


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins() -> dict[str, str]:
    """constraints.txt: canonical name -> pinned version."""
    lines = [ln.strip() for ln in LOCK.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    pins = [re.fullmatch(r"([A-Za-z0-9][\w.-]*)==(\S+)", ln) for ln in lines]
    bad = [ln for ln, pin in zip(lines, pins) if not pin]
    assert not bad, f"constraints.txt must hold only exact pins (name==version), not {bad}"
    return {canonical(pin.group(1)): pin.group(2) for pin in pins}


def torch_cuda() -> str:
    """TORCH_CUDA in constraints.txt's header (e.g. cu126): the one statement of torch's CUDA build
    in the image, which every image tag and the nodes' drivers must agree with."""
    values = re.findall(r"^# TORCH_CUDA=(\S*)\s*$", LOCK.read_text(), re.M)
    assert len(values) == 1 and re.fullmatch(r"cu\d{3}", values[0]), (
        f"constraints.txt needs one `# TORCH_CUDA=cuXYZ` line, got {values}")
    return values[0]


def cuda_version(variant: str) -> tuple[int, int]:
    """cu126 -> (12, 6)."""
    major, minor = re.fullmatch(r"cu(\d+)(\d)", variant).groups()
    return int(major), int(minor)


def yaml_files() -> list[Path]:
    return sorted(p for d in (DOCKER, CONFIGS) for p in d.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def load_one(path: Path) -> dict[str, Any]:
    docs = load_all(path)
    assert len(docs) == 1, f"{path.name}: expected one YAML document, got {len(docs)}"
    return docs[0]


def walk(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(key path, value) for every value in a YAML tree."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, (*path, i))


def split_image(ref: str) -> tuple[str, str]:
    name, _, tag = ref.rpartition(":")
    assert name and "/" not in tag, f"image {ref!r} has no tag: pin one"
    return name, tag


def is_our_image(name: str) -> bool:
    return name.rsplit("/", 1)[-1] == "clusterlab"


def pod_specs(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod specs of a RayCluster spec: head group first, then every worker group."""
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [group["template"]["spec"] for group in groups]


def rayjob() -> dict[str, Any]:
    (doc,) = [d for d in load_all(RAYJOB) if d.get("kind") == "RayJob"]
    return doc


def raycluster() -> dict[str, Any]:
    (doc,) = [d for d in load_all(RAYCLUSTER) if d.get("kind") == "RayCluster"]
    return doc


# ---------------------------------------------------------------------------------------------
# Versions and images


def test_ray_pin_is_exact_and_installed():
    pin = ray_pin()
    installed = importlib.metadata.version("ray")
    assert installed == pin, (f"this environment runs Ray {installed} but pyproject.toml pins {pin}: "
                              "`ray job submit` / `ray up` must run the cluster's Ray version")


def test_expected_files_exist():
    for path in (DOCKERFILE, COMPOSE, *LAUNCHERS.values(), RAYCLUSTER, RAYJOB, SHARED_PVC, KUBE_MLFLOW, TWO_NODE):
        assert path.is_file(), f"{path.relative_to(ROOT)} is missing"


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_parses(path):
    docs = load_all(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{path.name}: every document must be a mapping"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())  # join continuation lines
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def test_dockerfile_builds_on_the_pinned_ray_gpu_image():
    pin = ray_pin()
    froms = [arg for op, arg in dockerfile_instructions() if op == "FROM"]
    assert len(froms) == 1, f"expected one FROM in docker/Dockerfile, got {froms}"
    name, tag = split_image(froms[0].split()[0])
    assert name == "rayproject/ray", f"the image must build on Ray's own image, not {name}"
    cuda = torch_cuda()
    assert re.fullmatch(rf"{re.escape(pin)}-py3\d+-{cuda}", tag), (
        f"FROM rayproject/ray:{tag}: the tag must be <pinned Ray {pin}>-py3XX-<TORCH_CUDA {cuda}>: "
        "Ray's build for the CUDA of the image's torch (`-gpu` is an alias of some other CUDA)")


def test_lock_pins_the_dependencies():
    pins = lock_pins()
    assert "clusterlab" not in pins, "constraints.txt must not pin clusterlab itself (pip install -e . of a checkout)"
    assert pins.get("ray") == ray_pin(), f"constraints.txt pins ray {pins.get('ray')}, pyproject.toml {ray_pin()}"
    for name in ("torch", "torchvision", "mlflow", "setuptools"):
        assert name in pins, f"constraints.txt does not pin {name}"
    assert "+" not in pins["torch"] + pins["torchvision"], (
        "constraints.txt pins PyPI's torch / torchvision (no +local label): docker/Dockerfile adds +TORCH_CUDA")


def test_dockerfile_installs_torchs_cuda_build_from_the_lock():
    """The image installs constraints.txt's pins with torch as its TORCH_CUDA build, and keeps
    every later pip install (setup_commands, runtime_env) to them."""
    instructions = dockerfile_instructions()
    assert any(op == "COPY" and re.search(r"(^|\s)constraints\.txt(\s|$)", arg) for op, arg in instructions)
    envs = [arg for op, arg in instructions if op == "ENV" and arg.startswith("PIP_CONSTRAINT=")]
    assert envs, "docker/Dockerfile must set PIP_CONSTRAINT so that every pip install in the image keeps the pins"
    (install,) = [arg for op, arg in instructions if op == "RUN" and "pip install" in arg and "-e ." in arg]
    assert "# TORCH_CUDA=" in install and "constraints.txt" in install, (
        "the install must read TORCH_CUDA from constraints.txt, not repeat it")
    assert "https://download.pytorch.org/whl/$cuda" in install, "torch's TORCH_CUDA build comes from PyTorch's index"
    stated = set(re.findall(r"\bcu\d{3}\b", DOCKERFILE.read_text()))
    assert stated == {torch_cuda()}, f"docker/Dockerfile names CUDA builds {stated}, constraints.txt TORCH_CUDA={torch_cuda()}"


def test_dockerfile_installs_the_project_where_the_configs_expect_it():
    instructions = dockerfile_instructions()
    workdirs = [arg for op, arg in instructions if op == "WORKDIR"]
    assert workdirs and workdirs[-1] == IMAGE_PROJECT_DIR, (
        f"RayJob entrypoints and launcher file_mounts use {IMAGE_PROJECT_DIR}; Dockerfile WORKDIR is {workdirs}")
    copied = [arg for op, arg in instructions if op == "COPY"]
    for source in ("pyproject.toml", "README.md", "clusterlab", "search_spaces"):
        assert any(re.search(rf"(^|\s){re.escape(source)}(\s|$)", c) for c in copied), f"Dockerfile never copies {source}"
        assert (ROOT / source).exists()
    assert any(op == "RUN" and "pip install" in arg and "-e ." in arg for op, arg in instructions), (
        "the project must be installed editable (the launchers sync a checkout over it)")


def test_every_image_tag_carries_the_pinned_ray_version():
    """rayproject/ray images and our clusterlab image, wherever they appear (values, comments,
    the README's instructions)."""
    pin = ray_pin()
    seen: dict[str, int] = {}
    for path in [DOCKERFILE, TWO_NODE, ROOT / "README.md", *yaml_files()]:
        text = path.read_text()
        for repo, tag in re.findall(r"(rayproject/ray|\bclusterlab):(\d[\w.-]*)", text):
            assert tag.startswith(f"{pin}-") or tag == pin, (
                f"{path.relative_to(ROOT)}: {repo}:{tag} does not carry the pinned Ray version {pin}")
            seen[path.name] = seen.get(path.name, 0) + 1
        for doc in (load_all(path) if path.suffix == ".yaml" else []):
            for key_path, value in walk(doc):
                if key_path and key_path[-1] == "rayVersion":
                    assert str(value) == pin, f"{path.name}: rayVersion {value} != pinned Ray {pin}"
    for path in (DOCKERFILE, *LAUNCHERS.values(), RAYCLUSTER, RAYJOB):
        assert seen.get(path.name), f"{path.name} names no image tag"


@pytest.mark.parametrize("path", [*LAUNCHERS.values(), RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_cluster_nodes_run_our_image(path):
    pin = ray_pin()
    images = [value for doc in load_all(path) for key_path, value in walk(doc)
              if key_path and key_path[-1] in ("image", "head_image", "worker_image")]
    assert images, f"{path.name} names no image"
    for ref in images:
        name, tag = split_image(ref)
        assert is_our_image(name), f"{path.name}: nodes must run the clusterlab image (docker/Dockerfile), not {ref}"
        assert tag.startswith(f"{pin}-"), f"{path.name}: {ref} does not carry the pinned Ray version {pin}"
        assert tag.endswith(f"-{torch_cuda()}"), (
            f"{path.name}: {ref} does not carry torch's CUDA build (TORCH_CUDA={torch_cuda()} in constraints.txt)")


@pytest.mark.parametrize("path", [*LAUNCHERS.values(), RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_node_drivers_run_torchs_cuda_build(path):
    """PyPI's torch is a CUDA 13 build that a driver-570 (CUDA 12.8) node cannot run: every
    deployment states its nodes' driver, and it must support the image's CUDA (TORCH_CUDA)."""
    stated = [(m.group(0), tuple(int(g) for g in m.groups() if g)) for m in NODE_CUDA.finditer(path.read_text())]
    assert stated, (f"{path.name} states no NVIDIA driver for its nodes: a GPU image family "
                    "(common-cuXYZ-...) or a comment `NVIDIA driver R570 (CUDA 12.8)`")
    needed = cuda_version(torch_cuda())
    for text, supported in stated:
        assert supported >= needed, (
            f"{path.name}: {text!r} supports CUDA {supported}, but torch's build is {torch_cuda()} (constraints.txt)")


# ---------------------------------------------------------------------------------------------
# clusterlab commands in the configs


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def shell_defaults(script: str) -> dict[str, str]:
    """NAME -> value for the script's `NAME="${NAME:-default}"` / `NAME="value"` assignments."""
    values: dict[str, str] = {}
    for name, value in re.findall(r'^\s*(?:export\s+)?(\w+)="([^"\n]*)"\s*$', script, re.M):
        default = re.fullmatch(r"\$\{(\w+):-(.*)\}", value)
        values[name] = default.group(2) if default else value
    for _ in range(5):  # defaults may refer to earlier variables
        values = {k: re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), v) for k, v in values.items()}
    return values


def clusterlab_commands() -> list[tuple[str, str]]:
    """(file, command) for every clusterlab invocation the configs run or tell people to run:
    RayJob entrypoints, and every `... -- clusterlab ...` line (ray job submit examples)."""
    commands = [(RAYJOB.name, " ".join(rayjob()["spec"]["entrypoint"].split()))]
    for path in [TWO_NODE, *yaml_files()]:
        text = path.read_text()
        variables = shell_defaults(text) if path.suffix == ".sh" else {}
        for line in text.splitlines():
            match = re.search(r"\s--\s+(clusterlab\s.*)$", line)
            if match:
                command = re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), match.group(1))
                commands.append((path.name, command.strip()))
    return commands


def test_every_config_shows_how_to_run_a_sweep():
    files = {name for name, command in clusterlab_commands() if command.startswith("clusterlab sweep ")}
    for path in (*LAUNCHERS.values(), RAYCLUSTER, RAYJOB, TWO_NODE):
        assert path.name in files, f"{path.name} has no `clusterlab sweep` command (entrypoint or `ray job submit ... --` line)"


@pytest.mark.parametrize("source,command", [pytest.param(s, c, id=f"{s}-{c.split()[1]}") for s, c in clusterlab_commands()])
def test_clusterlab_command_parses(source, command, capsys):
    from clusterlab.search_space import load_search_space

    parser = build_parser()
    argv = shlex.split(command)
    assert argv[0] == "clusterlab", f"{source}: {command!r}"
    assert argv[1] in subcommands(parser), f"{source}: `clusterlab {argv[1]}` is not a clusterlab subcommand"
    # The image's copy of the project is this checkout.
    argv = [str(ROOT / a[len(IMAGE_PROJECT_DIR) + 1:]) if a.startswith(IMAGE_PROJECT_DIR + "/") else a for a in argv]
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{source}: `{command}` does not parse:\n{capsys.readouterr().err}")
    # A job's driver joins its cluster through the RAY_ADDRESS Ray sets; another address would leave it.
    assert args.address in (None, "auto"), f"{source}: `{command}` sends the job to another Ray ({args.address})"
    if args.command != "sweep":
        return
    if source == RAYJOB.name:  # retried by KubeRay (backoffLimit): each retry must continue the sweep
        assert args.resume == "auto" and rayjob()["spec"]["backoffLimit"] >= 1, (
            "the RayJob must retry (backoffLimit >= 1) and run `sweep ... --resume auto`")
    # Same overrides as cmd_sweep builds; load_search_space validates the space and every key.
    overrides = list(args.overrides) + ([f"data.root={args.data_root}"] if args.data_root else [])
    _, base, _ = load_search_space(args.space, overrides)
    storage = getattr(args, "storage_path", None) or base.get("storage_path")
    assert storage, f"{source}: `{command}` passes no storage path: trials on other nodes need shared storage"
    if source == TWO_NODE.name:
        assert storage == shell_defaults(TWO_NODE.read_text())["STORAGE_PATH"]
    else:
        assert storage.startswith(SHARED_MOUNT + "/"), f"{source}: storage {storage} is not on the shared mount {SHARED_MOUNT}"
        assert not args.data_root or args.data_root.startswith(SHARED_MOUNT + "/")


# ---------------------------------------------------------------------------------------------
# Tracking URI and shared storage on every node


def test_tracking_env_var_is_the_one_clusterlab_reads():
    from clusterlab.platform.tracking import TRACKING_URI_ENV

    assert TRACKING_URI_ENV == TRACKING_ENV


def docker_env(run_options: list[str]) -> dict[str, str]:
    env = {}
    for option in run_options:
        parts = shlex.split(option)
        for flag, value in zip(parts, parts[1:]):
            if flag in ("-e", "--env") and "=" in value:
                env.update([value.split("=", 1)])
    return env


def docker_volumes(run_options: list[str]) -> list[str]:
    parts = [p for option in run_options for p in shlex.split(option)]
    return [value for flag, value in zip(parts, parts[1:]) if flag in ("-v", "--volume")]


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_nodes_get_tracking_uri_and_shared_storage(cloud):
    config = load_one(LAUNCHERS[cloud])
    run_options = config["docker"]["run_options"]
    uri = docker_env(run_options).get(TRACKING_ENV, "")
    assert re.match(r"https?://", uri), f"{cloud}.yaml: docker run_options must set {TRACKING_ENV}=http://... (got {uri!r})"
    assert f"{SHARED_MOUNT}:{SHARED_MOUNT}" in docker_volumes(run_options), (
        f"{cloud}.yaml: the containers must mount the shared storage at {SHARED_MOUNT}")
    assert any(SHARED_MOUNT in cmd and "mount" in cmd for cmd in config["initialization_commands"]), (
        f"{cloud}.yaml: initialization_commands must mount the shared file system on the host")


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_pods_get_tracking_uri_and_the_shared_pvc(path):
    (pvc,) = [d for d in load_all(SHARED_PVC) if d.get("kind") == "PersistentVolumeClaim"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "pods on different nodes share the PVC: ReadWriteMany"
    doc = rayjob()["spec"]["rayClusterSpec"] if path == RAYJOB else raycluster()["spec"]
    for spec in pod_specs(doc):
        shared = [v["name"] for v in spec["volumes"]
                  if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]]
        assert shared, f"{path.name}: a pod does not mount PVC {pvc['metadata']['name']}"
        (ray_container,) = spec["containers"][:1]
        mounts = {m["name"]: m["mountPath"] for m in ray_container.get("volumeMounts", [])}
        assert mounts.get(shared[0]) == SHARED_MOUNT, f"{path.name}: {ray_container['name']} must mount it at {SHARED_MOUNT}"
        env = {e["name"]: e.get("value") for e in ray_container.get("env", [])}
        assert re.match(r"https?://", env.get(TRACKING_ENV) or ""), f"{path.name}: {ray_container['name']} lacks {TRACKING_ENV}"


# ---------------------------------------------------------------------------------------------
# KubeRay


def test_rayjob_runs_a_sweep_and_cleans_up():
    spec = rayjob()["spec"]
    assert spec["shutdownAfterJobFinishes"] is True, "the RayJob must delete its cluster when the job ends"
    assert isinstance(spec.get("ttlSecondsAfterFinished", 0), int) and spec.get("ttlSecondsAfterFinished", 0) >= 0
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "SidecarMode")
    assert spec["entrypoint"].split()[:2] == ["clusterlab", "sweep"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    pod_uri = {e["name"]: e["value"] for e in pod_specs(spec["rayClusterSpec"])[0]["containers"][0]["env"]}[TRACKING_ENV]
    assert runtime_env["env_vars"][TRACKING_ENV] == pod_uri, "runtimeEnvYAML and the pods name different MLflow servers"


def test_rayjob_cluster_is_the_raycluster():
    """One cluster definition in two files: the RayJob's must not drift from raycluster.yaml."""
    assert rayjob()["spec"]["rayClusterSpec"] == raycluster()["spec"]


def test_kuberay_gpu_workers():
    spec = raycluster()["spec"]
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups, "raycluster.yaml has no GPU worker group"
    for group in gpu_groups:
        # clusterlab checks the cluster's GPUs before a sweep starts: no scaling from zero.
        assert group["minReplicas"] >= 1 and group["maxReplicas"] >= group["minReplicas"]


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_config_passes_rays_schema(cloud):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_one(LAUNCHERS[cloud])
    assert config["provider"]["type"] == cloud
    validate_config(prepare_config(copy.deepcopy(config)))  # fills Ray's defaults, then its JSON schema


def worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_has_spot_gpu_workers(cloud):
    config = load_one(LAUNCHERS[cloud])
    gpu = {name: t for name, t in worker_types(config).items() if t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu, f"{cloud}.yaml: no worker node type with GPUs"
    for name, node_type in gpu.items():
        # clusterlab checks the cluster's GPUs before a sweep starts: no scaling from zero.
        assert node_type.get("min_workers", 0) >= 1, f"{cloud}.yaml: {name} needs min_workers >= 1"
        node_config = node_type["node_config"]
        if cloud == "aws":
            assert node_config["InstanceMarketOptions"]["MarketType"] == "spot", f"{name}: not a spot instance"
        else:
            scheduling = node_config["scheduling"]
            assert isinstance(scheduling, dict), f"{name}: GCP wants scheduling as a mapping, not a list"
            assert scheduling.get("preemptible") is True or scheduling.get("provisioningModel") == "SPOT"
            assert scheduling.get("onHostMaintenance") == "TERMINATE", "GPU VMs cannot live-migrate"
            assert node_config["guestAccelerators"][0]["acceleratorCount"] >= 1


# ---------------------------------------------------------------------------------------------
# docker/compose.yaml


def interpolate(value: str) -> str:
    """Compose's ${VAR}, ${VAR:-default} and $$ with no variables set."""
    value = re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)
    return value.replace("$$", "$")


def compose() -> dict[str, Any]:
    return load_one(COMPOSE)


def command_argv(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return [interpolate(str(a)) for a in (command if isinstance(command, list) else shlex.split(command))]


def test_compose_services_have_health_checks_and_named_volumes():
    config = compose()
    services, volumes = config["services"], config.get("volumes") or {}
    for name in ("postgres", "minio", "mlflow"):
        assert services[name].get("healthcheck", {}).get("test"), f"compose: {name} has no health check"
    for name in ("postgres", "minio"):
        sources = [str(v).split(":", 1)[0] for v in services[name].get("volumes", [])]
        assert any(s in volumes for s in sources), f"compose: {name}'s data is not in a named volume ({sources})"


def test_compose_mlflow_waits_for_its_stores_and_the_bucket():
    services = compose()["services"]
    depends = services["mlflow"]["depends_on"]
    for name in ("postgres", "minio"):
        assert depends[name]["condition"] == "service_healthy", f"mlflow must wait until {name} is healthy"
    one_shot = [n for n, s in services.items() if "mc mb" in " ".join(command_argv(s))]
    assert one_shot, "compose: no one-shot service creates the MinIO bucket"
    assert services[one_shot[0]]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert depends[one_shot[0]]["condition"] == "service_completed_successfully"


def test_compose_mlflow_command_is_valid_for_the_installed_mlflow():
    from mlflow.cli import server
    from mlflow.server.security_utils import is_allowed_host_header

    service = compose()["services"]["mlflow"]
    argv = command_argv(service)
    assert argv[:2] == ["mlflow", "server"], f"mlflow service command: {argv}"
    params = server.make_context("server", argv[2:]).params  # unknown flags / bad values raise here
    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which the image does not install.
    assert params["backend_store_uri"].startswith("postgresql+psycopg2://"), "the backend store must be the PostgreSQL service"
    assert "@postgres:" in params["backend_store_uri"]
    assert params["serve_artifacts"] and params["artifacts_destination"].startswith("s3://"), (
        "artifacts must be proxied by the server to the S3 store")
    assert service["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert params["host"] == "0.0.0.0", "workers on other machines must reach the server"
    allowed = [h.strip() for h in params["allowed_hosts"].split(",")]
    for host in (f"mlflow:{params['port']}", f"localhost:{params['port']}", f"127.0.0.1:{params['port']}",
                 f"172.31.5.6:{params['port']}", f"10.0.0.7:{params['port']}"):
        assert is_allowed_host_header(allowed, host), f"--allowed-hosts rejects Host {host!r}"


def test_compose_mlflow_server_is_the_locked_client_version():
    """Server and client install MLflow from the same pin, constraints.txt (that the client's
    environment runs it: tests/test_environment.py)."""
    service = compose()["services"]["mlflow"]
    build = service["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == ROOT, "the server's build context must hold constraints.txt"
    inline = build["dockerfile_inline"]
    copied = re.search(r"^COPY\s+constraints\.txt\s+(\S+)\s*$", inline, re.M)
    assert copied, "the server's image must COPY constraints.txt"
    (install,) = [shlex.split(ln) for ln in inline.splitlines() if "pip install" in ln]
    assert ["-c", copied.group(1)] in [install[i:i + 2] for i in range(len(install))], (
        f"the server must install with -c {copied.group(1)}, not {install}")
    assert "mlflow" in install, f"the server must install `mlflow` as constraints.txt pins it, not {install}"
    pinned = lock_pins()["mlflow"]
    assert split_image(service["image"])[1] == pinned, f"image {service['image']}: tag it with the pinned MLflow {pinned}"


def kube_mlflow(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in load_all(KUBE_MLFLOW) if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_kuberay_mlflow_server_is_where_the_pods_log():
    """cluster_configs/kuberay/mlflow.yaml ships the server the KubeRay pods' tracking URI names:
    its Service (name, namespace, port) resolves to that URI, the command is valid for the
    pinned MLflow and accepts that Host header, on the image compose builds from the lock."""
    from mlflow.cli import server
    from mlflow.server.security_utils import is_allowed_host_header

    service, deployment = kube_mlflow("Service", "mlflow"), kube_mlflow("Deployment", "mlflow")
    (port,) = service["spec"]["ports"]
    uris = {env["value"] for spec in pod_specs(raycluster()["spec"]) for c in spec["containers"]
            for env in c.get("env", []) if env["name"] == TRACKING_ENV}
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:{port['port']}"
    assert uris == {f"http://{host}"}, f"the pods log to {uris}, the shipped server is http://{host}"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert deployment["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    argv = container["command"]
    params = server.make_context("server", argv[2:]).params
    assert argv[:2] == ["mlflow", "server"] and params["port"] == port["targetPort"] == 5000
    assert params["backend_store_uri"].startswith("postgresql+psycopg2://") and "@postgres:5432/" in params["backend_store_uri"]
    assert "$(POSTGRES_PASSWORD)" in params["backend_store_uri"], "the password comes from the Secret, not the file"
    assert params["serve_artifacts"], "artifacts must be proxied by the server (pods need no store credentials)"
    assert is_allowed_host_header([h.strip() for h in params["allowed_hosts"].split(",")], host)
    name, tag = split_image(container["image"])
    assert name.rsplit("/", 1)[-1] == split_image(compose()["services"]["mlflow"]["image"])[0]
    assert tag == lock_pins()["mlflow"], f"{container['image']}: the server must run the pinned MLflow"


# ---------------------------------------------------------------------------------------------
# cluster_configs/local_two_node.sh


def test_local_two_node_script_is_valid_bash():
    text = TWO_NODE.read_text()
    assert "set -euo pipefail" in text
    result = subprocess.run(["bash", "-n", str(TWO_NODE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    usage = subprocess.run(["bash", str(TWO_NODE)], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "start|stop" in usage.stderr


def test_local_two_node_script_starts_head_and_worker_and_stops_only_them():
    text = TWO_NODE.read_text()
    code = "\n".join(line.split("#", 1)[0] if line.lstrip().startswith("#") else line for line in text.splitlines())
    assert re.search(r"ray start --head\b", code) and "--node-ip-address=127.0.0.1" in code
    resources = [yaml.safe_load(r) for r in re.findall(r"--resources='([^']*)'", code)]
    assert {"head_node": 1} in resources and {"worker_node": 1} in resources
    assert re.search(r'--address="\$GCS_ADDRESS"', code)
    assert re.search(r"^\s*stop\)", code, re.M) and re.search(r"^\s*start\)", code, re.M)
    assert not re.search(r"^\s*ray stop\b", code, re.M), "`ray stop` would stop every Ray on the machine"
    assert "RAY_ADDRESS=" in text and f"export {TRACKING_ENV}=" in text
