"""The documentation: the store it shows works, and what it states matches the code.

The resolver page shows the HTTP store (which tests/test_http_store.py and the store contract
run) and says what a new store touches, and its testing script runs as the page prints it; the
configuration, metrics and troubleshooting pages (and the README's list of plugins) are checked
against the variables, stores, metrics, error messages and log lines the package really has; the
Kubernetes page shows every manifest of deploy/kubernetes and the Dockerfile (what the manifests
do is tests/test_kubernetes.py's), and the alert rules use real metrics and outcomes; what the
pages say of vLLM (the paths ``--api-key`` guards, its
adapter routes, its warnings about our variables, its logging configuration) is checked against the
installed vLLM; and the site builds with ``mkdocs build --strict``.
"""

from __future__ import annotations

import ast
import errno
import fnmatch
import importlib.util
import inspect
import logging
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx2
import pytest
import yaml
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
from conftest import BASE_MODEL, REPO
from google.api_core import exceptions as google_api_errors
from google.auth import exceptions as google_auth_errors
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from image_recipe import image_recipe
from prometheus_client import Counter, Gauge, Histogram

from devtools.models import write_lora_adapter
from vllm_lora_resolvers import config, configured, metrics, plugin, recording, stores, sync
from vllm_lora_resolvers.adapter import (
    AdapterPolicy,
    LoraAdapterConfig,
    check_adapter_config,
    check_torch_pickle,
    parse_adapter_config,
)
from vllm_lora_resolvers.backends import gcs, hf_hub, s3
from vllm_lora_resolvers.backends.base import Store
from vllm_lora_resolvers.cache import NodeCache, cache_write_error
from vllm_lora_resolvers.cli.sync import LOG_FORMAT as SYNC_LOG_FORMAT
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.edge import VllmResolver
from vllm_lora_resolvers.errors import (
    StoreRefusedError,
)
from vllm_lora_resolvers.resolver import Resolver

DOCS = REPO / "docs"
HTTP_MODULE = REPO / "src" / "vllm_lora_resolvers" / "backends" / "http.py"
OUR_VARIABLE = re.compile(r"VLLM_LORA_RESOLVER_[A-Z0-9_]+")
METRIC_NAME = re.compile(r"(?<![#\w])vllm_lora_resolver_[a-z_]+")  # not an anchor (#...)
SYNC_METRIC_NAME = re.compile(r"(?<![#\w])vllm_lora_sync_[a-z_]+")


def page(name: str) -> str:
    return (DOCS / name).read_text()


# -- the HTTP store, the resolver page's example ---------------------------------------------


def test_the_resolver_page_shows_the_http_store_and_lists_what_a_new_store_touches() -> None:
    text = page("writing-a-resolver.md")
    assert f'--8<-- "{HTTP_MODULE.relative_to(REPO)}"' in text
    assert stores.HTTP.module == "vllm_lora_resolvers.backends.http"
    section = text.split("## Adding a store to this package", 1)[1].split("\n## ", 1)[0]
    touched = re.findall(r"^\d\. \*\*(.+?)\*\*", section, re.M)
    assert touched == [
        "The store module",
        "Its row in `src/vllm_lora_resolvers/stores.py`",
        "`pyproject.toml`",
        "One docs page, `docs/configuration.md`",
    ]


# -- the configuration reference -------------------------------------------------------------


def reference_rows() -> dict[str, str]:
    """``variable -> default`` from the reference table (the first) of the configuration page."""
    table = page("configuration.md").split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \| ([^|]+) \|", table, re.M)
    return {name: default.strip() for name, default in rows}


def test_configuration_page_lists_exactly_the_variables_of_config() -> None:
    rows = reference_rows()
    assert list(rows) == [variable.name for variable in stores.ALL_VARIABLES]


def test_configuration_page_states_each_default_as_config_does() -> None:
    rows = reference_rows()
    for variable in stores.ALL_VARIABLES:
        assert rows[variable.name] == variable.default, variable.name


def test_configuration_page_has_a_section_per_variable() -> None:
    sections = re.findall(r"^### `([A-Z0-9_]+)`$", page("configuration.md"), re.M)
    assert sections == [variable.name for variable in stores.ALL_VARIABLES]


def variables_read_by_others() -> dict[str, set[str]]:
    """``reader -> the variables it reads`` from the configuration page's "Read by others" table."""
    table = page("configuration.md").split("\n## Read by others", 1)[1].split("\n## ", 1)[0]
    readers: dict[str, set[str]] = {}
    for names, reader in re.findall(r"^\| (`[^|]+) \| ([^|]+) \|", table, re.M):
        readers.setdefault(reader.strip(), set()).update(re.findall(r"`([A-Z0-9_]+)`", names))
    return readers


def test_configuration_page_names_each_stores_client_and_every_variable_doctor_shows() -> None:
    readers = variables_read_by_others()
    for store in stores.STORES:
        if store.client_package is not None:
            assert set(store.environment) <= readers[store.client_package], store.backend


def store_rows() -> list[list[str]]:
    """The cells of each row of the configuration page's table of stores."""
    table = page("configuration.md").split("\n## Stores\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (`lora_\w+`.*) \|$", table, re.M)
    return [[cell.strip() for cell in row.split(" | ")] for row in rows]


def test_the_table_of_stores_lists_every_store_in_the_order_its_resolvers_are_tried() -> None:
    rows = store_rows()
    assert [row[0] for row in rows] == [f"`{store.plugin}`" for store in stores.STORES]
    assert configured.DEFAULT_ORDER[: len(rows)] == tuple(store.plugin for store in stores.STORES)
    for (_, _, enabled_by, backend), store in zip(rows, stores.STORES, strict=True):
        assert f"`{store.variable.name}`" in enabled_by, store.plugin
        assert backend == f"`{store.backend}`", store.plugin


def test_configuration_page_shows_each_stores_example_value() -> None:
    table = page("configuration.md").split("\n## ", 1)[0]
    examples = dict(re.findall(r"^\| `([A-Z0-9_]+)` \| [^|]+ \| `([^`]+)` \|$", table, re.M))
    for store in stores.STORES:
        assert examples[store.variable.name] == store.example, store.backend


def test_no_page_lists_the_plugins_but_the_table_of_stores() -> None:
    for path in pages_and_readme():
        tables = re.findall(r"^\| plugin \(entry point\) \|", path.read_text(), re.M)
        assert len(tables) == (path.name == "configuration.md"), path.name


def test_the_overview_links_every_quickstart() -> None:
    linked = re.findall(r"\]\(quickstart/([\w-]+\.md)\)", page("index.md"))
    assert sorted(linked) == sorted(path.name for path in (DOCS / "quickstart").glob("*.md"))


#: How the pages call each store ``vllm-lora publish`` writes to.
BUCKET_TITLES = {"s3": "S3", "gcs": "GCS", "azure": "Azure"}


def sentences(text: str) -> Iterator[str]:
    """The sentences (and headings, table rows, list items) of a page, each on one line."""
    for block in re.split(r"\n\s*\n|\n(?=#|\||- )", text):
        yield from re.split(r"(?<=[.;])\s+(?=[A-Z`(\[])", " ".join(block.split()))


def test_what_the_pages_say_of_publishing_and_pins_names_every_store_that_has_them() -> None:
    """A list of stores ("S3 and GCS") in a sentence about publishing or ``@VERSION`` pins names
    every store ``vllm-lora publish`` writes to."""
    assert set(BUCKET_TITLES) == {store.backend for store in stores.STORES if store.bucket}
    buckets = set(BUCKET_TITLES.values())
    title = "|".join(sorted(buckets))
    listing = re.compile(rf"\b(?:{title})(?:(?:, | and | or |, and )(?:{title})\b)+")
    checked = 0
    for path in pages_and_readme():
        for sentence in sentences(path.read_text()):
            if re.search(r"publish|@VERSION|\bpins?\b", sentence, re.I):
                for listed in listing.findall(sentence):
                    assert set(re.findall(title, listed)) == buckets, f"{path.name}: {sentence}"
                    checked += 1
    assert checked >= 4


def pages_and_readme() -> list[Path]:
    return [*sorted(DOCS.rglob("*.md")), REPO / "README.md"]


def test_no_page_installs_the_package_from_an_index_but_the_wheel_make_dist_builds() -> None:
    """The package is on no index yet: a page that pip-installs it by name would install
    nothing, or whatever someone else published under that name."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wheel = f"dist/vllm_lora_resolvers-{project['version']}-py3-none-any.whl"
    installs = 0
    for path in pages_and_readme():
        for command in re.findall(r"pip install ([^\n]*)", path.read_text()):
            assert not re.search(r"(?<![\w/*.-])vllm-lora-resolvers\b", command), (path, command)
            for pattern in re.findall(r"(\S*\.whl)", command):
                assert fnmatch.fnmatch(wheel, pattern), (path, pattern)
                installs += 1
    assert installs >= 6  # the README's, each quickstart's, the Kubernetes page's


def test_no_page_or_manifest_names_a_variable_config_lacks() -> None:
    known = {variable.name for variable in stores.ALL_VARIABLES}
    for path in [*sorted(DOCS.rglob("*")), *sorted((REPO / "deploy").rglob("*"))]:
        if path.suffix in (".md", ".yaml", ".py"):
            unknown = set(OUR_VARIABLE.findall(path.read_text())) - known
            assert not unknown, f"{path.relative_to(REPO)} names {sorted(unknown)}"


def environment_reads(source: str) -> list[str]:
    """Reads of our variables from the environment in ``source``, as ``line: code``.

    Flags ``os.environ[...]``, ``os.environ.get/pop/setdefault(...)`` and ``os.getenv(...)``
    (also through ``from os import environ, getenv``) whose key is a ``VLLM_LORA_RESOLVER_*``
    literal or f-string, or a ``Variable``'s ``.name``.
    """

    def our_key(node: ast.expr) -> bool:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value.startswith("VLLM_LORA_RESOLVER_")
        if isinstance(node, ast.JoinedStr) and node.values:
            return our_key(node.values[0])
        return isinstance(node, ast.Attribute) and node.attr == "name"

    def is_environ(node: ast.expr) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
            isinstance(node, ast.Name) and node.id == "environ"
        )

    found = []
    for node in ast.walk(ast.parse(source)):
        key: ast.expr | None = None
        read: ast.expr | None = None
        if isinstance(node, ast.Subscript) and is_environ(node.value):
            key, read = node.slice, node
        elif isinstance(node, ast.Call) and node.args:
            function = node.func
            getenv = (isinstance(function, ast.Attribute) and function.attr == "getenv") or (
                isinstance(function, ast.Name) and function.id == "getenv"
            )
            environ_method = (
                isinstance(function, ast.Attribute)
                and function.attr in ("get", "pop", "setdefault")
                and is_environ(function.value)
            )
            if getenv or environ_method:
                key, read = node.args[0], node
        if key is not None and read is not None and our_key(key):
            found.append(f"{read.lineno}: {ast.unparse(read)}")
    return found


def test_only_config_reads_our_variables_from_the_environment() -> None:
    package = REPO / "src" / "vllm_lora_resolvers"
    offenders = {
        str(path.relative_to(REPO)): reads
        for path in sorted(package.rglob("*.py"))
        if path.name != "config.py" and (reads := environment_reads(path.read_text()))
    }
    assert not offenders


@pytest.mark.parametrize(
    "code",
    [
        'os.environ["VLLM_LORA_RESOLVER_CACHE_DIR"]',
        'os.environ.get("VLLM_LORA_RESOLVER_S3_URI", "")',
        'os.getenv("VLLM_LORA_RESOLVER_MAX_RANK")',
        'getenv(f"VLLM_LORA_RESOLVER_{suffix}")',
        "environ.get(CACHE_DIR.name)",
        'os.environ.pop("VLLM_LORA_RESOLVER_NEGATIVE_TTL")',
    ],
)
def test_the_environment_scan_finds_a_read_of_our_variable(code: str) -> None:
    assert environment_reads(f"value = {code}\n") == [f"1: {ast.unparse(ast.parse(code))}"]


def test_the_environment_scan_ignores_other_variables_and_mere_mentions() -> None:
    source = (
        'os.environ.get("HF_ENDPOINT")\n'
        'message = "set VLLM_LORA_RESOLVER_CACHE_DIR to a writable directory"\n'
        'settings.get("VLLM_LORA_RESOLVER_S3_URI")\n'
    )
    assert environment_reads(source) == []


# -- metrics and the log line ----------------------------------------------------------------


def exposed_names(module: ModuleType = metrics) -> dict[str, set[str]]:
    """Each metric of ``module`` (`metrics`, or `sync`'s) -> the names it is exposed under."""
    suffixes = {
        "counter": ["_total"],
        "gauge": [""],
        "histogram": ["", "_bucket", "_sum", "_count"],
    }
    exposed = {}
    for value in vars(module).values():
        if isinstance(value, Counter | Gauge | Histogram | metrics.NodeCacheCollector):
            for family in value.describe():
                exposed[family.name] = {family.name + s for s in suffixes[family.type]}
    return exposed


def test_metrics_page_documents_every_metric() -> None:
    documented = set(re.findall(METRIC_NAME, page("metrics.md")))
    for name, names in exposed_names().items():
        assert documented & names, f"{name} is not documented"
    assert len(exposed_names()) == 7


def test_no_page_names_a_metric_that_does_not_exist() -> None:
    real = set().union(*exposed_names().values())
    for path in sorted(DOCS.rglob("*.md")):
        documented = set(re.findall(METRIC_NAME, path.read_text()))
        assert documented <= real, f"{path.name}: {sorted(documented - real)}"


def test_metrics_page_documents_every_outcome() -> None:
    rows = re.findall(r"^\| `([a-z]+)` \|", page("metrics.md"), re.M)
    assert set(metrics.OUTCOMES) <= set(rows)


def test_metrics_page_shows_the_real_log_line_of_a_resolution(
    fs_resolver: Any, adapters_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_lora_adapter(adapters_dir / "sql-expert", base_model=BASE_MODEL)
    with caplog.at_level(logging.INFO, logger="vllm.lora_resolvers"):
        fs_resolver.resolve(BASE_MODEL, "sql-expert")
    (record,) = [r for r in caplog.records if r.getMessage().startswith("resolution ")]
    text = page("metrics.md")
    assert f"\n{record.msg}\n" in text  # the format, verbatim
    shape = re.sub(r"%(\.\d+)?[srdf]", "__VALUE__", re.escape(record.msg))
    shape = shape.replace("__VALUE__", r"\S+")
    assert re.search(f"^{shape}$", text, re.M), "no example line of that shape"


def outcomes_named(listed: str) -> set[str]:
    return set(re.findall(r"`(\w+)`", listed))


def test_the_pages_state_the_level_each_resolution_is_logged_at() -> None:
    at_info = set(recording.LOGGED_AT_INFO)
    at_debug = set(metrics.OUTCOMES) - at_info
    metrics_page = " ".join(page("metrics.md").split())
    ((info, debug),) = re.findall(r"- ([^.;]*) are logged at INFO; ([^.;]*) at DEBUG", metrics_page)
    assert (outcomes_named(info), outcomes_named(debug)) == (at_info, at_debug)
    runbook = " ".join(page("troubleshooting.md").split())
    ((info, debug),) = re.findall(
        r"At INFO \(the default\) you see the start-up lines, (.*?) resolutions, evictions, and "
        r"warnings; (.*?) resolutions are DEBUG",
        runbook,
    )
    assert (outcomes_named(info), outcomes_named(debug)) == (at_info, at_debug)
    (debug,) = re.findall(r"`DEBUG` also shows the (.*?) resolutions", page("configuration.md"))
    assert outcomes_named(debug) == at_debug


def test_a_refused_resolution_is_logged_at_info_and_a_hit_at_debug(
    fs_resolver: Any,
    adapters_dir: Path,
    cache_dir: Path,
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    write_lora_adapter(adapters_dir / "sql-expert", base_model=BASE_MODEL)
    store = RefusingStore("s3://my-adapters/prod", make_settings(), NodeCache(cache_dir))
    with caplog.at_level(logging.DEBUG, logger="vllm.lora_resolvers"):
        fs_resolver.resolve(BASE_MODEL, "sql-expert")
        fs_resolver.resolve(BASE_MODEL, "sql-expert")
        with pytest.raises(StoreRefusedError):
            Resolver(store).resolve(BASE_MODEL, "sql-expert")
    levels = {
        record.getMessage().split(" outcome=")[1].split()[0]: record.levelno
        for record in caplog.records
        if record.getMessage().startswith("resolution ")
    }
    assert levels == {"fetched": logging.INFO, "hit": logging.DEBUG, "refused": logging.INFO}
    for outcome, level in levels.items():
        assert (level == logging.INFO) == (outcome in recording.LOGGED_AT_INFO), outcome


def test_the_log_samples_name_the_resolver_classes_vllm_would_print() -> None:
    """vLLM's line names the class of the resolver that answered: ours are `VllmResolver` (each
    store) and `GuardedFilesystemResolver` (its own filesystem resolver, wrapped)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vllm is not installed")
    serving = Path(spec.submodule_search_locations[0], "entrypoints/openai/models/serving.py")
    source = serving.read_text()
    assert "\"Resolved and loaded LoRA adapter '%s' using %s\"," in source
    assert "resolver.__class__.__name__," in source
    ours = {VllmResolver.__name__, plugin.GuardedFilesystemResolver.__name__}
    named = 0
    for path in pages_and_readme():
        for lines in re.findall(r"```text\n(.*?)```", path.read_text(), re.S):
            previous = ""
            for line in lines.splitlines():
                used = re.search(r"Resolved and loaded LoRA adapter '[^']+' using (\w+)$", line)
                if used:
                    assert used.group(1) in ours, (path.name, line)
                    if " resolution backend=" in previous:  # one of our stores answered
                        assert used.group(1) == VllmResolver.__name__, (path.name, line)
                    named += 1
                previous = line
    assert named >= 1


#: A path in this repository, as the pages cite them (the package's modules also without src/;
#: ``deploy/NAME`` alone is kubectl's name of a Deployment).
CITED_PATH = re.compile(
    r"(?<![\w/.-])((?:tests|devtools|src|docs|bench|deploy/kubernetes|vllm_lora_resolvers)/[\w./-]*\w)"
)


def test_the_files_the_pages_cite_exist() -> None:
    cited = 0
    for path in [*pages_and_readme(), *sorted(DEPLOY.rglob("*.yaml")), REPO / "Dockerfile"]:
        for name in CITED_PATH.findall(path.read_text()):
            where = REPO / "src" / name if name.startswith("vllm_lora_resolvers/") else REPO / name
            assert where.exists(), f"{path.relative_to(REPO)} cites {name}"
            cited += 1
    assert cited >= 10


def test_no_page_counts_the_plugins() -> None:
    """A count of our plugins ("all five plugins") goes stale with the next store."""
    numbers = r"one|two|three|four|five|six|seven|eight|nine|ten|\d+"
    for path in pages_and_readme():
        assert not re.search(rf"\b(?:{numbers}) plugins\b", path.read_text(), re.I), path.name


def test_the_quoted_lines_of_the_sync_have_its_log_format() -> None:
    """The stated format, and every quoted line, are the sync's own (time included)."""
    log_format = SYNC_LOG_FORMAT
    stated = {"asctime": "TIME", "levelname": "LEVEL", "name": "LOGGER", "message": "MESSAGE"}
    placeholders = re.sub(r"%\((\w+)\)s", lambda m: stated[m.group(1)], log_format)
    assert f"in the format `{placeholders}`" in " ".join(page("metrics.md").split())
    shapes = {
        "asctime": r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}",
        "levelname": "(?:DEBUG|INFO|WARNING|ERROR)",
        "name": re.escape(sync.logger.name),
        "message": "sync: .*",
    }
    fields = re.split(r"%\((\w+)\)s", log_format)  # text, field, text, field, ..., text
    line_shape = re.compile(
        "".join(shapes[part] if i % 2 else re.escape(part) for i, part in enumerate(fields))
    )
    record = sync.logger.makeRecord(sync.logger.name, logging.INFO, "", 0, "sync: x", (), None)
    assert line_shape.fullmatch(logging.Formatter(log_format).format(record))
    quoted = 0
    for path in pages_and_readme():
        for line in path.read_text().splitlines():
            if f"{sync.logger.name}: sync: " in line:
                assert line_shape.fullmatch(line.strip()), (path.name, line)
                quoted += 1
    assert quoted >= 5


def test_metrics_page_documents_every_metric_of_the_sync() -> None:
    documented = set(re.findall(SYNC_METRIC_NAME, page("metrics.md")))
    for name, names in exposed_names(sync).items():
        assert documented & names, f"{name} is not documented"
    assert len(exposed_names(sync)) == 9


def test_no_page_or_rule_names_a_sync_metric_that_does_not_exist() -> None:
    real = set().union(*exposed_names(sync).values())
    for path in [*sorted(DOCS.rglob("*.md")), OPERATOR_MANIFEST]:
        documented = set(re.findall(SYNC_METRIC_NAME, path.read_text()))
        assert documented <= real, f"{path.name}: {sorted(documented - real)}"


def test_the_sync_lines_quoted_are_the_syncs_own() -> None:
    """Each ``sync: ...`` message of the pages has the shape of a format string in `sync`."""
    formats = re.findall(r'"(sync: [^"]*)"', inspect.getsource(sync))
    assert len(formats) >= 8
    shapes = [re.compile(re.sub(r"%[rs]", ".*", re.escape(f))) for f in formats]
    for name in ("metrics.md", "rollout.md", "troubleshooting.md", "kubernetes.md"):
        quoted = re.findall(r"vllm\.lora_resolvers\.sync: (sync: .*)$", page(name), re.M)
        for line in quoted:
            assert any(shape.fullmatch(line) for shape in shapes), f"{name}: {line}"
    listed = re.findall(r"^\| `(sync: [^`]*)` \|", page("metrics.md"), re.M)
    assert len(listed) == len(formats)  # the table lists every message
    for line in listed:
        assert any(shape.fullmatch(line) for shape in shapes), line


def test_the_rollout_page_states_the_exit_codes_of_sync_once() -> None:
    rows = re.findall(r"^\| ([0-9]) \|", page("rollout.md"), re.M)
    assert [int(row) for row in rows] == [int(result) for result in sync.RoundResult]


# -- troubleshooting: the messages quoted are the real ones ----------------------------------


def _raised(thunk: Callable[[], object]) -> str:
    with pytest.raises(Exception) as raised:
        thunk()
    return str(raised.value)


def _s3(error: BaseException) -> str:
    return _in_context(lambda: s3.store_errors("listing s3://my-adapters/prod/sql-expert/"), error)


def _s3_refusal(code: str, status: int) -> str:
    response: Any = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return _s3(ClientError(response, "ListObjectsV2"))


def _in_context(context: Callable[[], Any], error: BaseException) -> str:
    def fail() -> None:
        with context():
            raise error

    return _raised(fail)


def _adapter_config(**fields: object) -> LoraAdapterConfig:
    base = {
        "peft_type": "LORA",
        "base_model_name_or_path": "meta-llama/Llama-3.1-8B-Instruct",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj"],
    }
    return LoraAdapterConfig.model_validate({**base, **fields})


def _check(**fields: object) -> str:
    policy = AdapterPolicy("meta-llama/Llama-3.1-8B-Instruct", 16)
    return _raised(lambda: check_adapter_config("sql-expert", _adapter_config(**fields), policy))


def _unusable_cache(monkeypatch: pytest.MonkeyPatch) -> str:
    def refuse(*_: object, **__: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)
    return _raised(lambda: NodeCache(Path("/var/cache/vllm-lora")))


def _hostile_pickle(tmp_path: Path) -> str:
    weights = tmp_path / "adapter_model.bin"
    with zipfile.ZipFile(weights, "w") as archive:
        archive.writestr("archive/data.pkl", b"cos\nsystem\n(S'id'\ntR.")  # os.system('id')
    return _raised(lambda: check_torch_pickle("sql-expert", weights))


def _settings(**variables: str) -> str:
    return _raised(lambda: Settings.from_environ(variables, argv=[]))


def _gcs(error: BaseException, doing: str = "listing gs://my-adapters/prod/sql-expert/") -> str:
    return _in_context(lambda: gcs.store_errors(doing), error)


def _hub(error_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored login
    monkeypatch.delenv("HF_TOKEN", raising=False)
    request = httpx2.Request("HEAD", "http://127.0.0.1/acme/adapters")
    errors: dict[str, BaseException] = {
        "not found": RepositoryNotFoundError("x", response=httpx2.Response(404, request=request)),
        "connect": httpx2.ConnectError("refused"),
        "gated": GatedRepoError("x", response=httpx2.Response(403, request=request)),
    }
    if error_name == "gated":
        monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    doing = "looking up 'acme/adapters/sql-expert'"
    return _in_context(lambda: hf_hub.hub_errors(doing, "acme/adapters"), errors[error_name])


CACHE_ROOT = Path("/var/cache/vllm-lora")
google_errors: Any = google_api_errors  # untyped library
DefaultCredentialsError: Any = google_auth_errors.DefaultCredentialsError
MESSAGES: dict[str, Callable[[pytest.MonkeyPatch, Path], str]] = {
    "cache dir unset": lambda *_: _raised(
        lambda: Settings.from_environ({}, argv=[]).require_cache_dir("lora_s3_resolver")
    ),
    "cache dir unusable": lambda monkeypatch, _: _unusable_cache(monkeypatch),
    "disk full": lambda *_: str(cache_write_error(OSError(errno.ENOSPC, "full"))),
    "cache read-only": lambda *_: str(cache_write_error(OSError(errno.EROFS, "ro"))),
    "bad s3 uri": lambda *_: _raised(lambda: s3.parse_s3_uri("s3://My_Bucket/prod")),
    "bad gcs uri": lambda *_: _raised(lambda: gcs.parse_gcs_uri("gcs://my-adapters/prod")),
    "bad hub repo": lambda *_: _raised(
        lambda: hf_hub.parse_repo_list(["acme/adapters/sql-expert"])
    ),
    "bad size": lambda *_: _settings(VLLM_LORA_RESOLVER_CACHE_MAX_BYTES="20 gigs"),
    "bad rank": lambda *_: _settings(VLLM_LORA_RESOLVER_MAX_RANK="sixteen"),
    "bad ttl": lambda *_: _settings(VLLM_LORA_RESOLVER_NEGATIVE_TTL="-1"),
    "rank above limit": lambda *_: _check(r=32),
    "base model mismatch": lambda *_: _check(base_model_name_or_path="meta-llama/Llama-3.1-8B"),
    "dora": lambda *_: _check(use_dora=True),
    "string rank": lambda *_: _raised(
        lambda: parse_adapter_config(
            "sql-expert",
            b'{"peft_type": "LORA", "r": "8", "lora_alpha": 16, "target_modules": ["q_proj"]}',
        )
    ),
    "hostile pickle": lambda _, tmp_path: _hostile_pickle(tmp_path),
    "s3 unreachable": lambda *_: _s3(
        EndpointConnectionError(endpoint_url="https://s3.us-east-1.amazonaws.com/my-adapters")
    ),
    "s3 throttled": lambda *_: _s3_refusal("SlowDown", 503),
    "s3 no bucket": lambda *_: _s3_refusal("NoSuchBucket", 404),
    "s3 access denied": lambda *_: _s3_refusal("AccessDenied", 403),
    "s3 no credentials": lambda *_: _s3(NoCredentialsError()),
    "gcs forbidden": lambda *_: _gcs(google_errors.Forbidden("denied")),
    "gcs not found": lambda *_: _gcs(google_errors.NotFound("no such bucket")),
    "gcs no credentials": lambda *_: _gcs(
        DefaultCredentialsError("none"), "connecting to Google Cloud Storage"
    ),
    "hub not found": lambda monkeypatch, tmp_path: _hub("not found", monkeypatch, tmp_path),
    "hub gated": lambda monkeypatch, tmp_path: _hub("gated", monkeypatch, tmp_path),
    "hub unreachable": lambda monkeypatch, tmp_path: _hub("connect", monkeypatch, tmp_path),
}


@pytest.mark.parametrize("situation", MESSAGES)
def test_troubleshooting_quotes_the_real_message(
    situation: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    message = MESSAGES[situation](monkeypatch, tmp_path)
    assert message in page("troubleshooting.md")


def test_troubleshooting_shows_a_path_as_the_client_sees_it() -> None:
    utils = pytest.importorskip("vllm.entrypoints.serve.exception_handling.utils")
    policy = AdapterPolicy("/mnt/models/llama-3.1-8b-instruct", 16)
    adapter = _adapter_config(base_model_name_or_path="/mnt/models/llama-3.1-8b")
    message = _raised(lambda: check_adapter_config("sql-expert", adapter, policy))
    assert "<path>" in utils.sanitize_message(message)
    assert utils.sanitize_message(message) in page("troubleshooting.md")


# -- Kubernetes manifests (tests/test_kubernetes.py checks what they do) ----------------------

DEPLOY = REPO / "deploy" / "kubernetes"
#: The Prometheus Operator objects of the monitoring component.
OPERATOR_MANIFEST = DEPLOY / "components" / "monitoring" / "monitoring.yaml"


def alert_rules() -> dict[str, dict[str, Any]]:
    documents = [d for d in yaml.safe_load_all(OPERATOR_MANIFEST.read_text()) if d]
    (rule_file,) = [d for d in documents if d["kind"] == "PrometheusRule"]
    return {rule["alert"]: rule for rule in rule_file["spec"]["groups"][0]["rules"]}


def test_the_alert_rules_use_real_metrics_and_outcomes_and_page_on_refused_stores() -> None:
    real = set().union(*exposed_names().values())
    sync_real = set().union(*exposed_names(sync).values())
    alerted = {}
    for name, rule in alert_rules().items():
        assert set(METRIC_NAME.findall(rule["expr"])) <= real, name
        assert set(SYNC_METRIC_NAME.findall(rule["expr"])) <= sync_real, name
        for result in re.findall(r'result!?="(\w+)"', rule["expr"]):
            assert result in {r.name.lower() for r in sync.RoundResult}, name
        for outcome in re.findall(r'outcome="(\w+)"', rule["expr"]):
            assert outcome in metrics.OUTCOMES, name
            alerted[outcome] = rule["labels"]["severity"]
    failures = {"refused": "page", "error": "page", "stale": "warning", "invalid": "ticket"}
    assert failures.items() <= alerted.items()


def test_kubernetes_page_shows_every_manifest_and_the_image_recipe() -> None:
    text = page("kubernetes.md")
    shown = re.findall(r'^--8<-- "([^":]+)(?::(\w+))?"$', text, re.M)
    manifests = {str(path.relative_to(REPO)) for path in DEPLOY.rglob("*.yaml")}
    assert manifests <= {path for path, _ in shown}  # each whole, or in sections
    assert ("Dockerfile", "") in shown
    text = " ".join(page("index.md").split())
    assert f"(the repository's `Dockerfile`) starts from `{image_recipe().base}`." in text
    for path, section in shown:
        if section:
            source = (REPO / path).read_text()
            assert f"# --8<-- [start:{section}]" in source and f"# --8<-- [end:{section}]" in source


# -- what the pages say about vLLM itself ----------------------------------------------------


def test_security_page_names_exactly_the_paths_vllms_api_key_guards() -> None:
    authenticate = pytest.importorskip("vllm.entrypoints.serve.middleware.authenticate")
    guarded = authenticate.GUARDED_PREFIX
    assert guarded == ("/v1", "/v2", "/inference", "/cohere")
    text = " ".join(page("security.md").split())
    assert "every path that starts with `/v1`, `/v2`, `/inference` or `/cohere`" in text
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        assert path.startswith(guarded)
    for path in ("/adapters", "/invocations", "/tokenize", "/health", "/metrics"):
        assert not path.startswith(guarded)
        assert f"`{path}`" in text


def test_security_page_names_vllms_sagemaker_adapter_routes() -> None:
    routes = pytest.importorskip("model_hosting_container_standards.sagemaker.lora.routes")
    named = {(c.method, c.path) for c in routes.LORA_ROUTE_REGISTRY.values()}
    assert named == {("POST", "/adapters"), ("DELETE", "/adapters/{adapter_name}")}
    text = page("security.md")
    assert "`POST /adapters`, `DELETE /adapters/{name}`" in text


def test_stacks_page_describes_vllms_lora_gauge_as_vllm_exports_it() -> None:
    """The adapter-affinity scorer of the llm-d router reads ``vllm:lora_requests_info``; the
    page's sizing advice rests on what vLLM puts in it and on its LoRA defaults."""
    loggers = pytest.importorskip("vllm.v1.metrics.loggers")
    stats = pytest.importorskip("vllm.v1.metrics.stats")
    lora_config = pytest.importorskip("vllm.config.lora")
    source = inspect.getsource(loggers.PrometheusStatLogger)
    for fragment in (
        '"vllm:lora_requests_info"',
        '"max_lora"',
        '"running_lora_adapters"',
        '"waiting_lora_adapters"',
        "lora_config.max_loras",  # max_lora is --max-loras
        "set_to_current_time()",  # the value is the time of the update
        "misleading with data parallel",
    ):
        assert fragment in source, fragment
    # An adapter with a request waiting and one with a request running: both labels list both;
    # an adapter with nothing in flight is in neither.
    states = stats.LoRARequestStates(log_stats=True)
    states.request_waiting("r1", "sql-expert")
    states.request_waiting("r2", "chat-v2")
    states.request_running("r2", "chat-v2")
    states.request_waiting("r3", "support-bot")
    states.request_finished("r3", "support-bot")
    scheduler_stats = stats.SchedulerStats()
    states.update_scheduler_stats(scheduler_stats)
    assert set(scheduler_stats.running_lora_adapters) == {"sql-expert", "chat-v2"}
    assert set(scheduler_stats.waiting_lora_adapters) == {"sql-expert", "chat-v2"}
    assert lora_config.LoRAConfig(max_loras=4).max_cpu_loras == 4  # default: --max-loras
    text = " ".join(page("stacks.md").split())
    assert "`running_lora_adapters` and `waiting_lora_adapters` list **the same names**" in text
    assert "`--max-cpu-loras` per pod (at least `--max-loras`; default equal)" in text
    assert "`max_lora` is `--max-loras`" in text


def test_unknown_variable_warnings_are_vllms_own_and_for_the_variables_it_does_not_know() -> None:
    envs = pytest.importorskip("vllm.envs")
    interface = pytest.importorskip("vllm.platforms.interface")
    source = inspect.getsource(interface.Platform.validate_environ)
    assert '"Unknown vLLM environment variable detected: %s"' in source
    ours = {variable.name for variable in stores.ALL_VARIABLES}
    assert ours & set(envs.environment_variables) == {
        config.CACHE_DIR.name,
        config.HF_REPO_LIST.name,
        config.VLLM_PLUGINS.name,
    }
    warned = re.findall(
        r"\] Unknown vLLM environment variable detected: (\w+)$",
        page("troubleshooting.md"),
        re.M,
    )
    assert warned and all(name not in envs.environment_variables for name in warned)
    for name in ("configuration.md", "troubleshooting.md"):
        text = " ".join(page(name).split())
        assert (
            "all but `VLLM_LORA_RESOLVER_CACHE_DIR` and `VLLM_LORA_RESOLVER_HF_REPO_LIST`" in text
        )


def test_the_quoted_start_up_lines_are_the_plugins_own() -> None:
    source = inspect.getsource(plugin)
    assert '"%s registered for %s"' in source
    assert '"%s not registered: %s is not set"' in source
    text = page("troubleshooting.md")
    registered = re.findall(r"\] (lora_\w+) registered for (\S+)$", text, re.M)
    assert {name for name, _ in registered} == {"lora_fs_resolver", "lora_s3_resolver"}
    skipped = re.findall(r"\] (lora_\w+) not registered: (\w+) is not set$", text, re.M)
    assert skipped == [("lora_gcs_resolver", config.GCS_URI.name)]


class RefusingStore(Store):
    """An S3-like store that refuses our credentials, as S3's AccessDenied does."""

    backend = "s3"

    def locate(self, name: str) -> None:
        assert name == "sql-expert"
        raise StoreRefusedError(_s3_refusal("AccessDenied", 403))

    def download(self, adapter: Any, file: Any, destination: Path) -> dict[str, str]:
        raise AssertionError("never reached")

    def list_names(self, folder: str = "") -> Iterator[str]:
        raise AssertionError("never reached")


async def test_runbook_quotes_the_real_warning_of_a_store_that_cannot_answer(
    cache_dir: Path, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    resolver = Resolver(
        RefusingStore("s3://my-adapters/prod", make_settings(), NodeCache(cache_dir))
    )
    with caplog.at_level(logging.WARNING, logger="vllm.lora_resolvers"):
        assert await VllmResolver(resolver).resolve_lora(BASE_MODEL, "sql-expert") is None
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert re.search(rf"\] {re.escape(warning)}$", page("troubleshooting.md"), re.M)


def test_runbook_logging_configuration_raises_only_our_loggers_to_debug(tmp_path: Path) -> None:
    pytest.importorskip("vllm.logger")
    (block,) = re.findall(r"```json\n(.*?)```", page("troubleshooting.md"), re.S)
    configuration = tmp_path / "logging.json"
    configuration.write_text(block)
    script = (
        "import logging\n"
        "from vllm.config.logging import LoggingConfig\n"
        "from vllm.logger import configure_logging\n"
        "configure_logging(LoggingConfig())\n"
        "logging.getLogger('vllm.lora_resolvers.cache').debug('ours')\n"
        "logging.getLogger('vllm.engine').debug('theirs')\n"
        "logging.getLogger('vllm.engine').info('their info')\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "VLLM_LOGGING_CONFIG_PATH": str(configuration)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = [line for line in ran.stdout.splitlines() if line.startswith("(")]
    assert [line.split(" ", 3)[2] for line in lines] == ["DEBUG", "INFO"]
    assert lines[0].endswith(" ours") and lines[1].endswith(" their info")


def test_the_testing_script_of_the_resolver_page_runs_as_printed(tmp_path: Path) -> None:
    script = DOCS / "examples" / "check_http_store.py"
    text = page("writing-a-resolver.md")
    assert '--8<-- "examples/check_http_store.py"' in text
    assert "python docs/examples/check_http_store.py /path/to/sql-expert\n" in text
    adapter = write_lora_adapter(tmp_path / "sql-expert", base_model=BASE_MODEL)
    ran = subprocess.run(
        [sys.executable, str(script.relative_to(REPO)), str(adapter)],
        cwd=REPO,
        env={**os.environ, "TMPDIR": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    snapshot, missing = ran.stdout.splitlines()
    shape = r"/\S+/vllm-lora-cache-\w+/\.vllm-lora/snapshots/[0-9a-f]+/adapter"
    assert re.fullmatch(shape, snapshot)
    assert Path(snapshot).is_relative_to(tmp_path)
    assert (Path(snapshot) / "adapter_config.json").read_bytes() == (
        adapter / "adapter_config.json"
    ).read_bytes()
    assert missing == "None"
    assert re.search(rf"```text\n{shape}\nNone\n```", text)  # the output shown is of that shape


# -- the site --------------------------------------------------------------------------------


def test_the_site_builds_without_a_warning(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    assert "WARNING" not in built.stderr
    assert "class HttpStore" in (tmp_path / "writing-a-resolver" / "index.html").read_text()


def test_runbook_shows_the_commands_own_output(
    fs_resolver: Any, adapters_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from vllm_lora_resolvers.cli import main

    write_lora_adapter(adapters_dir / "sql-expert", base_model=BASE_MODEL)
    fs_resolver.resolve(BASE_MODEL, "sql-expert")  # a snapshot this process leases
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("VLLM_LORA_RESOLVER_FS_DIR", str(adapters_dir))
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_MAX_BYTES", "1GiB")
    monkeypatch.setenv("VLLM_PLUGINS", "lora_fs_resolver,lora_filesystem_resolver")
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    text = page("troubleshooting.md")
    shown = [line.strip() for line in text.splitlines()]

    listing = CliRunner().invoke(main, ["cache", "ls"]).output.splitlines()
    assert listing[0].split() in [line.split() for line in shown]  # the column headings
    assert re.fullmatch(r"1 snapshot, [\d.]+ KiB in \S+ \(cap 1\.0 GiB\)", listing[-1])
    assert re.search(r"^1 snapshot, [\d.]+ KiB in \S+ \(cap 1\.0 GiB\)$", text, re.M)
    assert listing[2].split()[-2:] == ["PID", str(os.getpid())]  # LEASED BY: this process

    report = CliRunner().invoke(main, ["doctor", "--timeout", "5"])
    assert report.exit_code == 1
    lines = [line.strip() for line in report.output.splitlines()]
    for expected in (
        "Resolvers, in the order vLLM tries them",
        "Checks",
        "FAIL VLLM_ALLOW_RUNTIME_LORA_UPDATING is not true: vLLM never asks a resolver for an "
        "unknown model",
        "fix: export VLLM_ALLOW_RUNTIME_LORA_UPDATING=true",
        "-   lora_gcs_resolver          off: VLLM_LORA_RESOLVER_GCS_URI is not set",
    ):
        assert expected in lines and expected in shown
    assert re.search(
        rf"^  OK   the cache {re.escape(str(cache_dir))} is writable$", report.output, re.M
    )
