#!/usr/bin/env bash
# Checks the deployment artefacts under deploy/ offline (but for one pip install, the first time):
#   - Prometheus: promtool check rules, promtool test rules, promtool check config, and the
#     dashboard's queries parsed by promtool;
#   - Kubernetes: every manifest against the Kubernetes API schemas (kubernetes-validate, strict),
#     the ServiceMonitor against deploy/schemas/, and the manifests' cross-references;
#   - the ConfigMap's policy is policies/security-twin-baseline.yaml, its config agrees with the
#     StatefulSet (replicas, ports, paths, shutdown deadline);
#   - the Dockerfile's build steps are the README's set-up;
#   - every metric the rules, their tests and the dashboard use is one twinwatch exposes.
# Needs promtool (Debian: apt-get install -y prometheus) and python3 with venv; kubernetes-validate
# is installed from PyPI into a virtual environment kept under ~/.cache and reused.
# Usage: deploy/check.sh (from any directory). Exit 0 when everything passes.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '== %s\n' "$*"; }

command -v promtool >/dev/null || {
  echo "promtool not found: apt-get install -y prometheus" >&2
  exit 1
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step "promtool: rules, rule tests, example configuration"
promtool check rules deploy/prometheus/twinwatch-rules.yaml
promtool test rules deploy/prometheus/twinwatch-rules.test.yaml
promtool check config deploy/prometheus/prometheus.yml

# kubernetes-validate bundles the Kubernetes JSON schemas of each minor version (1.25 to 1.37 in
# 1.37.0) and validates offline. For a kind it has no schema for (a CRD such as ServiceMonitor,
# or a Kustomization) its command line only warns and exits 0, so the manifests are validated
# through its Python API below, where an unknown kind is an error, and the ServiceMonitor gets
# its own schema (deploy/schemas/).
kv_version=1.37.0
venv="${XDG_CACHE_HOME:-$HOME/.cache}/twinwatch-venvs/kubernetes-validate-$kv_version"
if ! "$venv/bin/python" -c "import sys, kubernetes_validate.version as v; sys.exit(v.__version__ != '$kv_version')" 2>/dev/null; then
  step "creating $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$kv_version"
fi

step "Kubernetes manifests, ConfigMap, Dockerfile, metric names"
TWINWATCH_CHECK_WORK="$work" "$venv/bin/python" - <<'PYTHON'
import glob, json, os, re, sys, tomllib

import jsonschema
import referencing
import yaml
import importlib_resources
import kubernetes_validate
from kubernetes_validate import utils as kv

root = os.getcwd()
work = os.environ["TWINWATCH_CHECK_WORK"]
problems = []


def fail(message):
    problems.append(message)


def read(path):
    with open(os.path.join(root, path), encoding="utf-8") as f:
        return f.read()


# ------------------------------------------------------------------------------------------
# Kubernetes: schemas.
# The oldest version the manifests support (the pod-index label needs 1.28) and the newest one
# kubernetes-validate knows.
versions = ["1.28.0", kv.latest_version()]
kdir = "deploy/kubernetes"
kustomization = yaml.safe_load(read(f"{kdir}/kustomization.yaml"))
listed = kustomization.get("resources", [])
present = sorted(os.path.basename(p) for p in glob.glob(os.path.join(root, kdir, "*.yaml"))
                 if os.path.basename(p) != "kustomization.yaml")
if sorted(listed) != present:
    fail(f"{kdir}/kustomization.yaml lists {sorted(listed)}, the directory has {present}")

servicemonitor_schema = json.loads(read("deploy/schemas/servicemonitor-monitoring-v1.json"))


def validate_custom(doc, schema, version):
    """Validates against a schema of ours whose $refs point into kubernetes-validate's
    definitions of that Kubernetes version (ObjectMeta, LabelSelector)."""
    schema_dir = f"v{version}-local-strict"
    defs = json.loads(importlib_resources.files("kubernetes_validate")
                      .joinpath(f"kubernetes-json-schema/{schema_dir}/_definitions.json").read_text())
    registry = (referencing.Resource.from_contents(schema)
                @ (referencing.Resource.from_contents(defs) @ referencing.Registry()))
    jsonschema.validators.Draft202012Validator(schema, registry=registry).validate(doc)


resources = {}  # (kind, name) -> document
for name in listed:
    path = f"{kdir}/{name}"
    try:
        docs = [d for d in yaml.safe_load_all(read(path)) if d]
    except (OSError, yaml.YAMLError) as e:
        fail(f"{path}: {e}")
        continue
    for doc in docs:
        kind, meta = doc.get("kind"), doc.get("metadata") or {}
        ident = f"{path}: {kind}/{meta.get('name')}"
        if "namespace" in meta:
            fail(f"{ident}: names a namespace (the manifests are namespace-agnostic)")
        resources[(kind, meta.get("name"))] = doc
        before = len(problems)
        for version in versions:
            try:
                if kind == "ServiceMonitor":
                    validate_custom(doc, servicemonitor_schema, version)
                else:
                    kv.validate(doc, version, strict=True)
            except jsonschema.ValidationError as e:
                where = ".".join(str(p) for p in e.absolute_path)
                fail(f"{ident} (Kubernetes {version}): {where}: {e.message}")
            except kv.SchemaNotFoundError as e:
                fail(f"{ident}: {e.message}: give it a schema in deploy/schemas/ and check.sh")
        if len(problems) == before:
            print(f"valid (strict, Kubernetes {', '.join(versions)}): {ident}")


# ------------------------------------------------------------------------------------------
# Kubernetes: what the schemas cannot see.
def get(kind, name):
    doc = resources.get((kind, name))
    if doc is None:
        fail(f"{kdir}: no {kind} named {name}")
    return doc or {}


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


sts = get("StatefulSet", "twinwatch")
cm = get("ConfigMap", "twinwatch")
spec = sts.get("spec", {})
pod = spec.get("template", {}).get("spec", {})
pod_labels = spec.get("template", {}).get("metadata", {}).get("labels", {})
container = next(iter(pod.get("containers", [])), {})
ports = {p.get("name"): p.get("containerPort") for p in container.get("ports", [])}
mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
volumes = {v["name"]: v for v in pod.get("volumes", [])}
env = {e["name"]: e for e in container.get("env", [])}

if not selects(spec.get("selector", {}).get("matchLabels"), pod_labels):
    fail("StatefulSet: the selector does not select the pod template's labels")
if spec.get("podManagementPolicy") != "Parallel":
    fail("StatefulSet: podManagementPolicy is not Parallel")
for svc_name, headless in [("twinwatch-headless", True), ("twinwatch", False)]:
    svc = get("Service", svc_name).get("spec", {})
    if not selects(svc.get("selector"), pod_labels):
        fail(f"Service {svc_name}: its selector does not select the pods")
    if (svc.get("clusterIP") == "None") != headless:
        fail(f"Service {svc_name}: headless should be {headless}")
    for p in svc.get("ports", []):
        if p.get("targetPort") not in ports and p.get("targetPort") not in ports.values():
            fail(f"Service {svc_name}: targetPort {p.get('targetPort')} is not a container port")
if spec.get("serviceName") != "twinwatch-headless":
    fail("StatefulSet: serviceName is not the headless Service twinwatch-headless")
pdb = get("PodDisruptionBudget", "twinwatch").get("spec", {})
if not selects(pdb.get("selector", {}).get("matchLabels"), pod_labels) or pdb.get("maxUnavailable") != 1:
    fail("PodDisruptionBudget: must select the pods with maxUnavailable 1")
sm = get("ServiceMonitor", "twinwatch").get("spec", {})
scraped = [name for (kind, name), doc in resources.items() if kind == "Service"
           and selects(sm.get("selector", {}).get("matchLabels"), doc["metadata"].get("labels", {}))]
if scraped != ["twinwatch-headless"]:
    fail(f"ServiceMonitor: selects the Services {scraped}, not the headless one alone (each pod once)")
for ep in sm.get("endpoints", []):
    if ep.get("port") not in ports or ep.get("path") != "/metrics":
        fail(f"ServiceMonitor: endpoint {ep} is not port http, path /metrics")
for probe, path in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")]:
    get_ = container.get(probe, {}).get("httpGet", {})
    if get_.get("path") != path or get_.get("port") not in ports:
        fail(f"StatefulSet: {probe} should be GET {path} on a named container port")
for var, (secret, key, optional) in {
    "TWINWATCH_EVENTHUB_CONNECTION_STRING": ("twinwatch-eventhub", "connection-string", None),
    "TWINWATCH_API_TOKEN": ("twinwatch-api", "token", None),
    "TWINWATCH_IOTHUB_CONNECTION_STRING": ("twinwatch-iothub", "connection-string", True),
}.items():
    ref = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef", {})
    if (ref.get("name"), ref.get("key"), ref.get("optional")) != (secret, key, optional):
        fail(f"StatefulSet: {var} should come from Secret {secret} key {key} (optional: {optional})")
ordinal = env.get("TWINWATCH_REPLICA_ORDINAL", {}).get("valueFrom", {}).get("fieldRef", {})
if ordinal.get("fieldPath") != "metadata.labels['apps.kubernetes.io/pod-index']":
    fail("StatefulSet: TWINWATCH_REPLICA_ORDINAL should come from the pod-index label")
sc = container.get("securityContext", {})
if not (sc.get("readOnlyRootFilesystem") and sc.get("capabilities", {}).get("drop") == ["ALL"]
        and pod.get("securityContext", {}).get("runAsNonRoot")):
    fail("StatefulSet: runAsNonRoot, readOnlyRootFilesystem and drop ALL are required")
for bound in ("requests", "limits"):
    if "ephemeral-storage" not in container.get("resources", {}).get(bound, {}):
        fail(f"StatefulSet: resources.{bound} needs an ephemeral-storage figure")
netpol = get("NetworkPolicy", "twinwatch").get("spec", {})
if not selects(netpol.get("podSelector", {}).get("matchLabels"), pod_labels) \
        or netpol.get("policyTypes") != ["Ingress"]:
    fail("NetworkPolicy: must select the pods and restrict their ingress")
for rule in netpol.get("ingress", []):
    if not rule.get("from"):
        fail("NetworkPolicy: an ingress rule without `from` admits everyone")
    for p in rule.get("ports", []):
        if p.get("port") not in ports and p.get("port") not in ports.values():
            fail(f"NetworkPolicy: port {p.get('port')} is not a container port")
claims = [c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])]
if mounts.get("/data") not in claims:
    fail("StatefulSet: /data is not mounted from a volumeClaimTemplate")
config_volume = volumes.get(mounts.get("/etc/twinwatch"), {}).get("configMap", {})
if config_volume.get("name") != "twinwatch":
    fail("StatefulSet: /etc/twinwatch is not the ConfigMap twinwatch")
mounted = {i["path"]: i["key"] for i in config_volume.get("items", [])}
for key in mounted.values():
    if key not in cm.get("data", {}):
        fail(f"StatefulSet: mounts ConfigMap key {key}, which the ConfigMap does not have")

# The ConfigMap: the policy is the repository's, the configuration agrees with the StatefulSet.
data = cm.get("data", {})
if data.get("security-twin-baseline.yaml") != read("policies/security-twin-baseline.yaml"):
    fail("ConfigMap: security-twin-baseline.yaml differs from policies/security-twin-baseline.yaml; "
         "copy it again: sed 's/^\\(.\\)/    \\1/' policies/security-twin-baseline.yaml")
try:
    config = tomllib.loads(data.get("twinwatch.toml", ""))
except tomllib.TOMLDecodeError as e:
    fail(f"ConfigMap: twinwatch.toml: {e}")
    config = {}
eventhub = config.get("eventhub", {})
if eventhub.get("partitions") != "ordinal":
    fail('ConfigMap: eventhub.partitions should be "ordinal"')
if eventhub.get("replicas") != spec.get("replicas"):
    fail(f"ConfigMap: eventhub.replicas = {eventhub.get('replicas')} but the StatefulSet has "
         f"replicas: {spec.get('replicas')}; they must be equal")
if not config.get("shutdown_deadline_secs", 30) < pod.get("terminationGracePeriodSeconds", 30):
    fail("StatefulSet: terminationGracePeriodSeconds must exceed shutdown_deadline_secs")
if config.get("data_dir") != "/data":
    fail("ConfigMap: data_dir should be /data, the volume")
listen_port = int(str(config.get("listen", "")).rpartition(":")[2] or 0)
if listen_port != ports.get("http"):
    fail(f"ConfigMap: listen port {listen_port} is not the container port http {ports.get('http')}")
for policy in config.get("policies", []):
    if not policy.startswith("/etc/twinwatch/") or policy[len("/etc/twinwatch/"):] not in mounted:
        fail(f"ConfigMap: policy {policy} is not mounted from the ConfigMap")

# ------------------------------------------------------------------------------------------
# Dockerfile: the build steps are the README's set-up.
dockerfile = read("deploy/Dockerfile")
readme = read("README.md")
build_deps = {"libclang-dev", "g++"}
readme_apt = re.search(r"apt-get install -y ([^\n`]*)", readme)
readme_packages = set(readme_apt.group(1).split()) if readme_apt else set()
if not build_deps <= readme_packages:
    fail(f"README.md: its apt-get install line no longer has {sorted(build_deps)}: update deploy/Dockerfile")
build_stage = dockerfile.split("\nFROM ", 2)
build_stage = build_stage[1] if len(build_stage) > 2 else ""
if not re.match(r"rust:[0-9.]+-bookworm AS build", build_stage):
    fail("deploy/Dockerfile: the first stage should be FROM rust:<version>-bookworm AS build")
docker_apt = re.search(r"apt-get install -y ([^&\\\n]*)", build_stage)
docker_packages = set(docker_apt.group(1).split()) if docker_apt else set()
if not build_deps <= docker_packages:
    fail(f"deploy/Dockerfile: the build stage must apt-get install -y {' '.join(sorted(build_deps))}")
if docker_packages - readme_packages:
    fail(f"deploy/Dockerfile: installs {sorted(docker_packages - readme_packages)}, which the README's set-up does not")
if not re.search(r"^\s*cargo build --release\b", build_stage, re.M):
    fail("deploy/Dockerfile: the build stage does not run cargo build --release")
rust_image = re.match(r"rust:([0-9]+)\.([0-9]+)", build_stage)
msrv = re.search(r'^rust-version\s*=\s*"([0-9]+)\.([0-9]+)', read("Cargo.toml"), re.M)
if rust_image and msrv and tuple(map(int, rust_image.groups())) < tuple(map(int, msrv.groups())):
    fail("deploy/Dockerfile: the rust image is older than Cargo.toml's rust-version")
for source in re.findall(r"^COPY (?!--from)(\S+) ", dockerfile, re.M):
    if source != "." and not os.path.exists(os.path.join(root, source)):
        fail(f"deploy/Dockerfile: COPY {source}: no such file")
default_config = tomllib.loads(read("deploy/twinwatch.toml"))
expose = re.search(r"^EXPOSE (\d+)", dockerfile, re.M)
if not expose or str(default_config.get("listen", "")).rpartition(":")[2] != expose.group(1):
    fail("deploy/Dockerfile: EXPOSE is not the port of deploy/twinwatch.toml's listen")
user = re.search(r"^USER (\d+)", dockerfile, re.M)
if not user or int(user.group(1)) != pod.get("securityContext", {}).get("runAsUser"):
    fail("deploy/Dockerfile: USER is not the StatefulSet's runAsUser")
for line in read(".dockerignore").split("\n"):
    pattern = line.strip()
    if pattern and not pattern.startswith("#") and pattern.rstrip("/") in ("src", "policies", "deploy", "Cargo.toml", "Cargo.lock", "benches"):
        fail(f".dockerignore: {pattern} is needed by the build")

# ------------------------------------------------------------------------------------------
# Metric names: every one the rules, their tests and the dashboard use is exposed.
exposed = {
    "twinwatch_messages_total", "twinwatch_dead_letters_total", "twinwatch_batches_total",
    "twinwatch_twins", "twinwatch_tombstones", "twinwatch_failing_twins", "twinwatch_alerts_total",
    "twinwatch_outbox_pending_alerts", "twinwatch_outbox_oldest_age_seconds",
    "twinwatch_sink_deliveries_total", "twinwatch_sink_retries_total",
    "twinwatch_sink_failures_total", "twinwatch_checkpoint_sequence_number",
    "twinwatch_partition_lag_events", "twinwatch_partition_connected",
    "twinwatch_receiver_reconnects_total", "twinwatch_receiver_displaced_total",
    "twinwatch_events_expired_total",
    "twinwatch_event_age_seconds", "twinwatch_rocksdb_memtable_bytes",
    "twinwatch_rocksdb_pending_compaction_bytes", "twinwatch_rocksdb_block_cache_usage_bytes",
    "twinwatch_rocksdb_live_sst_bytes", "twinwatch_ready", "twinwatch_build_info",
    "twinwatch_seed_passes_total", "twinwatch_seed_documents_total",
    "twinwatch_seed_twins_removed_total", "twinwatch_seed_last_complete_timestamp_seconds",
    "twinwatch_seed_running", "twinwatch_seed_throttled_total",
    "twinwatch_seed_throttled_seconds_total",
}
for histogram in ["twinwatch_batch_size_messages", "twinwatch_apply_duration_seconds",
                  "twinwatch_commit_duration_seconds", "twinwatch_enqueue_to_alert_seconds",
                  "twinwatch_seed_step_duration_seconds"]:
    exposed |= {histogram + suffix for suffix in ("_bucket", "_sum", "_count")}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan", "Inf", "NaN"}


def metric_names(expr):
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    e = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][\w:]*)(\s*\()?", e):
        if not m.group(2) and m.group(1) not in KEYWORDS:
            names.add(m.group(1))
    return names


def check_names(where, names):
    for name in sorted(names):
        if not (name.startswith("twinwatch_") or name.startswith("process_") or name == "up"):
            fail(f"{where}: {name} is not a twinwatch_, process_ or up metric")
        elif name.startswith("twinwatch_") and name not in exposed:
            fail(f"{where}: twinwatch does not expose {name}")


rules = yaml.safe_load(read("deploy/prometheus/twinwatch-rules.yaml"))
alerts = set()
for group in rules["groups"]:
    for rule in group["rules"]:
        alerts.add(rule.get("alert"))
        check_names(f"rule {rule.get('alert')}", metric_names(rule["expr"]))
        if rule.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
            fail(f"rule {rule.get('alert')}: no severity label")
        if not {"summary", "description"} <= set(rule.get("annotations", {})):
            fail(f"rule {rule.get('alert')}: summary and description annotations are required")
tests = yaml.safe_load(read("deploy/prometheus/twinwatch-rules.test.yaml"))
tested = set()
for test in tests["tests"]:
    for series in test.get("input_series", []):
        check_names("rule tests", {series["series"].split("{")[0]})
    tested |= {case["alertname"] for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
if alerts - tested:
    fail(f"rule tests: no test makes {sorted(alerts - tested)} fire")

dashboard_path = "deploy/grafana/twinwatch-dashboard.json"
try:
    dashboard = json.loads(read(dashboard_path))
except json.JSONDecodeError as e:
    fail(f"{dashboard_path}: {e}")
    dashboard = {}
variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
if variables.get("DS_PROMETHEUS", {}).get("type") != "datasource":
    fail(f"{dashboard_path}: no DS_PROMETHEUS data source variable")
exprs = []
for v in variables.values():
    query = v.get("query")
    query = query.get("query") if isinstance(query, dict) else query
    m = re.match(r"label_values\((.*),\s*\w+\)$", query or "")
    if m:
        exprs.append((f"variable {v['name']}", m.group(1)))
ids = []
panels = list(dashboard.get("panels", []))
for panel in panels:
    panels.extend(panel.get("panels", []))
    ids.append(panel.get("id"))
    if panel.get("type") != "row" and panel.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
        fail(f"{dashboard_path}: panel {panel.get('title')!r} does not use ${{DS_PROMETHEUS}}")
    for target in panel.get("targets", []):
        exprs.append((f"panel {panel.get('title')!r}", target["expr"]))
if len(ids) != len(set(ids)):
    fail(f"{dashboard_path}: panel ids are not unique")
recording = []
for where, expr in exprs:
    check_names(f"{dashboard_path}: {where}", metric_names(expr))
    # For promtool: Grafana's variables replaced by values it could take.
    promql = (expr.replace("$__rate_interval", "2m").replace("$__interval", "1m")
              .replace("$job", ".*").replace("$instance", ".*"))
    recording.append({"record": f"dashboard:query_{len(recording)}", "expr": promql})
with open(os.path.join(work, "dashboard-queries.yaml"), "w") as f:
    yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recording}]}, f)
print(f"{len(exprs)} dashboard queries and {len(alerts)} alerting rules use only exposed metrics")

if problems:
    print("\n".join(f"FAIL: {p}" for p in problems), file=sys.stderr)
    sys.exit(1)
PYTHON

step "promtool: the dashboard's queries parse"
promtool check rules "$work/dashboard-queries.yaml"

step "deploy/check.sh: everything passed"
