"""The KubeRay deployment in ``cluster/``: rendered, validated and checked for what a deployment needs.

Fast and offline: no cluster, no kustomize binary, no network. The kustomizations are rendered by a
small renderer below that implements exactly the kustomize features they use (``resources``,
``namespace``, ``images``, JSON 6902 ``patches``) and refuses any other; where ``kubectl`` is
installed, its output is also compared with ``kubectl kustomize``. Then:

- RayCluster and RayJob are validated against KubeRay's CRD schemas (``shared/kuberay-crds``, v1.7)
  with unknown fields rejected; Deployment, Service, StatefulSet, ConfigMap, Secret, and the pod
  templates and metadata inside the Ray objects, against Kubernetes' own schemas
  (``kubernetes-validate``, strict);
- KubeRay's own admission rules that matter here (operator validation, v1.7) are checked;
- credentials come only from Secrets, on the head, every worker group and the submitter, and every
  Secret and key referenced is in ``secrets.example.yaml``; every ConfigMap, volume and Service
  selector resolves;
- the RayJob's entrypoint names files that exist in the image, a stable sweep name, parses as a
  ``prunetune sweep`` command line, and ``run-sweep.sh`` resumes rather than restarts (run against
  a stub ``prunetune`` fed with the CLI's real refusal messages);
- the MLflow server binds all interfaces, answers its Service's DNS names (MLflow's own host check),
  stores runs in the PostgreSQL deployed beside it and artifacts on S3;
- the cluster can hold the sweep's trials, and the CPU overlay has no GPU left in it.
"""
from __future__ import annotations

import copy
import fnmatch
import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
CRDS = REPO.parent / "shared" / "kuberay-crds"  # CI clones the repository with shared/ beside it
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
IMAGE_ROOT = "/home/ray/prunetune"  # where cluster/image/Dockerfile puts the repository
K8S_VERSION = "1.31"  # the oldest Kubernetes these manifests are checked against
KUSTOMIZATIONS = {"base": KUBERAY, "cpu": KUBERAY / "overlays" / "cpu"}
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE|CREDENTIAL", re.I)

needs_crds = pytest.mark.skipif(
    not CRDS.is_dir(), reason=f"KubeRay CRD schemas not found at {CRDS} (shared/ is cloned beside the repository)"
)


# --- a minimal kustomize ----------------------------------------------------------------------

_KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "resources", "patches", "images"}


def render(directory: Path, _building: tuple[Path, ...] = ()) -> list[dict]:
    """``kustomize build directory`` for the features the shipped kustomizations use.

    Order as kustomize's: resources (a directory is built first), patches, namespace, images.
    Anything else in a kustomization.yaml is refused rather than ignored, and so are kustomize's
    load errors that apply: a resource file outside the kustomization's directory, a base directory
    that contains one being built (an overlay inside its base: "cycle detected").
    """
    directory = directory.resolve()
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - _KUSTOMIZATION_FIELDS
    if unknown:
        raise NotImplementedError(f"{directory}: this renderer does not implement {sorted(unknown)}")
    building = (*_building, directory)
    docs: list[dict] = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            if any(b.is_relative_to(path) for b in building):
                raise ValueError(f"{directory}: cycle detected: {path} contains {directory}")
            docs += render(path, building)
        elif not path.is_relative_to(directory):
            raise ValueError(f"{directory}: {entry} is outside the kustomization's directory")
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    ids = [_resource_id(d) for d in docs]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise ValueError(f"{directory}: resources declared twice: {sorted(duplicates)}")
    for patch in k.get("patches", []):
        _apply_patch(docs, patch, directory)
    if "namespace" in k:
        for d in docs:
            d["metadata"]["namespace"] = k["namespace"]
    for image in k.get("images", []):
        for d in docs:
            _set_image(d, image)
    return docs


def _resource_id(doc: dict) -> tuple[str, str, str, str]:
    return doc["apiVersion"], doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


def _apply_patch(docs: list[dict], patch: dict, directory: Path) -> None:
    ops = yaml.safe_load((directory / patch["path"]).read_text()) if "path" in patch else yaml.safe_load(patch["patch"])
    if not isinstance(ops, list):
        raise NotImplementedError(f"{directory}: only JSON 6902 patches (a list of operations) are implemented")
    target = patch["target"]
    unknown = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unknown:
        raise NotImplementedError(f"{directory}: patch target selectors {sorted(unknown)}")
    matched = [d for d in docs if _selected(d, target)]
    if not matched:
        raise ValueError(f"{directory}: patch {patch.get('path')} matches no resource ({target})")
    for d in matched:
        json_patch(d, ops)


def _selected(doc: dict, target: dict) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    have = {"group": group, "version": version, "kind": doc["kind"],
            "name": doc["metadata"]["name"], "namespace": doc["metadata"].get("namespace", "")}
    # kustomize matches target fields as anchored regular expressions
    return all(re.fullmatch(str(v), have[k]) for k, v in target.items())


def json_patch(doc: dict, ops: list[dict]) -> None:
    """Apply RFC 6902 operations (add, remove, replace, test) to ``doc`` in place."""
    for op in ops:
        *parents, last = _pointer(op["path"])
        parent = doc
        for token in parents:
            parent = parent[int(token)] if isinstance(parent, list) else parent[token]
        kind = op["op"]
        if kind == "test":
            current = parent[int(last)] if isinstance(parent, list) else parent[last]
            if current != op["value"]:
                raise ValueError(f"test failed at {op['path']}: {current!r} != {op['value']!r}")
        elif kind == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        elif kind == "replace":
            if isinstance(parent, list):
                parent[int(last)] = copy.deepcopy(op["value"])
            elif last not in parent:
                raise KeyError(f"replace at {op['path']}: nothing there")
            else:
                parent[last] = copy.deepcopy(op["value"])
        elif kind == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
            else:
                parent[last] = copy.deepcopy(op["value"])
        else:
            raise NotImplementedError(f"JSON patch op {kind!r}")


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer {path!r} must start with /")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def _set_image(node, image: dict) -> None:
    """kustomize's images transformer: every ``image`` in a ``containers``/``initContainers`` list, anywhere."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    c["image"] = _new_image(c["image"], image)
            else:
                _set_image(value, image)
    elif isinstance(node, list):
        for item in node:
            _set_image(item, image)


def _new_image(ref: str, image: dict) -> str:
    name, _, digest = ref.partition("@")
    tag = ""
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    if name != image["name"]:
        return ref
    name = image.get("newName", name)
    if "digest" in image:
        return f"{name}@{image['digest']}"
    tag = image.get("newTag", tag)
    return f"{name}:{tag}" if tag else (f"{name}@{digest}" if digest else name)


# --- schemas --------------------------------------------------------------------------------

def _strict(schema: dict) -> dict:
    """An OpenAPI v3 CRD schema as JSON Schema in which fields not listed in ``properties`` are
    errors, except under ``additionalProperties`` or ``x-kubernetes-preserve-unknown-fields``."""
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {k: _strict(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = _strict(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = _strict(s["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [_strict(x) for x in s[key]]
    if s.pop("nullable", False) and "type" in s:
        s["type"] = [s["type"], "null"]
    return s


@functools.lru_cache(maxsize=None)
def _crd_schema(kind: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # 25,000 lines: libyaml's loader is 4x faster
    crd = yaml.load((CRDS / CRD_FILES[kind]).read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


@functools.lru_cache(maxsize=None)
def _crd_validator(kind: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(_strict(_crd_schema(kind)))


def crd_errors(doc: dict) -> list[str]:
    """Every way ``doc`` breaks its KubeRay CRD schema (v1): unknown fields, types, enums, required
    fields, patterns, and duplicate keys in list-type map/set lists. CEL rules are not evaluated."""
    assert doc["apiVersion"] == "ray.io/v1", doc["apiVersion"]
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in _crd_validator(doc["kind"]).iter_errors(doc)]
    return errors + _list_key_errors(_crd_schema(doc["kind"]), doc, doc["kind"])


def _list_key_errors(schema: dict, value, path: str) -> list[str]:
    errors = []
    if isinstance(value, dict):
        for k, v in value.items():
            sub = schema.get("properties", {}).get(k)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                errors += _list_key_errors(sub, v, f"{path}.{k}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "map":
            keys = [tuple(item.get(k) for k in schema["x-kubernetes-list-map-keys"]) for item in value]
        elif list_type == "set":
            keys = [json.dumps(item, sort_keys=True) for item in value]
        else:
            keys = []
        if len(keys) != len(set(keys)):
            errors.append(f"{path}: duplicate entries in a list-type {list_type} list")
        for i, item in enumerate(value):
            errors += _list_key_errors(schema["items"], item, f"{path}[{i}]")
    return errors


def k8s_errors(doc: dict) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{doc['kind']}/{doc['metadata'].get('name')}: {e.message} at {'.'.join(map(str, e.path))}"]
    return []


# --- rendered objects -------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _rendered(name: str) -> tuple[dict, ...]:
    return tuple(render(KUSTOMIZATIONS[name]))


@pytest.fixture(params=sorted(KUSTOMIZATIONS))
def docs(request) -> list[dict]:
    """A fresh copy of one rendered kustomization."""
    return copy.deepcopy(list(_rendered(request.param)))


def one(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def ray_cluster_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """(label, RayClusterSpec) of the RayCluster and of every RayJob's own cluster."""
    specs = [(f"RayCluster/{d['metadata']['name']}", d["spec"]) for d in of_kind(docs, "RayCluster")]
    specs += [(f"RayJob/{d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for d in of_kind(docs, "RayJob")]
    return specs


def ray_groups(spec: dict) -> list[tuple[str, dict]]:
    """(label, group) for the head and every worker group of a RayClusterSpec."""
    return [("head", spec["headGroupSpec"])] + [(f"worker group {g['groupName']}", g) for g in spec["workerGroupSpecs"]]


def pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    """(label, PodTemplateSpec) of every pod the rendered objects make."""
    out = []
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet"):
            out.append((name, d["spec"]["template"]))
    for label, spec in ray_cluster_specs(docs):
        out += [(f"{label} {group}", g["template"]) for group, g in ray_groups(spec)]
    for d in of_kind(docs, "RayJob"):
        if "submitterPodTemplate" in d["spec"]:
            out.append((f"RayJob/{d['metadata']['name']} submitter", d["spec"]["submitterPodTemplate"]))
    return out


def containers(template: dict) -> list[dict]:
    return template["spec"].get("initContainers", []) + template["spec"]["containers"]


def secret_refs(container: dict) -> set[tuple[str, str | None]]:
    """(secret, key) pairs a container reads, key None for a whole Secret through envFrom."""
    refs = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    return refs | {(e["secretRef"]["name"], None) for e in container.get("envFrom", []) if "secretRef" in e}


def example_secrets() -> dict[str, set[str]]:
    docs = [d for d in yaml.safe_load_all((KUBERAY / "secrets.example.yaml").read_text()) if d]
    return {d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {})) for d in docs}


def strings(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, str):
        yield node


def image_path(path: str) -> Path:
    """The repository file behind a path inside the image."""
    assert path.startswith(IMAGE_ROOT + "/"), f"{path} is not under {IMAGE_ROOT}"
    return REPO / path[len(IMAGE_ROOT) + 1:]


def quantity(value) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * units.get(unit, 1)


# --- the renderer itself ----------------------------------------------------------------------

def test_json_patch_follows_rfc_6902():
    doc = {"a": {"b/c": [1, 2], "m~n": 1}, "l": [{"x": 1}]}
    json_patch(doc, [
        {"op": "test", "path": "/a/b~1c/1", "value": 2},
        {"op": "add", "path": "/a/b~1c/-", "value": 3},
        {"op": "add", "path": "/a/b~1c/0", "value": 0},
        {"op": "replace", "path": "/a/m~0n", "value": 2},
        {"op": "remove", "path": "/l/0/x"},
        {"op": "add", "path": "/new", "value": {"k": "v"}},
    ])
    assert doc == {"a": {"b/c": [0, 1, 2, 3], "m~n": 2}, "l": [{}], "new": {"k": "v"}}
    for bad in ({"op": "test", "path": "/a/m~0n", "value": 3}, {"op": "replace", "path": "/nope", "value": 1},
                {"op": "remove", "path": "/nope"}, {"op": "move", "from": "/a", "path": "/b"}):
        with pytest.raises((ValueError, KeyError, NotImplementedError)):
            json_patch(copy.deepcopy(doc), [bad])


def test_images_are_set_like_kustomize():
    image = {"name": "prunetune", "newName": "reg.example/ml/prunetune"}
    assert _new_image("prunetune:0.1.0-gpu", image) == "reg.example/ml/prunetune:0.1.0-gpu"
    assert _new_image("prunetune", {"name": "prunetune", "newTag": "x"}) == "prunetune:x"
    assert _new_image("other/prunetune:1", image) == "other/prunetune:1"
    assert _new_image("localhost:5000/prunetune:1", {"name": "localhost:5000/prunetune", "newTag": "2"}) == "localhost:5000/prunetune:2"


def test_renderer_refuses_what_it_does_not_implement_or_kustomize_would_not_load(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(NotImplementedError, match="commonLabels"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text("resources: []\n")
    (tmp_path / "overlay").mkdir()
    (tmp_path / "overlay" / "kustomization.yaml").write_text("resources: [..]\n")
    with pytest.raises(ValueError, match="cycle"):
        render(tmp_path / "overlay")
    (tmp_path / "overlay" / "kustomization.yaml").write_text("resources: [../x.yaml]\n")
    with pytest.raises(ValueError, match="outside"):
        render(tmp_path / "overlay")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl here to cross-check the renderer with")
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_renderer_agrees_with_kubectl_kustomize(name):
    built = subprocess.run(["kubectl", "kustomize", str(KUSTOMIZATIONS[name])], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted((d for d in yaml.safe_load_all(built.stdout) if d), key=key) == sorted(_rendered(name), key=key)


# --- rendering and schemas --------------------------------------------------------------------

def test_kustomizations_render_the_deployment(docs):
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ConfigMap", "Service", "StatefulSet", "Service", "Deployment", "RayCluster", "RayJob"])
    assert {d["metadata"]["namespace"] for d in docs} == {"prunetune"}
    assert not of_kind(docs, "Secret"), "Secrets are created out of band, never rendered from git"


def test_secret_templates_stay_out_of_every_kustomization():
    for kustomization in KUBERAY.rglob("kustomization.yaml"):
        listed = yaml.safe_load(kustomization.read_text()).get("resources", [])
        assert not any("secret" in str(entry).lower() for entry in listed), kustomization


@needs_crds
def test_ray_objects_match_the_kuberay_crds(docs):
    for doc in of_kind(docs, "RayCluster") + of_kind(docs, "RayJob"):
        assert crd_errors(doc) == [], f"{doc['kind']}/{doc['metadata']['name']}"


@needs_crds
def test_crd_validation_rejects_unknown_fields_and_bad_values():
    cluster = copy.deepcopy(one(list(_rendered("base")), "RayCluster"))
    cluster["spec"]["headGroupSpec"]["rayStartParams"]["any-flag"] = "1"  # a string map: any key is fine
    assert crd_errors(cluster) == []
    cluster["spec"]["workerGroupSpecs"][0]["minReplica"] = 1
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["enviroment"] = []
    cluster["spec"]["authOptions"]["mode"] = "password"
    cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "2"
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"].append(
        {"name": "again", "containerPort": 8265})
    errors = "\n".join(crd_errors(cluster))
    for expected in ("'minReplica' was unexpected", "'enviroment' was unexpected", "'password' is not one of",
                     "'2' is not of type 'integer'", "duplicate entries"):
        assert expected in errors


def test_core_objects_match_kubernetes_schemas(docs):
    core = [d for d in docs if not d["apiVersion"].startswith("ray.io/")]
    assert core and all(k8s_errors(d) == [] for d in core), [e for d in core for e in k8s_errors(d)]


def test_pods_and_metadata_inside_ray_objects_match_kubernetes_schemas(docs):
    errors = []
    for d in of_kind(docs, "RayCluster") + of_kind(docs, "RayJob"):
        errors += k8s_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": d["metadata"]})
    for label, template in pod_templates(docs):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        errors += [f"{label}: {e}" for e in k8s_errors(wrapped)]
    assert errors == []


def test_secret_templates_match_kubernetes_schemas():
    docs = [d for d in yaml.safe_load_all((KUBERAY / "secrets.example.yaml").read_text()) if d]
    assert docs and all(d["kind"] == "Secret" for d in docs)
    assert [e for d in docs for e in k8s_errors(d)] == []


# --- KubeRay's own admission rules (ray-operator/controllers/ray/utils/validation.go, v1.7) ---

def test_kuberay_operator_would_accept_the_ray_objects(docs):
    dns1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
    for d in of_kind(docs, "RayCluster"):
        assert len(d["metadata"]["name"]) <= 53 and dns1035.fullmatch(d["metadata"]["name"])
    for d in of_kind(docs, "RayJob"):
        spec = d["spec"]
        assert len(d["metadata"]["name"]) <= 47 and dns1035.fullmatch(d["metadata"]["name"])
        assert "clusterSelector" not in spec, "backoffLimit retries need the RayJob's own cluster"
        assert spec.get("shutdownAfterJobFinishes") or not spec.get("ttlSecondsAfterFinished"), "ttl needs shutdown"
        assert "deletionStrategy" not in spec or not spec.get("shutdownAfterJobFinishes")
    for label, spec in ray_cluster_specs(docs):
        if spec.get("authOptions", {}).get("mode") == "token":
            assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52, 0), f"{label}: token auth needs Ray >= 2.52"
        for group_label, group in ray_groups(spec):
            params = group.get("rayStartParams", {})
            assert "labels" not in params, f"{label} {group_label}"
            assert not (group.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & set(params))
            assert group["template"]["spec"].get("restartPolicy", "Never") == "Never", "autoscaler v2"
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]


# --- credentials ------------------------------------------------------------------------------

def test_no_literal_secret_anywhere(docs):
    for label, template in pod_templates(docs):
        for c in containers(template):
            for e in c.get("env", []):
                if SECRETISH.search(e["name"]):
                    assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), f"{label}: {e['name']}"
    for cm in of_kind(docs, "ConfigMap"):
        assert not [k for k in cm.get("data", {}) if SECRETISH.search(k)], cm["metadata"]["name"]
    for s in strings(docs):
        for password in re.findall(r"://[^/\s:@]+:([^@\s/]+)@", s):
            assert re.fullmatch(r"\$\([A-Z_]+\)", password), f"a literal password in {s!r}"
        assert not re.search(r"AKIA[0-9A-Z]{16}", s)
    placeholders = {v for d in yaml.safe_load_all((KUBERAY / "secrets.example.yaml").read_text()) if d
                    for v in d["stringData"].values() if v.startswith("REPLACE")}
    assert placeholders and not placeholders & set(strings(docs))
    for d in of_kind(docs, "RayJob"):
        runtime_env = yaml.safe_load(d["spec"].get("runtimeEnvYAML") or "{}")
        assert "env_vars" not in runtime_env, "the dashboard shows a job's runtime_env"


def test_secret_templates_hold_placeholders_only():
    for d in yaml.safe_load_all((KUBERAY / "secrets.example.yaml").read_text()):
        for key, value in d["stringData"].items():
            if SECRETISH.search(key) or key in ("password", "auth_token"):
                assert value.startswith("REPLACE_WITH_"), f"{d['metadata']['name']}.{key}"


def test_every_referenced_secret_and_key_is_documented(docs):
    examples = example_secrets()
    referenced = set()
    for label, template in pod_templates(docs):
        for c in containers(template):
            referenced |= {(label, *ref) for ref in secret_refs(c)}
    for label, spec in ray_cluster_specs(docs):
        if "authOptions" in spec:
            referenced.add((label, spec["authOptions"]["secretName"], "auth_token"))  # the key KubeRay reads
    assert referenced
    for label, name, key in referenced:
        assert name in examples, f"{label} reads Secret {name}, which secrets.example.yaml does not declare"
        assert key is None or key in examples[name], f"{label} reads {name}.{key}"
    readme = (CLUSTER / "README.md").read_text()
    for name, keys in examples.items():
        assert f"kubectl -n prunetune create secret generic {name}" in readme, name
        assert all(f"--from-literal={k}=" in readme for k in keys), name


@pytest.mark.parametrize("part", ["head", "worker"])
def test_storage_credentials_and_endpoints_reach_every_ray_pod(docs, part):
    examples = example_secrets()
    for label, spec in ray_cluster_specs(docs):
        groups = [g for group_label, g in ray_groups(spec) if group_label.startswith(part)]
        assert groups, f"{label}: no {part}"
        for g in groups:
            ray_container = g["template"]["spec"]["containers"][0]
            secrets = {name for name, key in secret_refs(ray_container)}
            aws = [s for s in secrets if {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= examples.get(s, set())]
            assert aws, f"{label} {part}: no Secret with the S3 credentials"
            config_maps = {e["configMapRef"]["name"] for e in ray_container.get("envFrom", []) if "configMapRef" in e}
            data = {k for cm in of_kind(docs, "ConfigMap") if cm["metadata"]["name"] in config_maps for k in cm["data"]}
            assert {"MLFLOW_TRACKING_URI", "AWS_DEFAULT_REGION"} <= data, f"{label} {part}"


def test_token_auth_on_the_cluster_and_the_submitter(docs):
    for label, spec in ray_cluster_specs(docs):
        assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"], label
    for d in of_kind(docs, "RayJob"):
        secret = d["spec"]["rayClusterSpec"]["authOptions"]["secretName"]
        (submitter,) = d["spec"]["submitterPodTemplate"]["spec"]["containers"]
        env = {e["name"]: e for e in submitter.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", "submitter: RAY_AUTH_MODE"
        token = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
        assert token == {"name": secret, "key": "auth_token"}, "submitter: RAY_AUTH_TOKEN from the cluster's token Secret"


# --- references -------------------------------------------------------------------------------

def test_config_maps_volumes_and_selectors_resolve(docs):
    config_maps = {cm["metadata"]["name"]: cm.get("data", {}) for cm in of_kind(docs, "ConfigMap")}
    claims = {f"StatefulSet/{d['metadata']['name']}": {t["metadata"]["name"] for t in d["spec"].get("volumeClaimTemplates", [])}
              for d in of_kind(docs, "StatefulSet")}
    for label, template in pod_templates(docs):
        volumes = {v["name"] for v in template["spec"].get("volumes", [])} | claims.get(label, set())
        for c in containers(template):
            for e in c.get("envFrom", []):
                if "configMapRef" in e:
                    assert e["configMapRef"]["name"] in config_maps, label
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    assert ref["key"] in config_maps.get(ref["name"], {}) or ref.get("optional"), f"{label}: {ref}"
                for var in re.findall(r"\$\((\w+)\)", e.get("value", "")):
                    earlier = [x["name"] for x in c["env"][: c["env"].index(e)]]
                    assert var in earlier, f"{label}: {e['name']} uses $({var}) before it is defined"
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{label}: volumeMount {m['name']} has no volume"
    for d in of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items(), d["metadata"]["name"]
    for svc in of_kind(docs, "Service"):
        targets = [t for _, t in pod_templates(docs) if svc["spec"]["selector"].items() <= t.get("metadata", {}).get("labels", {}).items()]
        assert targets, f"Service {svc['metadata']['name']} selects no pod"
        ports = {p.get("name") for t in targets for c in t["spec"]["containers"] for p in c.get("ports", [])}
        ports |= {p["containerPort"] for t in targets for c in t["spec"]["containers"] for p in c.get("ports", [])}
        assert all(p["targetPort"] in ports for p in svc["spec"]["ports"]), svc["metadata"]["name"]


def test_one_image_for_every_ray_pod_and_the_submitter(docs):
    images = {c["image"] for label, t in pod_templates(docs) if label.startswith("Ray") for c in containers(t)}
    assert len(images) == 1, images
    (image,) = images
    assert re.fullmatch(r"prunetune:0\.1\.0-(gpu|cpu)", image)


# --- the Ray cluster --------------------------------------------------------------------------

def test_rayjob_cluster_is_the_rayclusters(docs):
    cluster = one(docs, "RayCluster")
    job = one(docs, "RayJob")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"], "rayjob-sweep.yaml and raycluster.yaml differ"


def test_head_runs_no_work_and_the_cluster_autoscales(docs):
    for label, spec in ray_cluster_specs(docs):
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", label
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["workerGroupSpecs"] and all(g["maxReplicas"] >= 1 for g in spec["workerGroupSpecs"])
        for _, g in ray_groups(spec):
            resources = g["template"]["spec"]["containers"][0]["resources"]
            assert resources["requests"] == resources["limits"], "Ray sizes itself from the limits"


def test_rayversion_is_the_images_ray(docs):
    dockerfile = (CLUSTER / "image" / "Dockerfile").read_text()
    (tag,) = re.findall(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)$", dockerfile, re.M)
    version, python, platform = tag.split("-")
    assert (python, platform) == ("py311", "gpu")
    assert {spec["rayVersion"] for _, spec in ray_cluster_specs(docs)} == {version}


def test_gpu_workers_request_gpus_tolerate_their_taint_and_select_their_nodes():
    for label, spec in ray_cluster_specs(list(_rendered("base"))):
        assert "nvidia.com/gpu" not in json.dumps(spec["headGroupSpec"]), f"{label}: the head needs no GPU"
        for g in spec["workerGroupSpecs"]:
            pod = g["template"]["spec"]
            resources = pod["containers"][0]["resources"]
            assert quantity(resources["limits"]["nvidia.com/gpu"]) >= 1
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
            assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
            assert pod["nodeSelector"], f"{label} {g['groupName']}: a GPU node pool"


def test_cpu_overlay_has_no_gpu_left():
    docs = list(_rendered("cpu"))
    assert "nvidia.com/gpu" not in json.dumps(docs)
    for label, template in pod_templates(docs):
        if label.startswith("Ray"):
            assert not template["spec"].get("tolerations") and not template["spec"].get("nodeSelector"), label
            assert all(c["image"].endswith(":0.1.0-cpu") for c in containers(template)), label
            for c in containers(template):
                assert quantity(c["resources"]["limits"].get("memory", "0")) <= 8 * 2**30, f"{label}: small pods"


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_ray_workers_keep_idle_processes_up_to_the_local_soft_limit(name):
    """Ray kills idle worker processes beyond ``num_workers_soft_limit`` (default: the node's CPUs).
    A worker pod with fewer CPUs than the local sweep's minimum must raise it, or the warm evaluation
    process dies during every Train trial; a bigger pod needs nothing (its default is larger)."""
    from orchestrator.cluster import MIN_WORKERS_SOFT_LIMIT

    checked = 0
    for label, spec in ray_cluster_specs(list(_rendered(name))):
        for group_label, group in ray_groups(spec):
            if group_label == "head":
                continue  # num-cpus 0: no tasks or actors run there
            (ray_container,) = group["template"]["spec"]["containers"]
            cpus = quantity(ray_container["resources"]["limits"]["cpu"])
            env = {e["name"]: e.get("value") for e in ray_container.get("env", [])}
            limit = int(env.get("RAY_num_workers_soft_limit", cpus))
            assert limit >= MIN_WORKERS_SOFT_LIMIT, f"{label} {group_label}: {cpus:g} CPUs, soft limit {limit}"
            checked += cpus < MIN_WORKERS_SOFT_LIMIT
    assert checked or name == "base", "the CPU overlay's small workers were not checked"


# --- the sweep job ----------------------------------------------------------------------------

def _entrypoint(doc: dict) -> tuple[Path, Path, str, list[str]]:
    """(script, config, sweep name, further options) of a RayJob's entrypoint."""
    tokens = doc["spec"]["entrypoint"].split()
    assert len(tokens) >= 3, doc["spec"]["entrypoint"]
    return image_path(tokens[0]), image_path(tokens[1]), tokens[2], tokens[3:]


def test_entrypoint_needs_no_shell(docs):
    # KubeRay's submitter pastes the entrypoint into its own `bash -c` line: $, ;, &&, quotes or globs
    # would act there, on the submitter, not in the job.
    for d in of_kind(docs, "RayJob"):
        for token in d["spec"]["entrypoint"].split():
            assert re.fullmatch(r"[A-Za-z0-9_./:=,@+%-]+", token), f"shell syntax in the entrypoint: {token!r}"


def test_entrypoint_names_files_that_exist(docs):
    for d in of_kind(docs, "RayJob"):
        script, config, _, _ = _entrypoint(d)
        assert script == KUBERAY / "run-sweep.sh" and os.access(script, os.X_OK), script
        assert config.is_file() and config.is_relative_to(CLUSTER / "examples"), config
    assert re.search(r"^prunetune\s*=", (REPO / "pyproject.toml").read_text(), re.M), "the command run-sweep.sh runs"
    assert "prunetune sweep" in (KUBERAY / "run-sweep.sh").read_text()
    dockerfile = (CLUSTER / "image" / "Dockerfile").read_text()
    assert re.search(rf"^WORKDIR {IMAGE_ROOT}$", dockerfile, re.M)
    assert re.search(r"^COPY --chown=\S+ cluster \./cluster$", dockerfile, re.M), "the image carries cluster/"


def test_entrypoint_runs_a_named_resumable_sweep_and_its_retries_resume(docs):
    from orchestrator.cli import _parser

    for d in of_kind(docs, "RayJob"):
        spec = d["spec"]
        assert spec["submissionMode"] == "K8sJobMode"
        assert spec["backoffLimit"] >= 1 and spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0
        _, config, name, options = _entrypoint(d)
        assert re.fullmatch(r"[a-z0-9][a-z0-9-]*[a-z0-9]", name), f"not a stable sweep name: {name!r}"
        for form in (["--resume", name], ["--name", name]):  # what run-sweep.sh runs
            args = _parser().parse_args(["sweep", str(config), *form, "--tracking-uri", "http://mlflow:5000", *options])
            assert (args.resume or args.name) == name and args.func.__name__ == "_cmd_sweep"


def test_the_sweep_fits_the_cluster_and_reaches_its_data_and_storage(docs):
    from orchestrator.cli import _parser
    from orchestrator.config import load_experiment, parse_set_args

    dockerfile = (CLUSTER / "image" / "Dockerfile").read_text()
    for d in of_kind(docs, "RayJob"):
        _, config, name, options = _entrypoint(d)
        args = _parser().parse_args(["sweep", str(config), "--name", name, *options])
        exp = load_experiment(config, parse_set_args(args.set))
        assert exp.storage_path.startswith("s3://"), "checkpoints on a multi-node cluster need shared storage"
        spec = d["spec"]["rayClusterSpec"]
        data = Path(exp.data.path)
        if data.is_relative_to(REPO):  # in the image: the Dockerfile must make it
            assert f"prunetune data digits --out {data.relative_to(REPO)}" in dockerfile
        else:
            for label, g in ray_groups(spec):
                mounts = [m["mountPath"] for m in g["template"]["spec"]["containers"][0].get("volumeMounts", [])]
                assert any(data.is_relative_to(m) for m in mounts), f"{label}: {data} is not mounted"
        r = exp.resources
        cpus, gpus = 0.0, 0.0
        fits_one_worker = False
        for g in spec["workerGroupSpecs"]:
            limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
            pod_cpu, pod_gpu = quantity(limits["cpu"]), quantity(limits.get("nvidia.com/gpu", 0))
            fits_one_worker |= pod_cpu >= r.cpus_per_worker and pod_gpu >= (r.gpus_per_worker or 0)
            cpus += g["maxReplicas"] * pod_cpu
            gpus += g["maxReplicas"] * pod_gpu
        trials = exp.sweep.max_concurrent_trials
        assert fits_one_worker, f"{config.name}: no worker pod holds one DDP worker"
        assert cpus >= trials * r.num_workers * r.cpus_per_worker, f"{config.name}: not enough CPUs"
        assert gpus >= trials * r.num_workers * (r.gpus_per_worker or 0), f"{config.name}: not enough GPUs"


# --- run-sweep.sh ------------------------------------------------------------------------------

STUB = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$CALLS"
case " $* " in
  *" --resume "*) echo "resuming..."; [ -n "$RESUME_ERR" ] && echo "prunetune: error: $RESUME_ERR" >&2; exit "$RESUME_RC";;
  *) echo "starting..."; exit "$START_RC";;
esac
"""


def _refusal(kind: str, name: str, tmp_path: Path) -> str:
    """The real message of ``prunetune sweep --resume NAME`` refusing, as the CLI prints it."""
    from orchestrator.errors import UserError
    from orchestrator.sweep import _resumable

    state = tmp_path / "state"
    if kind != "missing":
        state.mkdir()
        (state / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    run = SimpleNamespace(info=SimpleNamespace(status="FINISHED", run_id="0123abcd"))
    tracker = SimpleNamespace(experiment="e", uri="http://mlflow:5000",
                              find_sweep_run=lambda n: None if kind in ("no-run", "missing") else run)
    with pytest.raises(UserError) as refused:
        _resumable(tracker, name, str(state))
    return str(refused.value)


@pytest.mark.parametrize(
    ("refusal", "resume_rc", "start_rc", "expected_rc", "starts"),
    [
        (None, 0, 0, 0, False),            # resumed and finished
        (None, 130, 0, 130, False),        # interrupted again: the job fails, the next retry resumes
        ("missing", 2, 0, 0, True),        # first run: no sweep of that name yet, so it starts
        ("missing", 2, 1, 1, True),        # ... and its outcome is the job's
        ("finished", 2, 0, 0, False),      # a retry after the sweep finished: nothing to do
        ("no-run", 2, 0, 2, False),        # state without its MLflow run: an error, never a restart
    ],
)
def test_run_sweep_resumes_and_starts_only_a_missing_sweep(tmp_path, refusal, resume_rc, start_rc, expected_rc, starts):
    name = "deit-s-token-methods-1"
    (tmp_path / "bin").mkdir()
    stub = tmp_path / "bin" / "prunetune"
    stub.write_text(STUB)
    stub.chmod(0o755)
    env = {"PATH": f"{stub.parent}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls"),
           "RESUME_RC": str(resume_rc), "START_RC": str(start_rc), "MLFLOW_TRACKING_URI": "http://mlflow:5000",
           "RESUME_ERR": _refusal(refusal, name, tmp_path) if refusal else ""}
    done = subprocess.run([str(KUBERAY / "run-sweep.sh"), "c.yaml", name, "--set", "a=1"], env=env,
                          capture_output=True, text=True, timeout=30)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert done.returncode == expected_rc, done.stdout + done.stderr
    tail = "--tracking-uri http://mlflow:5000 --set a=1"
    assert calls == [f"sweep c.yaml --resume {name} {tail}"] + ([f"sweep c.yaml --name {name} {tail}"] if starts else [])


def test_run_sweep_needs_a_config_and_a_name():
    done = subprocess.run([str(KUBERAY / "run-sweep.sh"), "c.yaml"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "usage" in done.stderr


# --- MLflow and PostgreSQL --------------------------------------------------------------------

def _mlflow(docs: list[dict]) -> tuple[dict, dict, dict[str, str]]:
    """The MLflow server's Deployment, its container and its options."""
    (deployment,) = [d for d in of_kind(docs, "Deployment")
                     if d["spec"]["template"]["spec"]["containers"][0].get("command", [])[:2] == ["mlflow", "server"]]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    options = dict(a.removeprefix("--").split("=", 1) for a in container["args"])
    return deployment, container, options


def is_allowed_host_header(allowed: list[str], host: str) -> bool:
    """MLflow's host check (mlflow/server/security_utils.py, 3.17): an exact match, or an fnmatch
    pattern when the entry has a '*'. Restated: importing mlflow.server costs seconds."""
    return "*" in allowed or any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed)


def test_mlflow_listens_on_all_interfaces_and_answers_its_service_names(docs):
    deployment, container, options = _mlflow(docs)
    assert options["host"] == "0.0.0.0"
    allowed = [h.strip() for h in options["allowed-hosts"].split(",")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = [s for s in of_kind(docs, "Service") if s["spec"]["selector"].items() <= labels.items()]
    assert services
    for svc in services:
        name, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
        for host in (name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"):
            for port in svc["spec"]["ports"]:
                assert is_allowed_host_header(allowed, f"{host}:{port['port']}"), f"{host}:{port['port']}"
            assert is_allowed_host_header(allowed, host)
    assert is_allowed_host_header(allowed, "localhost:5000"), "kubectl port-forward"
    assert not is_allowed_host_header(allowed, "mlflow.attacker.example:5000")
    uri = one(docs, "ConfigMap")["data"]["MLFLOW_TRACKING_URI"]
    assert is_allowed_host_header(allowed, uri.split("://", 1)[1].rstrip("/")), uri
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"


def test_mlflow_stores_runs_in_the_postgres_beside_it_and_artifacts_on_s3(docs):
    _, container, options = _mlflow(docs)
    env = {e["name"]: e for e in container["env"]}
    uri = options.get("backend-store-uri") or env["MLFLOW_BACKEND_STORE_URI"]["value"]
    match = re.fullmatch(r"postgresql(\+\w+)?://\$\((\w+)\):\$\((\w+)\)@([^:/]+):([^/]+)/(.+)", uri)
    assert match, uri
    _, user, password, host, port, db = match.groups()
    for var in (user, password):
        assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "prunetune-postgres"
    literal = lambda v: env[v[2:-1]]["value"] if v.startswith("$(") else v  # noqa: E731
    host, port, db = literal(host), int(literal(port)), literal(db)
    (postgres,) = [s for s in of_kind(docs, "Service") if s["metadata"]["name"] == host]
    assert port in [p["port"] for p in postgres["spec"]["ports"]]
    (statefulset,) = [s for s in of_kind(docs, "StatefulSet")
                      if postgres["spec"]["selector"].items() <= s["spec"]["template"]["metadata"]["labels"].items()]
    pg_env = {e["name"]: e for e in statefulset["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert pg_env["POSTGRES_DB"]["value"] == db
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"] == env[password]["valueFrom"]
    assert pg_env["POSTGRES_USER"]["valueFrom"] == env[user]["valueFrom"]
    assert options["artifacts-destination"].startswith("s3://")
    assert "MLFLOW_S3_ENDPOINT_URL" in env
    assert {"prunetune-s3"} <= {name for name, _ in secret_refs(container)}


# --- documentation ----------------------------------------------------------------------------

def test_paths_the_cluster_readme_names_exist():
    readme = (CLUSTER / "README.md").read_text()
    named = re.findall(r"(?<![\w/.-])(?:cluster/)?((?:kuberay|image|examples)/[\w./-]*\w)", readme)
    assert len(named) > 10
    assert [p for p in set(named) if not (CLUSTER / p).exists()] == []


def test_manifest_files_are_all_used():
    used = {KUBERAY / "secrets.example.yaml", KUBERAY / "run-sweep.sh"}
    directories = {d.resolve() for d in KUSTOMIZATIONS.values()}
    while directories:
        directory = directories.pop()
        k = yaml.safe_load((directory / "kustomization.yaml").read_text())
        used.add(directory / "kustomization.yaml")
        for r in k.get("resources", []):
            path = (directory / r).resolve()
            if path.is_dir():
                directories.add(path)
            else:
                used.add(path)
        used |= {directory / p["path"] for p in k.get("patches", []) if "path" in p}
    files = {p for p in KUBERAY.rglob("*") if p.is_file()}
    assert files - used == set(), "files in cluster/kuberay that no kustomization uses"
