"""The ready cluster configs (cluster/configs) against what reads them: Ray's launcher schema and
config preparation, the KubeRay RayJob CRD's required shape, Ray's runtime-env validation and
packaging, and our own CLI parser and recipe loader for every command they run."""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import json
import re
import shlex
import zipfile
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

from cluster.jobs import check_merge_job, load_runtime_env, merge_entrypoint, refuse_credentials, submit_merge
from cluster.jobs import main as jobs_main
from modelstock.errors import InvalidRecipe
from modelstock.recipe import load_recipe
from pipeline.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "cluster" / "configs"
LAUNCHER_CONFIGS = ["aws-gpu.yaml", "gcp-gpu.yaml"]
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            pins[name.lower()] = version
    return pins


def _extras() -> set[str]:
    return set(importlib.metadata.metadata("modelstock").get_all("Provides-Extra") or ())


def _launcher(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def _pip_installs(commands: list[str]) -> list[list[str]]:
    """The argument lists of the `pip install` commands, in order."""
    installs = []
    for command in commands:
        words = shlex.split(command)
        for i in range(len(words) - 1):
            if words[i] == "pip" and words[i + 1] == "install":
                installs.append(words[i + 2:])
    return installs


def _requirement_names(args: list[str]) -> set[str]:
    names = set()
    for spec in _requirements(args):
        with contextlib.suppress(InvalidRequirement):  # a path, e.g. the project's own folder
            names.add(Requirement(spec).name)
    return names


def _requirements(args: list[str]) -> list[str]:
    """Positional arguments of one `pip install` (flag values skipped)."""
    takes_value = {"-c", "--constraint", "-r", "--requirement", "--index-url", "-i", "--extra-index-url"}
    specs, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in takes_value:
            skip = True
        elif not arg.startswith("-"):
            specs.append(arg)
    return specs


# --- Ray cluster launcher YAMLs -------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_validates_against_rays_schema(name: str) -> None:
    schema = json.loads(RAY_SCHEMA.read_text())
    config = _launcher(name)
    jsonschema.validate(config, schema)
    # What `ray up` itself does: merge the provider's defaults, then validate the result.
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_schema_check_is_live(name: str) -> None:
    schema = json.loads(RAY_SCHEMA.read_text())
    broken = _launcher(name)
    worker = next(t for t in broken["available_node_types"] if t != broken["head_node_type"])
    broken["available_node_types"][worker]["resources"]["GPU"] = "1"  # must be an integer
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def _has_gpu_hardware(provider: str, node_config: dict) -> bool:
    if provider == "aws":
        return node_config["InstanceType"].split(".")[0] in {"g4dn", "g5", "g6", "g6e", "p3", "p4d", "p4de", "p5"}
    machine = node_config["machineType"]
    return machine.split("-")[0] in {"g2", "a2", "a3"} or bool(node_config.get("guestAccelerators"))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_has_cpu_head_and_gpu_workers(name: str) -> None:
    config = _launcher(name)
    provider = config["provider"]["type"]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head.get("max_workers", 0) == 0 and head["resources"].get("GPU", 0) == 0
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker node type"
    for node_type in gpu_types.values():
        assert _has_gpu_hardware(provider, node_type["node_config"]), node_type["node_config"]
        # The driver chooses GPU tasks from the GPUs present at start: at least one must be up.
        assert 1 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]
        if provider == "gcp":
            assert node_type["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"
            assert node_type["resources"].get("CPU", 0) >= 1  # GCE does not autodetect resources


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_installs_this_project_with_pinned_torch(name: str) -> None:
    config = _launcher(name)
    pins = _pins()
    mounts = {remote: (REPO / local).resolve() for remote, local in config["file_mounts"].items()}
    remote_repo = next(remote for remote, local in mounts.items() if local == REPO)
    assert {".venv", ".git"} <= set(config["rsync_exclude"])
    if "docker" in config:
        ray_version = config["docker"]["image"].split(":")[1].split("-")[0]
        assert ray_version == pins["ray"] == ray.__version__

    project_home = remote_repo.replace("~", "$HOME", 1)
    for role, commands in (("head", config["setup_commands"] + config["head_setup_commands"]),
                           ("worker", config["setup_commands"] + config["worker_setup_commands"])):
        installs = _pip_installs(commands)
        torch_at = next(i for i, args in enumerate(installs) if "torch" in _requirement_names(args))
        torch_spec = next(s for s in _requirements(installs[torch_at]) if s.startswith("torch"))
        assert Requirement(torch_spec).specifier == Requirement(f"torch=={pins['torch']}").specifier
        cpu_index = "https://download.pytorch.org/whl/cpu" in installs[torch_at]
        assert cpu_index == (role == "head"), f"{role}: CPU torch on the head only, CUDA torch on GPU workers"

        project_at = next(i for i, args in enumerate(installs) if any(
            a.startswith(project_home) for a in args))
        assert torch_at < project_at, f"{role}: torch must be pinned before the project pulls a default one"
        args = installs[project_at]
        assert "-e" in args and f"{project_home}/constraints.txt" in args
        spec = next(a for a in args if a.startswith(project_home + "["))
        extras = set(spec[spec.index("[") + 1:spec.index("]")].split(","))
        assert extras <= _extras() and "jobs" in extras


# --- who gets in: Ray token authentication (issue #14) -------------------------------------------


def _ray_starts(commands: list[str]) -> list[tuple[dict[str, str], dict]]:
    """Each `ray start` in ``commands``: the variables its command line assigns, and its
    parameters as Ray's own CLI parses them."""
    from ray.scripts.scripts import start

    found = []
    for command in commands:
        for part in command.split(";"):
            words = shlex.split(part)
            env = {}
            while words and "=" in words[0] and not words[0].startswith("-"):
                key, _, value = words.pop(0).partition("=")
                env[key] = value
            if words[:2] == ["ray", "start"]:
                found.append((env, start.make_context("start", words[2:]).params))
    return found


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_starts_every_node_with_token_auth_and_the_job_api_on_loopback(name: str) -> None:
    config = _launcher(name)
    head_starts = _ray_starts(config["head_start_ray_commands"])
    worker_starts = _ray_starts(config["worker_start_ray_commands"])
    assert len(head_starts) == 1 and len(worker_starts) == 1
    (head_env, head), (worker_env, _) = head_starts[0], worker_starts[0]
    assert head["head"] and head["dashboard_host"] == "127.0.0.1"  # reached through `ray dashboard`'s tunnel
    token_paths = set()
    for env in (head_env, worker_env):
        assert env["RAY_AUTH_MODE"] == "token"
        assert "RAY_AUTH_TOKEN" not in env, "a token on a command line shows in logs and `ps`"
        token_paths.add(env["RAY_AUTH_TOKEN_PATH"].replace("$HOME", "~", 1))
    assert len(token_paths) == 1, "head and workers must read the same token"
    token_path = PurePosixPath(token_paths.pop())

    # The head makes the token once (reruns of `ray up` keep it), readable by its user only, and
    # prints nothing...
    makers = [command for command in config["head_setup_commands"] if str(token_path) in command]
    assert len(makers) == 1
    assert "umask 077" in makers[0] and f"test -s {token_path}" in makers[0] and f"> {token_path}" in makers[0]
    # ...into a file mount, which the autoscaler copies from the head to each worker it starts. The
    # mount's source here holds no token.
    source = REPO / config["file_mounts"][str(token_path.parent)]
    assert sorted(path.name for path in source.iterdir()) == [".gitignore", "README.md"]
    # The header shows submitters how to fetch exactly that file.
    fetches = [words for words in _documented_commands(CONFIGS / name) if words[:2] == ["ray", "rsync-down"]]
    assert [words[2:4] for words in fetches] == [[f"cluster/configs/{name}", str(token_path)]]
    assert "RAY_AUTH_MODE=disabled" not in (CONFIGS / name).read_text()


def test_rayjob_turns_on_token_auth_from_a_kuberay_secret() -> None:
    job, _ = _rayjob_documents()
    cluster = job["spec"]["rayClusterSpec"]
    # KubeRay >= 1.5.1 makes a Secret with a random token for the cluster and hands it to every Ray
    # container, the autoscaler and the job submitter (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN).
    assert cluster["authOptions"]["mode"] == "token"
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    pod_specs = [group["template"]["spec"] for group in groups]
    if "submitterPodTemplate" in job["spec"]:
        pod_specs.append(job["spec"]["submitterPodTemplate"]["spec"])
    for container in (c for spec in pod_specs for c in spec["containers"]):
        env = {variable["name"]: variable for variable in container.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {"value": "token"}).get("value") == "token", container["name"]
        assert "value" not in env.get("RAY_AUTH_TOKEN", {}), "a token in the manifest is readable by all who read it"
    # Neither the runtime env nor the entrypoint, both shown by the dashboard, carries a credential.
    refuse_credentials(yaml.safe_load(job["spec"]["runtimeEnvYAML"]), shlex.split(job["spec"]["entrypoint"])[2:])


# --- KubeRay RayJob -----------------------------------------------------------------------------


def _rayjob_documents() -> tuple[dict, dict[str, dict]]:
    documents = [d for d in yaml.safe_load_all((CONFIGS / "rayjob.yaml").read_text()) if d]
    jobs = [d for d in documents if d["kind"] == "RayJob"]
    assert len(jobs) == 1
    config_maps = {d["metadata"]["name"]: d for d in documents if d["kind"] == "ConfigMap"}
    return jobs[0], config_maps


def _string_map(params: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, str) for k, v in params.items())


def test_rayjob_has_the_fields_the_crd_requires() -> None:
    job, _ = _rayjob_documents()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec.get("submissionMode", "K8sJobMode") in {"K8sJobMode", "HTTPMode", "InteractiveMode"}
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__ == _pins()["ray"]

    head = cluster["headGroupSpec"]
    assert _string_map(head["rayStartParams"])  # the CRD types rayStartParams as map[string]string
    head_containers = head["template"]["spec"]["containers"]
    assert head_containers and all(c["name"] and c["image"] for c in head_containers)

    groups = cluster["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups)
    gpu_groups = []
    for group in groups:
        assert group["groupName"] and _string_map(group["rayStartParams"])
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["name"] and c["image"] for c in containers)
        for container in containers:
            resources = container.get("resources", {})
            gpus = resources.get("limits", {}).get("nvidia.com/gpu")
            if gpus is not None:
                # Kubernetes: an extended resource's request, if given, must equal its limit.
                assert int(gpus) >= 1 and resources.get("requests", {}).get("nvidia.com/gpu", gpus) == gpus
                gpu_groups.append(group)
    assert gpu_groups, "no worker group with nvidia.com/gpu limits"
    assert all(g["minReplicas"] >= 1 for g in gpu_groups)
    for container in head_containers + [c for g in groups for c in g["template"]["spec"]["containers"]]:
        assert container["image"].split(":")[1].startswith(ray.__version__ + "-")


def test_rayjob_entrypoint_is_a_valid_merge_of_the_mounted_recipe(tmp_path: Path) -> None:
    job, config_maps = _rayjob_documents()
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["modelstock", "merge"]
    args = build_parser().parse_args(argv[1:])
    assert args.command == "merge" and "://" in args.out_url  # pods' disks vanish with the cluster

    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head.get("volumes", [])}
    recipe_path = PurePosixPath(args.config)
    mounts = [m for c in head["containers"] for m in c.get("volumeMounts", [])
              if recipe_path.is_relative_to(m["mountPath"])]
    assert len(mounts) == 1, f"{recipe_path} is not on a volume mounted in the head"
    config_map = config_maps[volumes[mounts[0]["name"]]["configMap"]["name"]]
    key = recipe_path.relative_to(mounts[0]["mountPath"]).as_posix()
    recipe_file = tmp_path / key
    recipe_file.write_text(config_map["data"][key])
    recipe = load_recipe(recipe_file)
    assert recipe.merge_method == "model_stock"


def test_rayjob_runtime_env_installs_project_and_pinned_torch() -> None:
    job, _ = _rayjob_documents()
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)  # Ray's own validation of every field
    requirements = {Requirement(r).name: Requirement(r) for r in runtime_env["pip"]}
    assert requirements["torch"].specifier == Requirement(f"torch=={_pins()['torch']}").specifier
    project = requirements["modelstock"]
    assert project.url and project.extras <= _extras()
    assert _string_map(runtime_env.get("env_vars", {}))


# --- runtime_env.yaml for `ray job submit --runtime-env` ----------------------------------------


def test_runtime_env_file_validates_and_uploads_a_small_checkout(tmp_path: Path) -> None:
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package

    runtime_env = load_runtime_env(CONFIGS / "runtime_env.yaml")
    RuntimeEnv(**runtime_env)
    assert _string_map(runtime_env["env_vars"])
    refuse_credentials(runtime_env, [])  # the dashboard shows a job's runtime env
    for spec in runtime_env.get("pip", []):
        assert Requirement(spec).name not in {"torch", "ray"}, "the cluster's torch and Ray must not be replaced"

    # The working dir is relative to where `ray job submit` runs: the repository root.
    package = tmp_path / "working_dir.zip"
    create_package(str(REPO / runtime_env["working_dir"]), package, include_gitignore=True,
                   excludes=runtime_env["excludes"])
    assert package.stat().st_size < GCS_STORAGE_MAX_SIZE
    names = zipfile.ZipFile(package).namelist()
    assert {"pyproject.toml", "pipeline/cli/__init__.py", "modelstock/recipe.py"} <= set(names)
    assert not [n for n in names if n.split("/")[0] in {".git", ".venv"} or "__pycache__" in n]


def _documented_commands(path: Path) -> list[list[str]]:
    """Shell commands shown in a YAML file's comments or a Markdown file's code blocks."""
    lines = path.read_text().splitlines()
    if path.suffix == ".md":
        code, inside = [], False
        for line in lines:
            if line.strip().startswith("```"):
                inside = not inside
            elif inside:
                code.append(line)
    else:
        code = [line.strip().lstrip("#") for line in lines if line.strip().startswith("#")]
    commands, current = [], ""
    for line in code:
        text = line.strip()
        if not current and text.split(" ")[0] not in {"ray", "modelstock", "python", "kubectl"}:
            continue  # prose
        current = f"{current} {text}".strip()
        if current.endswith("\\"):
            current = current[:-1]
            continue
        commands.append(shlex.split(current, comments=True))
        current = ""
    return commands


def _check_merge(argv: list[str] | tuple[str, ...]) -> None:
    assert list(argv[:2]) == ["modelstock", "merge"], argv
    assert build_parser().parse_args(list(argv[1:])).command == "merge"


@pytest.mark.parametrize("name", [*LAUNCHER_CONFIGS, "runtime_env.yaml", "rayjob.yaml", "../README.md"])
def test_documented_commands_use_real_flags_and_files(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.dashboard.modules.job.cli import job_cli_group

    from cluster.jobs import parse_command_line

    monkeypatch.chdir(REPO)  # the docs say: run from the repository root
    commands = _documented_commands(CONFIGS / name)
    assert commands, f"{name} shows no command"
    for words in commands:
        if words[:3] == ["ray", "job", "submit"]:
            context = job_cli_group.commands["submit"].make_context("submit", words[3:])
            _check_merge(context.params["entrypoint"])
            if context.params["runtime_env"]:
                assert Path(context.params["runtime_env"]).is_file()
        elif words[:2] == ["modelstock", "merge"]:
            _check_merge(words)
        elif words[:3] == ["python", "-m", "cluster.jobs"]:
            _check_merge(["modelstock", "merge", *parse_command_line(words[3:]).merge_args, "r.yml", "s3://b/o"])
        elif words[:2] in (["ray", "up"], ["ray", "down"], ["ray", "dashboard"]):
            assert (REPO / words[-1]).is_file(), words
        elif words[:2] == ["ray", "rsync-down"]:
            assert (REPO / words[2]).is_file(), words
        elif words[:2] == ["kubectl", "apply"]:
            assert (REPO / words[words.index("-f") + 1]).is_file(), words


# --- cluster.jobs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("out_url", ["s3://bucket/merged", "/tmp/a folder/with 'quotes'"])
def test_merge_entrypoint_round_trips_through_the_cli_parser(out_url: str) -> None:
    entrypoint = merge_entrypoint("recipe.yml", out_url, ["--shard-size", "5GB", "--overwrite"])
    argv = shlex.split(entrypoint)
    assert argv[0] == "modelstock"
    args = build_parser().parse_args(argv[1:])
    assert (args.config, args.out_url, args.shard_size, args.overwrite) == ("recipe.yml", out_url, 5 * 10**9, True)


def test_submit_merge_refuses_recipes_it_cannot_ship(tmp_path: Path) -> None:
    # Checked before any connection: no cluster is listening at this address.
    address = "http://127.0.0.1:9"
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("merge_method: model_stock\n")
    with pytest.raises(InvalidRecipe, match="not found"):
        submit_merge(address, tmp_path / "missing.yml", "s3://b/out")
    with pytest.raises(InvalidRecipe, match="inside the working dir"):
        submit_merge(address, recipe, "s3://b/out", runtime_env={"working_dir": str(tmp_path / "elsewhere")})
    with pytest.raises(InvalidRecipe, match="remote working dir"):
        submit_merge(address, recipe, "s3://b/out", runtime_env={"working_dir": "s3://b/code.zip"})


@pytest.mark.parametrize(("runtime_env", "merge_args", "named"), [
    ({"env_vars": {"AWS_SECRET_ACCESS_KEY": "x"}}, [], "env_vars.AWS_SECRET_ACCESS_KEY"),
    ({"env_vars": {"RAY_AUTH_TOKEN": "x"}}, [], "env_vars.RAY_AUTH_TOKEN"),
    ({"env_vars": {"HF_TOKEN": "x"}}, [], "env_vars.HF_TOKEN"),
    ({}, ["--storage-options", '{"key": "a", "secret": "b"}'], "--storage-options: key "),
    ({}, ['--storage-options={"client_kwargs": {"aws_session_token": "t"}}'], "client_kwargs.aws_session_token"),
    ({}, ["--shard-size", "5GB", "--storage-options", '{"account_key": "k"}'], "account_key"),
])
def test_submit_merge_keeps_credentials_out_of_what_the_dashboard_shows(
    tmp_path: Path, runtime_env: dict, merge_args: list[str], named: str,
) -> None:
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("merge_method: model_stock\n")
    # Refused before any connection: no cluster is listening at this address.
    with pytest.raises(InvalidRecipe, match=re.escape(named)):
        submit_merge("http://127.0.0.1:9", recipe, "s3://b/out", runtime_env=runtime_env, merge_args=merge_args)


def test_job_checks_let_ordinary_settings_through(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("merge_method: model_stock\n")
    env_vars = {"PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "10", "MALLOC_ARENA_MAX": "2", "KEYCLOAK_URL": "x"}
    options = '{"profile": "merge", "anon": false, "client_kwargs": {"endpoint_url": "http://x"}}'
    assert check_merge_job(recipe, {"env_vars": env_vars}, ["--storage-options", options]) is None


def test_jobs_cli_bad_recipe_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = jobs_main(["--address", "http://127.0.0.1:9", str(tmp_path / "missing.yml"), "s3://b/out",
                      "--", "--shard-size", "5GB"])
    assert code == 2
    assert "recipe file not found" in capsys.readouterr().err


def test_readme_names_only_existing_configs() -> None:
    readme = (REPO / "cluster" / "README.md").read_text()
    named = {word.strip("`'\"(),.") for word in readme.split() if "cluster/configs/" in word}
    assert named, "cluster/README.md names no config"
    for path in named:
        assert (REPO / path[path.index("cluster/configs/"):]).is_file(), path
    for config in LAUNCHER_CONFIGS + ["rayjob.yaml", "runtime_env.yaml"]:
        assert f"cluster/configs/{config}" in readme
