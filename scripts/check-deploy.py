"""The names the deployment files share must agree with each other and with the code.

Run by scripts/test (with a Python that has PyYAML) after `docker-compose config` and
`kubernetes-validate` have checked each file's own syntax and schema. What no schema sees:

- every environment variable the files set is one the binaries read (the README's
  configuration table, which a test keeps equal to the code's settings);
- the ports agree: the listen address each file sets, the container ports, the Service's
  target, the scrape annotations, the compose Prometheus's targets, the Dockerfile;
- every probe asks for a route the probed binary serves;
- every rule file the compose Prometheus loads is mounted into its container;
- the autoscaler scales a Deployment that exists.

Metric names in the dashboard, the alerts and the autoscaler's queries are checked against a
running process by crates/worker/tests/prometheus.rs.
"""

import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
problems = []


def problem(where, what):
    problems.append(f"{where}: {what}")


def load_all(path):
    return [d for d in yaml.safe_load_all((ROOT / path).read_text()) if d]


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def settings():
    names = set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", (ROOT / "README.md").read_text(), re.M))
    if len(names) < 10:
        sys.exit(f"README.md: found only {sorted(names)} in the configuration table")
    return names


def routes(crate_dir):
    found = set()
    for f in (ROOT / crate_dir).rglob("*.rs"):
        found.update(re.findall(r'#\[get\("([^"{}]+)"\)\]', f.read_text()))
    return found


SETTINGS = settings()
# Read by the container images' entrypoints or by Debian's PostgreSQL image, not by us.
FOREIGN_ENV = {"POSTGRES_HOST_AUTH_METHOD"}
SERVED = {"api": routes("crates/api/src"), "worker": routes("crates/worker/src")}
for binary, paths in SERVED.items():
    if "/healthz" not in paths:
        sys.exit(f"no /healthz route found in the {binary}'s code: {sorted(paths)}")


def check_env(where, names):
    for name in names:
        if name not in SETTINGS and name not in FOREIGN_ENV and not name.startswith(("GF_",)):
            problem(where, f"sets {name}, which no binary reads (not in the README's table)")


# --- Dockerfile: the listen ports each image sets and exposes.
dockerfile = (ROOT / "deploy/Dockerfile").read_text()
image_port = {}
for target, var in (("api", "HTTP_ADDR"), ("worker", "METRICS_ADDR")):
    stage = re.search(rf"^FROM .* AS {target}\n(.*?)(?=^FROM |\Z)", dockerfile, re.M | re.S)
    if not stage:
        problem("deploy/Dockerfile", f"no stage named {target}")
        continue
    env = re.search(rf"^ENV {var}=(\S+)", stage.group(1), re.M)
    expose = re.findall(r"^EXPOSE (\d+)", stage.group(1), re.M)
    if not env:
        problem("deploy/Dockerfile", f"stage {target} sets no {var}")
        continue
    image_port[target] = port_of(env.group(1))
    if str(image_port[target]) not in expose:
        problem("deploy/Dockerfile", f"stage {target} listens on {image_port[target]} but exposes {expose}")

# --- docker-compose.yml
compose = load_all("docker-compose.yml")[0]
services = compose["services"]
for name in ("api", "worker"):
    env = services[name].get("environment", {})
    check_env(f"docker-compose.yml {name}", env)
api_port = port_of(services["api"]["environment"]["HTTP_ADDR"])
published = [str(p).split(":")[-1] for p in services["api"].get("ports", [])]
if str(api_port) not in published:
    problem("docker-compose.yml api", f"listens on {api_port} but publishes {published}")
worker_port = port_of(services["worker"]["environment"]["METRICS_ADDR"])
if str(worker_port) not in [str(p) for p in services["worker"].get("expose", [])]:
    problem("docker-compose.yml worker", f"metrics on {worker_port} but exposes {services['worker'].get('expose')}")
for name, port in (("api", api_port), ("worker", worker_port)):
    if image_port.get(name) not in (None, port):
        problem("docker-compose.yml", f"{name} on {port}, its image on {image_port[name]}")

# --- deploy/prometheus/prometheus.yml, as the compose stack runs it.
prom = load_all("deploy/prometheus/prometheus.yml")[0]
jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
api_targets = [t for c in jobs["stalewatch-api"].get("static_configs", []) for t in c["targets"]]
if not any(t.endswith(f"api:{api_port}") for t in api_targets):
    problem("prometheus.yml", f"scrapes the API at {api_targets}, compose serves it on api:{api_port}")
worker_sd = [c.get("port") for c in jobs["stalewatch-worker"].get("dns_sd_configs", [])]
if worker_port not in worker_sd:
    problem("prometheus.yml", f"scrapes workers on ports {worker_sd}, compose serves metrics on {worker_port}")
mounted = {pathlib.PurePosixPath(v.split(":")[1]).name for v in services["prometheus"].get("volumes", [])}
for rule_file in prom.get("rule_files", []):
    if not (ROOT / "deploy/prometheus" / rule_file).exists():
        problem("prometheus.yml", f"loads {rule_file}, which deploy/prometheus does not hold")
    if pathlib.PurePosixPath(rule_file).name not in mounted:
        problem("docker-compose.yml prometheus", f"prometheus.yml loads {rule_file}, which is not mounted")

# --- deploy/k8s
deployments = {}
for path in sorted((ROOT / "deploy/k8s").glob("*.yaml")):
    for doc in load_all(path.relative_to(ROOT)):
        where = f"{path.relative_to(ROOT)} {doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "ConfigMap":
            check_env(where, doc.get("data", {}))
        elif doc["kind"] == "Secret":
            check_env(where, {**doc.get("stringData", {}), **doc.get("data", {})})
        elif doc["kind"] == "Deployment":
            deployments[doc["metadata"]["name"]] = (where, doc)
        elif doc["kind"] == "Service":
            deployments.setdefault("services", []).append((where, doc))

LISTEN = {"stalewatch-api": ("api", "HTTP_ADDR"), "stalewatch-worker": ("worker", "METRICS_ADDR")}
pod_ports = {}
for name, (binary, var) in LISTEN.items():
    if name not in deployments:
        problem("deploy/k8s", f"no Deployment {name}")
        continue
    where, doc = deployments[name]
    pod = doc["spec"]["template"]
    (container,) = [c for c in pod["spec"]["containers"]]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    check_env(where, env)
    listen = port_of(env.get(var) or f":{image_port.get(binary)}")
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    pod_ports[name] = ports
    if listen not in ports.values():
        problem(where, f"listens on {listen} ({var}) but declares container ports {ports}")
    annotated = pod["metadata"].get("annotations", {}).get("prometheus.io/port")
    if annotated is not None and int(annotated) != listen:
        problem(where, f"prometheus.io/port {annotated}, but {var} listens on {listen}")
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe = container.get(kind)
        if not probe or "httpGet" not in probe:
            continue
        get = probe["httpGet"]
        if get["path"] not in SERVED[binary]:
            problem(where, f"{kind} asks for {get['path']}, which the {binary} does not serve")
        port = get["port"]
        if (ports.get(port) if isinstance(port, str) else port) != listen:
            problem(where, f"{kind} probes port {port}, the {binary} listens on {listen}")
for where, svc in deployments.get("services", []):
    selected = svc["spec"]["selector"].get("app.kubernetes.io/name")
    for port in svc["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        known = pod_ports.get(selected)
        if known is None:
            continue
        if (target not in known) if isinstance(target, str) else (target not in known.values()):
            problem(where, f"targets port {target}, the pods of {selected} declare {known}")

# --- deploy/k8s/autoscaling
for path in sorted((ROOT / "deploy/k8s/autoscaling").glob("*.yaml")):
    for doc in load_all(path.relative_to(ROOT)):
        where = f"{path.relative_to(ROOT)} {doc['kind']}/{doc['metadata']['name']}"
        target = doc["spec"]["scaleTargetRef"]["name"]
        if target not in deployments:
            problem(where, f"scales {target}, which is no Deployment in deploy/k8s")
        if not doc["spec"].get("triggers"):
            problem(where, "has no triggers")

if problems:
    print("deployment files disagree:", *problems, sep="\n  ", file=sys.stderr)
    sys.exit(1)
print(f"deployment files agree ({len(SETTINGS)} settings, {len(deployments) - ('services' in deployments)} deployments checked)")
