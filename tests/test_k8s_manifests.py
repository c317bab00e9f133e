"""k8s/*.yaml: valid against KubeRay's RayService CRD schema (as `kubectl apply` with strict field
validation sees it), sane Kubernetes objects, and the embedded Serve config equal to
deploy/serve_config.gpu.yaml's application."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO_DIR = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((REPO_DIR / "k8s").glob("*.yaml"))
# CI clones the repo with shared/ beside it; the copy under k8s/schema/ is the fallback.
CRD_CANDIDATES = [REPO_DIR.parent / "shared" / "kuberay" / "ray.io_rayservices.yaml",
                  REPO_DIR / "shared" / "kuberay" / "ray.io_rayservices.yaml",
                  REPO_DIR / "k8s" / "schema" / "ray.io_rayservices.yaml"]
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def crd_path() -> Path:
    for path in CRD_CANDIDATES:
        if path.is_file():
            return path
    raise AssertionError(f"RayService CRD not found in any of {[str(p) for p in CRD_CANDIDATES]}")


def strict(schema):
    """The CRD schema with unknown fields rejected, as the API server's strict field validation does
    (the default for `kubectl apply` since 1.27), except where the CRD preserves unknown fields."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def load_validator(path: Path):
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 1 MB: libyaml parses it 7x faster
    crd = yaml.load(path.read_text(), Loader=loader)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "RayService"
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = strict(version["schema"]["openAPIV3Schema"])
    # OpenAPI 3.0 schemas are closest to JSON Schema draft 4 (boolean exclusiveMaximum, no $schema).
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


@pytest.fixture(scope="module")
def rayservice_schema():
    return load_validator(crd_path())


@pytest.fixture(scope="module")
def docs():
    assert MANIFESTS, "no manifests in k8s/"
    out = []
    for path in MANIFESTS:
        out += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return out


def of_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def rayservice(docs):
    services = of_kind(docs, "RayService")
    assert len(services) == 1, "expected one RayService"
    return services[0]


def test_every_doc_is_a_kubernetes_object(docs):
    seen = set()
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
        name = doc["metadata"]["name"]
        assert DNS_LABEL.match(name) and len(name) <= 63, f"bad name {name!r}"
        assert (doc["kind"], name) not in seen, f"duplicate {doc['kind']}/{name}"
        seen.add((doc["kind"], name))
    assert {"RayService", "PersistentVolumeClaim"} <= {d["kind"] for d in docs}


def test_rayservice_matches_crd_schema(docs, rayservice_schema):
    svc = rayservice(docs)
    assert svc["apiVersion"] == "ray.io/v1"
    rayservice_schema.validate(svc)


def test_rayservice_matches_every_crd_copy(docs):
    """Where both the shared CRD and the committed copy exist (CI), the manifest satisfies each."""
    paths = [p for p in CRD_CANDIDATES if p.is_file()]
    seen = set()
    for path in paths:
        text = path.read_bytes()
        if text in seen:
            continue
        seen.add(text)
        load_validator(path).validate(rayservice(docs))
    assert seen


def test_schema_check_can_fail(docs, rayservice_schema):
    bad = copy.deepcopy(rayservice(docs))
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        rayservice_schema.validate(bad)
    bad = copy.deepcopy(rayservice(docs))
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 2  # typo: unknown field
    with pytest.raises(jsonschema.ValidationError):
        rayservice_schema.validate(bad)


def test_serve_config_v2_is_the_gpu_deploy_config(docs):
    from ray.serve.schema import ServeDeploySchema

    embedded = yaml.safe_load(rayservice(docs)["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    gpu = yaml.safe_load((REPO_DIR / "deploy" / "serve_config.gpu.yaml").read_text())
    # The one difference: on KubeRay the Ingress and JobQueue are pinned to the head pod.
    assert embedded["applications"][0]["args"].pop("control_plane_resource") == "wanserve-head"
    assert embedded == gpu


def test_cluster_layout(docs):
    from service.config import ServiceSettings

    spec = rayservice(docs)["spec"]
    app = yaml.safe_load(spec["serveConfigV2"])["applications"][0]
    settings = ServiceSettings(**app["args"])
    engine = next(d for d in app["deployments"] if d["name"] == "EngineReplica")
    cluster = spec["rayClusterConfig"]

    assert cluster["authOptions"]["mode"] == "token"  # the Ray dashboard runs code: not open in the cluster
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    # The resource the Ingress and JobQueue ask for is on the head, and on no worker group.
    head_resources = json.loads(json.loads(head["rayStartParams"]["resources"]))
    assert head_resources.get(settings.control_plane_resource) == 1
    assert all("resources" not in g["rayStartParams"] for g in cluster["workerGroupSpecs"])
    head_container = head["template"]["spec"]["containers"][0]
    assert 8000 in [p["containerPort"] for p in head_container["ports"]]

    (group,) = cluster["workerGroupSpecs"]
    pod = group["template"]["spec"]
    (container,) = pod["containers"]
    limits = container["resources"]["limits"]
    # One engine replica (STRICT_PACK placement group) per GPU pod: the pod has exactly its GPUs.
    assert int(limits["nvidia.com/gpu"]) == settings.gpus
    assert group["maxReplicas"] == engine["autoscaling_config"]["max_replicas"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env.get("NCCL_DEBUG") and "NCCL_NVLS_ENABLE" not in env

    # A deleted or evicted GPU pod drains first (wanserve drain-node): Ray's drain deadline must leave
    # Serve drain_timeout_s to stop the engine replica gracefully, and Kubernetes must wait for the hook.
    hook = container["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[:2] == ["wanserve", "drain-node"]
    deadline_s = int(hook[hook.index("--deadline-s") + 1])
    assert settings.drain_timeout_s < deadline_s < pod["terminationGracePeriodSeconds"]

    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/-/healthz" and probe["port"] == 8000

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]["name"]]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert _bytes(shm["emptyDir"]["sizeLimit"]) >= 8 * 2**30
    assert _bytes(group["rayStartParams"]["object-store-memory"]) < _bytes(shm["emptyDir"]["sizeLimit"])

    claims = {pvc["metadata"]["name"]: pvc for pvc in of_kind(docs, "PersistentVolumeClaim")}
    model_mount = next(m for path, m in mounts.items() if settings.model.startswith(path.rstrip("/") + "/"))
    model_volume = volumes[model_mount["name"]]["persistentVolumeClaim"]
    assert model_mount["readOnly"] is True and model_volume["readOnly"] is True
    # Ray pods read the weights; the claim must still be writable, or nothing can copy them in.
    assert "ReadWriteMany" in claims[model_volume["claimName"]]["spec"]["accessModes"]
    data_mount = next(m for path, m in mounts.items() if settings.data_dir.startswith(path.rstrip("/") + "/"))
    assert not data_mount.get("readOnly")
    data_claim = claims[volumes[data_mount["name"]]["persistentVolumeClaim"]["claimName"]]
    assert "ReadWriteMany" in data_claim["spec"]["accessModes"]  # workers write, the ingress reads
    token_mount = next(m for path, m in mounts.items() if settings.auth_token_file.startswith(path + "/"))
    assert "secret" in volumes[token_mount["name"]]


def test_pvcs_and_serve_service(docs):
    for pvc in of_kind(docs, "PersistentVolumeClaim"):
        assert pvc["apiVersion"] == "v1"
        assert pvc["spec"]["accessModes"] and _bytes(pvc["spec"]["resources"]["requests"]["storage"]) > 0
    service = rayservice(docs)["spec"]["serveService"]
    ports = service["spec"]["ports"]
    assert [(p["port"], p["targetPort"]) for p in ports] == [(8000, 8000)]


def _bytes(quantity) -> int:
    """A Kubernetes quantity ("32Gi", "500G", "10000000000") in bytes."""
    match = re.fullmatch(r"(\d+)([KMGTP]i?)?", str(quantity))
    assert match, f"not a quantity: {quantity!r}"
    number, unit = int(match.group(1)), match.group(2) or ""
    power = "KMGTP".index(unit[0]) + 1 if unit else 0
    return number * ((1024 if unit.endswith("i") else 1000) ** power)
