"""The Kubernetes manifests of ``deploy/kubernetes``: a kustomize base, an overlay per remote store
and monitoring as an optional component.

Every overlay is rendered as ``kubectl apply -k`` renders it (``kubectl kustomize``), alone and
with the monitoring component, and its output passes the Kubernetes JSON schemas at a pinned
version (kubernetes-validate ships them: offline). From ``stores.py``'s declarations, each
overlay's containers get what their store needs: its plugin in ``VLLM_PLUGINS``, its variable, the
cache, the identity, the image's extra; our own resolver code builds the store's resolver from
each container's environment, as the container would. The model, the rank limit, the image and
the adapters to warm are written once and reach every place that needs them. The pods live and
drain like production pods: probes, a drain sized by vLLM's own shutdown timeout, spread over
nodes, placement in one file, non-root with a read-only root filesystem, the Hub token optional.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO
from image_recipe import DOCKERFILE, image_recipe

from vllm_lora_resolvers import stores
from vllm_lora_resolvers.config import CACHE_DIR, Settings
from vllm_lora_resolvers.configured import configured_resolvers
from vllm_lora_resolvers.stores import StoreDeclaration

DEPLOY = REPO / "deploy" / "kubernetes"
BASE = DEPLOY / "base"
MONITORING = DEPLOY / "components" / "monitoring"
OVERLAYS = sorted(path.parent.name for path in (DEPLOY / "overlays").glob("*/kustomization.yaml"))
KUBERNETES_VERSION = "1.30"  # the oldest minor still in standard support on EKS and GKE
#: Prometheus Operator kinds (CRDs): kubernetes-validate has no schema for them.
OPERATOR_KINDS = {"PodMonitor", "PrometheusRule"}
#: How each store's overlay gives the pods the store's identity: an annotation of the
#: ServiceAccount (the cloud's workload identity), or the Hub's token Secret.
IDENTITY_ANNOTATIONS = {
    "s3": "eks.amazonaws.com/role-arn",
    "gcs": "iam.gke.io/gcp-service-account",
    "azure": "azure.workload.identity/client-id",
}
#: The containers that run our code (the resolvers inside vLLM, ``vllm-lora pull`` and ``sync``).
OUR_CONTAINERS = ("vllm", "warm-adapters", "lora-sync")
SECRET = "<from a Secret>"
_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """What ``kubectl apply -k directory`` would apply."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    built = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    return [document for document in yaml.safe_load_all(built.stdout) if document]


@dataclass
class Rendered:
    """An overlay's output, with the questions the tests ask of it."""

    documents: list[dict[str, Any]]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        (found,) = [
            d for d in self.documents if d["kind"] == kind and name in (None, d["metadata"]["name"])
        ]
        return found

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.one("Deployment")["spec"]["template"]["spec"]
        return spec

    def container(self, name: str) -> dict[str, Any]:
        (found,) = [c for c in self.all_containers() if c["name"] == name]
        return found

    def all_containers(self) -> list[dict[str, Any]]:
        containers: list[dict[str, Any]] = self.pod["initContainers"] + self.pod["containers"]
        return containers

    def environment(self, name: str) -> dict[str, str]:
        """The container's variables as the kubelet sets them (``envFrom`` first, then ``env``);
        a Secret's are `SECRET`."""
        container = self.container(name)
        variables: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                variables |= self.one("ConfigMap", source["configMapRef"]["name"])["data"]
        for variable in container.get("env", []):
            reference = variable.get("valueFrom", {})
            if "configMapKeyRef" in reference:
                key = reference["configMapKeyRef"]
                variables[variable["name"]] = self.one("ConfigMap", key["name"])["data"][key["key"]]
            else:
                variables[variable["name"]] = variable.get("value", SECRET)
        return variables

    def secret_sources(self, name: str) -> list[dict[str, Any]]:
        """The container's ``secretRef`` and ``secretKeyRef`` entries."""
        container = self.container(name)
        found = [s["secretRef"] for s in container.get("envFrom", []) if "secretRef" in s]
        for variable in container.get("env", []):
            if "secretKeyRef" in variable.get("valueFrom", {}):
                found.append(variable["valueFrom"]["secretKeyRef"])
        return found

    def argv(self, name: str) -> list[str]:
        """The container's command and arguments with ``$(NAME)`` expanded as the kubelet does;
        a reference to a variable the container lacks fails."""
        container = self.container(name)
        variables = self.environment(name)

        def expand(match: re.Match[str]) -> str:
            assert match.group(1) in variables, f"{name}: $({match.group(1)}) is not set"
            return variables[match.group(1)]

        words = [*container.get("command", []), *container.get("args", [])]
        return [_REFERENCE.sub(expand, word) for word in words]

    def mounts(self, name: str) -> dict[str, str]:
        """The container's mount paths, by volume."""
        return {m["name"]: m["mountPath"] for m in self.container(name).get("volumeMounts", [])}

    def volume(self, name: str) -> dict[str, Any]:
        (found,) = [volume for volume in self.pod["volumes"] if volume["name"] == name]
        volume: dict[str, Any] = found
        return volume


@pytest.fixture(scope="module")
def rendered() -> dict[str, Rendered]:
    return {overlay: Rendered(kustomize(DEPLOY / "overlays" / overlay)) for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def with_monitoring(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Rendered]:
    """Each overlay with the monitoring component, as an operator adds it to the overlay."""
    found = {}
    for overlay in OVERLAYS:
        work = tmp_path_factory.mktemp(overlay)
        (work / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "resources": [os.path.relpath(DEPLOY / "overlays" / overlay, work)],
                    "components": [os.path.relpath(MONITORING, work)],
                }
            )
        )
        found[overlay] = Rendered(kustomize(work))
    return found


def store_of(overlay: Rendered) -> StoreDeclaration:
    """The one store the overlay's server is configured for."""
    variables = overlay.environment("vllm")
    (store,) = [store for store in stores.STORES if store.variable.name in variables]
    return store


def page(name: str) -> str:
    return (REPO / "docs" / name).read_text()


# -- rendering and schemas ----------------------------------------------------------------------


def test_every_remote_store_has_an_overlay_and_each_overlay_serves_its_own(
    rendered: dict[str, Rendered],
) -> None:
    remote = sorted(store.backend for store in stores.STORES if store.scheme is not None)
    assert remote == OVERLAYS
    for overlay, output in rendered.items():
        assert store_of(output).backend == overlay


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_passes_the_schema_check_and_needs_no_crd(
    overlay: str, rendered: dict[str, Rendered]
) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    documents = rendered[overlay].documents
    assert {d["kind"] for d in documents} == {
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "NetworkPolicy",
        "PodDisruptionBudget",
    }
    for document in documents:
        # strict: unknown fields (typos) fail too; a kind without a schema raises, and fails.
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        assert "namespace" not in document["metadata"]  # applied to the namespace you choose


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_monitoring_component_adds_only_the_operators_objects(
    overlay: str, rendered: dict[str, Rendered], with_monitoring: dict[str, Rendered]
) -> None:
    plain, monitored = rendered[overlay].documents, with_monitoring[overlay].documents
    added = [document for document in monitored if document not in plain]
    assert sorted(document["kind"] for document in added) == sorted(OPERATOR_KINDS)
    assert [document for document in plain if document not in monitored] == []


# Fields of the Prometheus Operator's monitoring.coreos.com/v1 kinds that the manifest may use.
POD_MONITOR_ENDPOINT_FIELDS = {"port", "path", "interval", "scrapeTimeout", "relabelings"}
RELABELING_FIELDS = {"sourceLabels", "targetLabel", "action", "regex", "replacement"}
RULE_FIELDS = {"alert", "expr", "for", "labels", "annotations"}
DURATION = re.compile(r"^(\d+[smhd])+$")


def test_prometheus_operator_objects_have_the_operators_shape_and_scrape_every_port(
    with_monitoring: dict[str, Rendered],
) -> None:
    output = with_monitoring[OVERLAYS[0]]
    kinds = {d["kind"]: d for d in output.documents if d["kind"] in OPERATOR_KINDS}
    for document in kinds.values():
        assert document["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(document) == {"apiVersion", "kind", "metadata", "spec"}
    monitor = kinds["PodMonitor"]["spec"]
    assert set(monitor) == {"selector", "podMetricsEndpoints"}
    pod_labels = output.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= pod_labels.items()
    port_names = {port["name"] for c in output.pod["containers"] for port in c.get("ports", [])}
    assert {e["port"] for e in monitor["podMetricsEndpoints"]} == port_names  # all scraped
    for endpoint in monitor["podMetricsEndpoints"]:
        assert set(endpoint) <= POD_MONITOR_ENDPOINT_FIELDS
        assert endpoint["path"] == "/metrics"
        assert DURATION.match(endpoint["interval"])
        for relabeling in endpoint.get("relabelings", []):
            assert set(relabeling) <= RELABELING_FIELDS
    (group,) = kinds["PrometheusRule"]["spec"]["groups"]
    assert set(group) == {"name", "rules"}
    for rule in group["rules"]:
        assert set(rule) <= RULE_FIELDS and {"alert", "expr", "labels"} <= set(rule)
        assert DURATION.match(rule.get("for", "1m"))
        assert rule["labels"]["severity"] in ("page", "warning", "ticket")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pods_refer_only_to_what_the_overlay_defines(
    overlay: str, rendered: dict[str, Rendered]
) -> None:
    output = rendered[overlay]
    deployment = output.one("Deployment")
    template = deployment["spec"]["template"]
    assert (
        deployment["spec"]["selector"]["matchLabels"].items()
        <= template["metadata"]["labels"].items()
    )
    output.one("ServiceAccount", output.pod["serviceAccountName"])
    volumes = {volume["name"] for volume in output.pod["volumes"]}
    for container in output.all_containers():
        assert set(output.mounts(container["name"])) <= volumes
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                output.one("ConfigMap", source["configMapRef"]["name"])
    for volume in output.pod["volumes"]:
        if "configMap" in volume:
            output.one("ConfigMap", volume["configMap"]["name"])


# -- what each store needs ------------------------------------------------------------------


@pytest.fixture
def container_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """Sets a container's variables as the process environment (the Azure client reads it), the
    node cache moved to a temporary folder; returns the settings our code reads from them."""

    def use(variables: dict[str, str], argv: list[str]) -> Settings:
        for name in list(os.environ):
            if name.startswith(("VLLM_", "AWS_", "AZURE_", "GOOGLE_", "HF_", "STORAGE_")):
                monkeypatch.delenv(name)
        plain = {name: value for name, value in variables.items() if value != SECRET}
        plain[CACHE_DIR.name] = str(tmp_path / "cache")
        for name, value in plain.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no test reaches beyond loopback
        return Settings.from_environ(plain, argv=argv)

    yield use


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_container_builds_its_stores_resolver_from_its_own_environment(
    overlay: str, rendered: dict[str, Rendered], container_environment: Any
) -> None:
    """What the pods crash-looped on (a store's variables missing from a container) fails here."""
    output = rendered[overlay]
    store = store_of(output)
    server_argv = output.argv("vllm")
    for name in OUR_CONTAINERS:
        variables = output.environment(name)
        assert {store.variable.name, CACHE_DIR.name, "VLLM_PLUGINS"} <= set(variables), name
        # The cache the variable names is the node cache mounted there.
        assert variables[CACHE_DIR.name] == output.volume("adapter-cache")["hostPath"]["path"]
        assert output.mounts(name)["adapter-cache"] == variables[CACHE_DIR.name]
        argv = server_argv if name == "vllm" else []
        settings = container_environment(variables, argv)
        assert [plugin for plugin, _ in configured_resolvers(settings)] == [store.plugin], name
    server = output.environment("vllm")
    assert server["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "true"
    # The store first, then vLLM's resolver over the node cache (security.md, revocation).
    assert server["VLLM_PLUGINS"].split(",") == [store.plugin, "lora_filesystem_resolver"]
    if store.extra is not None:  # the image's client (the standard library's needs none)
        assert store.extra in image_recipe().arguments["EXTRAS"].split(",")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_gives_the_pods_its_stores_identity(
    overlay: str, rendered: dict[str, Rendered]
) -> None:
    output = rendered[overlay]
    annotations = output.one("ServiceAccount").get("metadata", {}).get("annotations", {})
    labels = output.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    if overlay in IDENTITY_ANNOTATIONS:
        assert list(annotations) == [IDENTITY_ANNOTATIONS[overlay]]
    else:
        assert annotations == {}
    # AKS's webhook injects the identity's token only into pods labelled so.
    assert (labels.get("azure.workload.identity/use") == "true") == (overlay == "azure")
    # The Hub store's token reaches every container that asks the Hub; the others get none.
    for name in OUR_CONTAINERS:
        names = {source["name"] for source in output.secret_sources(name)}
        assert ("hf-token" in names) == (name == "vllm" or overlay == "hf"), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_adapters_warmed_are_names_the_overlays_store_has(
    overlay: str, rendered: dict[str, Rendered], container_environment: Any
) -> None:
    output = rendered[overlay]
    argv = output.argv("warm-adapters")
    assert argv[:2] == ["vllm-lora", "pull"]
    options = dict(word.split("=", 1) for word in argv[2:])
    listing = Path(options["--from-file"])
    configmap = output.volume("warm-adapters")["configMap"]["name"]
    assert output.mounts("warm-adapters")["warm-adapters"] == str(listing.parent)
    names = output.one("ConfigMap", configmap)["data"][listing.name].split()
    assert names
    settings = container_environment(output.environment("warm-adapters"), [])
    ((_, resolver),) = configured_resolvers(settings)
    for name in names:
        assert resolver.store.accepts_name(name), f"{overlay}: {name!r} is not its store's"
    assert options["--base-model"] == output.argv("vllm")[2]  # checked against the served model
    assert "--max-rank" not in options  # VLLM_LORA_RESOLVER_MAX_RANK, the server's


# -- set once -----------------------------------------------------------------------------------


def source_files() -> list[Path]:
    return sorted(path for path in DEPLOY.rglob("*") if path.is_file())


def written(value: str) -> list[str]:
    """The lines of deploy/kubernetes that write ``value`` (comments aside), as their files'
    names."""
    return [
        str(path.relative_to(DEPLOY))
        for path in source_files()
        for line in path.read_text().splitlines()
        if value in line.split("#", 1)[0]
    ]


def test_the_model_the_rank_and_the_image_are_written_once() -> None:
    settings = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    (generator,) = [g for g in settings["configMapGenerator"] if g["name"] == "vllm-lora"]
    literals = dict(literal.split("=", 1) for literal in generator["literals"])
    (image,) = settings["images"]
    assert written(literals["BASE_MODEL"]) == ["base/kustomization.yaml"]
    assert written("VLLM_LORA_RESOLVER_MAX_RANK=") == ["base/kustomization.yaml"]
    assert written(image["newName"]) == ["base/kustomization.yaml"]
    assert written("--max-rank") == []  # the sync and the init container read the variable
    for flag in ("--max-lora-rank=", "--base-model="):  # only by reference to the variable
        assert len(written(flag)) == len(written(flag + "$(")) == 1, flag


def test_the_image_the_page_builds_and_pushes_is_the_one_the_manifests_run() -> None:
    (image,) = yaml.safe_load((BASE / "kustomization.yaml").read_text())["images"]
    for text in (page("kubernetes.md"), DOCKERFILE.read_text()):
        named = re.findall(r"docker (?:build -t|push) (\S+)", text)
        assert named and set(named) == {f"{image['newName']}:{image['newTag']}"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_model_the_rank_and_the_image_reach_every_container(
    overlay: str, rendered: dict[str, Rendered], container_environment: Any
) -> None:
    output = rendered[overlay]
    settings = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    (image,) = settings["images"]
    images = {container["image"] for container in output.all_containers()}
    assert images == {f"{image['newName']}:{image['newTag']}"}
    server = output.argv("vllm")
    assert server[:2] == ["vllm", "serve"]
    model = server[2]  # vllm serve MODEL
    assert model == output.environment("vllm")["BASE_MODEL"] and not model.startswith("-")
    ranks = {
        name: container_environment(
            output.environment(name), server if name == "vllm" else []
        ).max_rank
        for name in OUR_CONTAINERS
    }
    assert set(ranks.values()) == {int(output.environment("vllm")["VLLM_LORA_RESOLVER_MAX_RANK"])}
    assert f"--max-lora-rank={ranks['vllm']}" in server


# -- pods that live and drain like production pods ---------------------------------------------


def test_the_server_has_every_probe_and_drains_requests_in_flight(
    rendered: dict[str, Rendered],
) -> None:
    output = rendered[OVERLAYS[0]]
    server = output.container("vllm")
    port = server["ports"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"] == {"path": "/health", "port": port["name"]}, probe
    startup = server["startupProbe"]
    assert (
        startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60
    )  # a base model download
    options = dict(word.split("=", 1) for word in output.argv("vllm")[3:] if "=" in word)
    drain = int(options["--shutdown-timeout"])  # vLLM: finish requests in flight, then stop
    assert drain > 0
    delay = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert delay >= 5  # endpoints, kube-proxy and the gateway stop sending requests first
    assert output.pod["terminationGracePeriodSeconds"] > delay + drain  # then the engine exits


def vllm_source(module: str) -> str:
    """The source of one of vLLM's modules, read without importing vLLM (seconds to import)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vllm is not installed")
    return (
        Path(spec.submodule_search_locations[0], *module.split(".")).with_suffix(".py").read_text()
    )


def test_vllm_drains_requests_in_flight_only_with_a_shutdown_timeout() -> None:
    arguments = vllm_source("engine.arg_utils")
    assert '"--shutdown-timeout",' in arguments and "shutdown_timeout: int = 0" in arguments
    engine = vllm_source("v1.engine.core")
    assert 'mode = "abort" if shutdown_timeout == 0 else "drain"' in engine


def test_the_server_reads_its_api_key_from_a_variable_vllm_knows(
    rendered: dict[str, Rendered],
) -> None:
    envs = pytest.importorskip("vllm.envs")
    output = rendered[OVERLAYS[0]]
    keys = [v for v in output.container("vllm")["env"] if "valueFrom" in v]
    assert [v["name"] for v in keys] == ["VLLM_API_KEY"]
    assert "VLLM_API_KEY" in envs.environment_variables
    assert not any(word.startswith("--api-key") for word in output.argv("vllm"))


def test_placement_is_in_one_file_and_spreads_the_servers_over_nodes(
    rendered: dict[str, Rendered],
) -> None:
    placement_fields = (
        "nodeSelector",
        "tolerations",
        "topologySpreadConstraints",
        "nvidia.com/gpu",
    )
    placement = (BASE / "placement.yaml").read_text()
    for path in source_files():
        for field in placement_fields:
            assert (field in path.read_text()) == (path == BASE / "placement.yaml"), (path, field)
    assert "nodeSelector" in placement
    output = rendered[OVERLAYS[0]]
    pod_labels = output.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    spread = {c["topologyKey"]: c for c in output.pod["topologySpreadConstraints"]}
    assert set(spread) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in spread.values():
        assert constraint["labelSelector"]["matchLabels"].items() <= pod_labels.items()
        assert constraint["maxSkew"] == 1
    resources = output.container("vllm")["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1


def test_every_container_requests_and_limits_what_it_uses(rendered: dict[str, Rendered]) -> None:
    output = rendered[OVERLAYS[0]]
    for container in output.all_containers():
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][bound]), container["name"]
    for bound in ("requests", "limits"):
        assert "ephemeral-storage" in output.container("vllm")["resources"][bound]


def test_the_pods_run_as_one_non_root_user_on_a_read_only_root_filesystem(
    rendered: dict[str, Rendered],
) -> None:
    output = rendered[OVERLAYS[0]]
    pod = output.pod
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] > 0
    assert pod["automountServiceAccountToken"] is False
    owner = f"{context['runAsUser']}:{context['runAsGroup']}"
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert set(host_paths) == {"adapter-cache", "model-cache"}
    assert [c["name"] for c in pod["initContainers"]] == ["prepare-node-caches", "warm-adapters"]
    prepare = output.container("prepare-node-caches")
    assert output.mounts("prepare-node-caches") == host_paths  # mounted where they are on the node
    script = " ".join(prepare["args"][0].split())
    assert f"chown {owner} {' '.join(host_paths.values())}" in script
    assert prepare["securityContext"]["runAsUser"] == 0
    assert prepare["securityContext"]["capabilities"] == {
        "drop": ["ALL"],
        "add": ["CHOWN", "FOWNER"],
    }
    scratch = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    for container in output.all_containers():
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        if container["name"] == "prepare-node-caches":
            continue
        assert "runAsUser" not in security  # the pod's user
        # What Python, vLLM, torch and triton write: HOME and /tmp, on per-pod scratch volumes.
        home = output.environment(container["name"])["HOME"]
        mounts = output.mounts(container["name"])
        for path in (home, "/tmp"):
            (volume,) = [name for name, mounted in mounts.items() if mounted == path]
            assert volume in scratch, (container["name"], path)
    assert output.environment("vllm")["HF_HOME"] == host_paths["model-cache"]


def test_the_sync_sidecar_sees_what_its_server_sees(rendered: dict[str, Rendered]) -> None:
    for output in rendered.values():
        sidecar = output.container("lora-sync")
        argv = output.argv("lora-sync")
        assert argv[:2] == ["vllm-lora", "sync"]
        options = dict(word.split("=", 1) for word in argv[2:])
        port = output.container("vllm")["ports"][0]["containerPort"]
        assert options["--server"] == f"http://127.0.0.1:{port}"
        (metrics_port,) = sidecar["ports"]
        assert options["--metrics-port"] == str(metrics_port["containerPort"])
        assert sidecar["livenessProbe"]["httpGet"]["port"] == metrics_port["name"]
        server, variables = output.environment("vllm"), output.environment("lora-sync")
        assert {name: server[name] for name in variables} == variables  # its API key too
        assert set(server) - set(variables) == {"HF_HOME"}  # the base model's: the server's alone
        assert output.mounts("lora-sync")["adapter-cache"] == output.mounts("vllm")["adapter-cache"]


def test_the_network_policy_admits_only_the_gateway_and_prometheus_to_the_server_port(
    rendered: dict[str, Rendered],
) -> None:
    output = rendered[OVERLAYS[0]]
    policy = output.one("NetworkPolicy")["spec"]
    pod_labels = output.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    rule, metrics_rule = policy["ingress"]  # the server's port; the sync's metrics port

    def peers(rule: dict[str, Any]) -> list[str]:
        found = [
            (peer["namespaceSelector"]["matchLabels"], peer["podSelector"]["matchLabels"])
            for peer in rule["from"]
        ]
        assert all("kubernetes.io/metadata.name" in namespace for namespace, _ in found)
        return [pods["app.kubernetes.io/name"] for _, pods in found]

    port = output.container("vllm")["ports"][0]["containerPort"]
    assert rule["ports"] == [{"protocol": "TCP", "port": port}]
    assert peers(rule) == ["llm-gateway", "prometheus"]
    (sync_port,) = output.container("lora-sync")["ports"]
    assert metrics_rule["ports"] == [{"protocol": "TCP", "port": sync_port["containerPort"]}]
    assert peers(metrics_rule) == ["prometheus"]
    assert metrics_rule["from"] == rule["from"][1:]
    assert output.one("Service")["spec"]["selector"].items() <= pod_labels.items()
    budget = output.one("PodDisruptionBudget")["spec"]
    assert budget["selector"]["matchLabels"].items() <= pod_labels.items()
    assert budget["maxUnavailable"] == 1


# -- what the page tells the reader to create ---------------------------------------------------


def test_every_secret_the_pods_read_is_one_the_page_says_to_create(
    rendered: dict[str, Rendered],
) -> None:
    command = r'^kubectl create secret generic ([\w-]+) -n "\$NAMESPACE" --from-\w+=(\w+)='
    created = dict(re.findall(command, page("kubernetes.md"), re.M))
    assert created == {"hf-token": "HF_TOKEN", "vllm-api-key": "VLLM_API_KEY"}
    for output in rendered.values():
        assert all(document["kind"] != "Secret" for document in output.documents)
        for container in output.all_containers():
            for source in output.secret_sources(container["name"]):
                assert source["name"] in created
                assert source.get("key", created[source["name"]]) == created[source["name"]]
                # Only the Hub token may be missing: a public model and public repos need none.
                assert source.get("optional", False) == (source["name"] == "hf-token")


def test_the_page_binds_the_identities_to_the_namespace_you_choose() -> None:
    text = page("kubernetes.md")
    bindings = re.findall(
        r"(--namespace \S+|\.svc\.id\.goog\[[^]]+\]|system:serviceaccount:\S+)", text
    )
    assert len(bindings) == 3  # IRSA, GKE Workload Identity, AKS workload identity
    assert all("${NAMESPACE}" in binding for binding in bindings), bindings
