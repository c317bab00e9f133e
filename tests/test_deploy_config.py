"""deploy/serve_config*.yaml: valid for Ray Serve's own schema, ``args`` valid ServiceSettings, and the
deployment overrides consistent with what ``service.app:build_app`` builds from those args."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
import yaml

REPO_DIR = Path(__file__).resolve().parent.parent
CONFIGS = [REPO_DIR / "deploy" / "serve_config.yaml", REPO_DIR / "deploy" / "serve_config.gpu.yaml"]


def load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def unknown_keys(model_cls, data: Any, where: str = "") -> list[str]:
    """Keys that ``model_cls`` (a pydantic model) does not define, recursively.

    Serve's schemas accept and silently ignore unknown keys (forward compatibility), so a typo such
    as ``max_ongoing_request`` would be dropped without a word; this finds them.
    """

    if not isinstance(data, dict):
        return []
    found = []
    fields = model_cls.model_fields
    aliases = {f.alias: name for name, f in fields.items() if f.alias}
    for key, value in data.items():
        name = aliases.get(key, key)
        if name not in fields:
            found.append(f"{where}{key}")
            continue
        for sub in _model_types(fields[name].annotation):
            if isinstance(value, list):
                for i, item in enumerate(value):
                    found += unknown_keys(sub, item, f"{where}{key}[{i}].")
            else:
                found += unknown_keys(sub, value, f"{where}{key}.")
            break
    return found


def _model_types(annotation) -> list:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out = []
    for arg in get_args(annotation) if get_origin(annotation) is not None else []:
        out += _model_types(arg)
    return out


@pytest.fixture(autouse=True)
def _no_wanserve_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("WANSERVE_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_valid_serve_deploy_schema(path):
    from ray.serve.schema import ServeDeploySchema

    data = load(path)
    schema = ServeDeploySchema.model_validate(data)
    assert unknown_keys(ServeDeploySchema, data) == [], "keys Ray Serve would silently ignore"
    assert len(schema.applications) == 1
    app = schema.applications[0]
    assert app.import_path == "service.app:build_app"
    assert app.route_prefix == "/"
    assert schema.http_options.port == 8000 and schema.http_options.host == "0.0.0.0"
    # Jobs take minutes and their event streams last as long: no short proxy timeout.
    assert schema.http_options.request_timeout_s is None or schema.http_options.request_timeout_s >= 600


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_args_are_service_settings(path):
    from service.config import ServiceSettings

    args = load(path)["applications"][0]["args"]
    settings = ServiceSettings(**args)  # extra="forbid": an unknown or misspelt field fails here
    settings.variant_spec  # the variant resolves (from the folder name for the GPU config)
    assert Path(settings.data_dir).is_absolute(), "replicas run in other working directories"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_deployment_overrides_match_the_app(path):
    from ray.serve._private.build_app import build_app as serve_build  # what `serve build` uses

    from service.app import build_app
    from service.config import ServiceSettings
    from service.engine import engine_bundles

    app_cfg = load(path)["applications"][0]
    args = dict(app_cfg["args"])
    args.pop("auth_token_file", None)  # a secret mounted on the cluster, absent here
    settings = ServiceSettings(**args)
    built = serve_build(build_app(args), name=app_cfg["name"])
    names = {d.name for d in built.deployments}
    assert names == {"Ingress", "JobQueue", "EngineReplica"}, names
    overrides = {d["name"]: d for d in app_cfg["deployments"]}
    assert set(overrides) <= names, f"overrides for deployments the app does not have: {set(overrides) - names}"

    engine = overrides["EngineReplica"]
    assert engine["max_ongoing_requests"] == 1
    # One bundle for the replica, one per worker rank: GPU bundles with gpus > 0.
    assert engine["placement_group_bundles"] == engine_bundles(settings)
    assert len(engine["placement_group_bundles"]) == settings.world_size + 1
    assert engine["placement_group_strategy"] == "STRICT_PACK"
    assert engine["health_check_timeout_s"] >= settings.health_timeout_s
    scaling = engine["autoscaling_config"]
    assert scaling["min_replicas"] <= scaling["initial_replicas"] <= scaling["max_replicas"]
    # The dispatcher sends at most engine_replicas jobs at once: more replicas would sit idle.
    assert scaling["max_replicas"] == settings.engine_replicas
    assert overrides["JobQueue"]["num_replicas"] == 1  # the single writer of the database


def test_cpu_default_is_the_tiny_demo():
    from service.config import ServiceSettings

    settings = ServiceSettings(**load(CONFIGS[0])["applications"][0]["args"])
    assert settings.model == "tiny" and settings.gpus == 0 and settings.cpu_workers == 2
    assert settings.variant_spec.tiny


def test_gpu_config_uses_gpus():
    from service.config import ServiceSettings

    settings = ServiceSettings(**load(CONFIGS[1])["applications"][0]["args"])
    assert settings.gpus >= 2 and settings.model != "tiny"
    assert settings.variant_spec.name == "wan2.1-t2v-14b"


def test_unknown_key_check_catches_typos():
    from ray.serve.schema import ServeDeploySchema

    data = load(CONFIGS[0])
    data["applications"][0]["deployments"][2]["max_ongoing_request"] = 1
    data["http_options"]["request_timeout"] = 5
    ServeDeploySchema.model_validate(data)  # Serve itself accepts both typos...
    assert sorted(unknown_keys(ServeDeploySchema, data)) == [
        "applications[0].deployments[2].max_ongoing_request", "http_options.request_timeout"]


def test_readme_documents_every_setting():
    from service.config import ServiceSettings

    readme = (REPO_DIR / "README.md").read_text()
    missing = [name for name in ServiceSettings.model_fields if f"`{name}`" not in readme]
    assert missing == [], f"README.md's configuration reference lacks {missing}"


def test_control_plane_resource_pins_the_ingress_and_jobqueue():
    from ray.serve._private.build_app import build_app as serve_build

    from service.app import build_app

    built = serve_build(build_app({"control_plane_resource": "wanserve-head"}), name="wanserve")
    options = {d.name: d.ray_actor_options for d in built.deployments}
    for name in ("Ingress", "JobQueue"):
        assert options[name]["resources"] == {"wanserve-head": 0.001} and options[name]["num_cpus"] == 0
    assert "wanserve-head" not in (options["EngineReplica"] or {}).get("resources", {})
    plain = {d.name: d.ray_actor_options for d in serve_build(build_app({}), name="wanserve").deployments}
    assert "resources" not in plain["JobQueue"] or not plain["JobQueue"]["resources"]
