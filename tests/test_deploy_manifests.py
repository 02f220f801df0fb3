"""deploy/: the kustomize base and the example overlay render with the real ``kubectl
kustomize``, every object validates against the Kubernetes 1.33 schemas in strict mode
(``kubernetes-validate``, offline: the schemas ship in the package), and the rendered
objects have the properties the deployment promises -- RBAC, a locked-down gateway pod,
guest pods without API access, a Service that keeps client addresses."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploykit import (
    BASE,
    GATEWAY_NS,
    GUEST_NS,
    OVERLAY,
    ROOT,
    TREES,
    Obj,
    find,
    gateway_config,
    kubectl,
    one,
    render,
)
from support import kubectl_versions

from kuberun_trio.server.config import parse_server_config

pytestmark = pytest.mark.skipif(kubectl() is None, reason="kubectl is not installed")

K8S_VERSION = "1.33"


def validate(obj: Obj) -> None:
    """Strict 1.33 validation; an unknown kind is a failure, not a warning."""
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {exc.message}")
    except kubernetes_validate.SchemaNotFoundError as exc:
        pytest.fail(exc.message)


def deployment(tree: str) -> Obj:
    return one(render(tree), "Deployment", "kuberun-trio", GATEWAY_NS)


def gateway_container(tree: str) -> Obj:
    (container,) = deployment(tree)["spec"]["template"]["spec"]["containers"]
    return container


def container_port(container: Obj, port: int | str) -> int:
    """A probe's or Service's port (a number or a port name) as the container's number."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("tree", TREES)
def test_renders_every_piece(tree: str) -> None:
    objects = render(tree)
    kinds = {o["kind"] for o in objects}
    assert kinds >= {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap",
                     "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"}
    assert {o["metadata"]["name"] for o in find(objects, "Namespace")} == {GATEWAY_NS, GUEST_NS}
    for obj in objects:  # nothing lands in "default" by accident
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") in (GATEWAY_NS, GUEST_NS), obj["metadata"]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""
    def refuse(*args: object, **kwargs: object) -> None:
        pytest.fail(f"network access: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.usefixtures("offline")
def test_every_object_validates_strictly_against_1_33(tree: str) -> None:
    objects = render(tree)
    for obj in objects:
        validate(obj)


def test_renders_the_same_with_every_tested_kubectl() -> None:
    """The newest kubectl and 1.30 (the versions the tests use) agree on the output."""
    binaries = kubectl_versions()
    if len(binaries) < 2:
        pytest.skip("needs the versioned kubectl binaries")
    outputs = {subprocess.run([b, "kustomize", OVERLAY], cwd=ROOT, capture_output=True,
                              text=True, check=True, timeout=60).stdout for b in binaries}
    assert len(outputs) == 1


def test_strict_validation_catches_a_typo() -> None:
    """The check above can fail: a misspelt field is refused."""
    service = yaml.safe_load(yaml.safe_dump(one(render(BASE), "Service")))
    service["spec"]["externalTraficPolicy"] = "Local"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, K8S_VERSION, strict=True)


@pytest.mark.parametrize("tree", TREES)
def test_guest_pod_template_is_a_valid_locked_down_pod(tree: str) -> None:
    raw = gateway_config(render(tree))
    config = parse_server_config(raw, instance="test")
    assert config.kubernetes.connection.source == "inCluster"
    assert config.ssh.address == ("0.0.0.0", 2222)
    assert config.ssh.host_keys and config.auth.authorized_keys
    pod = config.kubernetes.pod
    assert pod.metadata["namespace"] == GUEST_NS
    validate({"apiVersion": "v1", "kind": "Pod", "metadata": dict(pod.metadata),
              "spec": dict(pod.spec)})
    spec = pod.spec
    assert spec["automountServiceAccountToken"] is False
    context = spec["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] != 0
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    for container in spec["containers"]:
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["limits"]["memory"]


def rules(role: Obj) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


@pytest.mark.parametrize("tree", TREES)
def test_rbac_grants_what_the_gateway_needs_and_no_more(tree: str) -> None:
    objects = render(tree)
    guest = {("", "pods", v) for v in ("create", "get", "list", "watch", "delete", "patch")}
    guest |= {("", sub, v) for sub in ("pods/exec", "pods/portforward", "pods/attach")
              for v in ("get", "create")}
    guest |= {("", "events", "list")}
    leases = {("coordination.k8s.io", "leases", v)
              for v in ("get", "list", "watch", "create", "update", "delete")}
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): rules(r)
             for r in find(objects, "Role")}
    assert sorted(roles.values(), key=len) == [leases, guest]
    assert find(objects, "ClusterRole") == [] and find(objects, "ClusterRoleBinding") == []
    (account,) = find(objects, "ServiceAccount")
    pod_spec = deployment(tree)["spec"]["template"]["spec"]
    assert pod_spec["serviceAccountName"] == account["metadata"]["name"]
    bound = {}
    for binding in find(objects, "RoleBinding"):
        ns = binding["metadata"]["namespace"]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kuberun-trio",
                                        "namespace": GATEWAY_NS}]
        assert binding["roleRef"]["kind"] == "Role"
        bound[ns] = roles[(ns, binding["roleRef"]["name"])]
    assert bound == {GUEST_NS: guest, GATEWAY_NS: leases}


@pytest.mark.parametrize("tree", TREES)
def test_gateway_pod_is_locked_down(tree: str) -> None:
    spec = deployment(tree)["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]["spec"]
    container = gateway_container(tree)
    pod_context, context = pod["securityContext"], container["securityContext"]
    assert pod_context["runAsNonRoot"] is True and pod_context["runAsUser"] != 0
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    for scope in (pod_context, context):
        assert scope["seccompProfile"] == {"type": "RuntimeDefault"}
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]
    # Everything the server writes is on an emptyDir: the root filesystem is read-only.
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        assert mount.get("readOnly") or "emptyDir" in volume, mount
    assert {"/tmp", "/var/lib/kuberun-trio"} <= writable


@pytest.mark.parametrize("tree", TREES)
def test_gateway_identity_probes_and_shutdown(tree: str) -> None:
    pod = deployment(tree)["spec"]["template"]["spec"]
    container = gateway_container(tree)
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]
           if "valueFrom" in e}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace",
                   "POD_UID": "metadata.uid"}
    # TCP on the SSH port until the health endpoint lands (then httpGet /readyz, /healthz).
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert (container_port(container, get["port"]), get["path"]) == (7000, path)
    assert {p["containerPort"] for p in container["ports"]} == {2222, 9100, 7000}
    config = parse_server_config(gateway_config(render(tree)), instance="test")
    grace = float(option(container["args"], "--grace"))
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > (
        pre_stop + grace + config.kubernetes.timeouts.pod_stop)


@pytest.mark.parametrize("tree", TREES)
def test_service_keeps_client_addresses_and_reaches_ssh(tree: str) -> None:
    objects = render(tree)
    service = one(objects, "Service", "kuberun-trio", GATEWAY_NS)
    spec = service["spec"]
    assert spec["type"] == "LoadBalancer" and spec["externalTrafficPolicy"] == "Local"
    labels = deployment(tree)["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"].items() <= labels.items()
    (port,) = spec["ports"]
    assert container_port(gateway_container(tree), port["targetPort"]) == 2222
    budget = one(objects, "PodDisruptionBudget", namespace=GATEWAY_NS)
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] < deployment(tree)["spec"]["replicas"]


def allowed(policy: Obj, address: str, port: int = 443) -> bool:
    """Whether the policy's egress lets a guest pod reach ``address`` (an IP block rule)."""
    ip = ipaddress.ip_address(address)
    for rule in policy["spec"]["egress"]:
        if rule.get("ports") and not any(p.get("port") == port for p in rule["ports"]):
            continue
        for peer in rule.get("to", []):
            block = peer.get("ipBlock")
            if block is None or ip not in ipaddress.ip_network(block["cidr"]):
                continue
            if not any(ip in ipaddress.ip_network(e) for e in block.get("except", [])):
                return True
    return False


@pytest.mark.parametrize("tree", TREES)
def test_guest_network_policy(tree: str) -> None:
    policy = one(render(tree), "NetworkPolicy", namespace=GUEST_NS)
    spec = policy["spec"]
    assert spec["podSelector"] == {}  # every pod of the guest namespace
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"} and not spec.get("ingress")
    # The metadata service and the usual API server addresses (default ClusterIPs of
    # kubeadm/kind, GKE, EKS; endpoints on private node networks) are unreachable.
    for address in ("169.254.169.254", "10.96.0.1", "10.0.0.1", "172.20.0.1",
                    "192.168.49.2", "fd00:ec2::254"):
        for port in (53, 80, 443, 6443):
            assert not allowed(policy, address, port), (address, port)
    assert allowed(policy, "1.1.1.1") and allowed(policy, "2606:4700::1111")
    # Rules limited to ports are DNS only; the one without is the internet rule above.
    for rule in spec["egress"]:
        if "ports" in rule:
            assert {p["port"] for p in rule["ports"]} == {53}
    assert sum("ports" not in rule for rule in spec["egress"]) == 1
    if tree == OVERLAY:  # the example's public API server address
        assert not allowed(policy, "203.0.113.10")


def test_policy_check_can_fail() -> None:
    """``allowed`` is not vacuous: without its exceptions the metadata address is open."""
    policy = yaml.safe_load(yaml.safe_dump(one(render(BASE), "NetworkPolicy")))
    policy["spec"]["egress"][0]["to"][0]["ipBlock"].pop("except")
    assert allowed(policy, "169.254.169.254")


@pytest.mark.parametrize("tree", TREES)
def test_prometheus_scrapes_the_metrics_port(tree: str) -> None:
    annotations = deployment(tree)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert container_port(gateway_container(tree), "metrics") == int(
        annotations["prometheus.io/port"])
    assert annotations["prometheus.io/path"] == "/metrics"


def test_optional_service_monitor() -> None:
    """deploy/optional/servicemonitor.yaml: a ClusterIP metrics Service that validates,
    and a ServiceMonitor (a CRD: no schema) that selects it by label and port name."""
    docs = list(yaml.safe_load_all((ROOT / "deploy/optional/servicemonitor.yaml").read_text()))
    service = one(docs, "Service")
    monitor = one(docs, "ServiceMonitor")
    validate(service)
    assert service["spec"]["type"] == "ClusterIP"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    (port,) = service["spec"]["ports"]
    assert endpoint["port"] == port["name"]
    assert container_port(gateway_container(BASE), port["targetPort"]) == 9100
    labels: dict[str, Any] = deployment(BASE)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """What the Pod Security "restricted" profile would refuse in a pod spec (the checks
    that can apply to ours: host namespaces and ports, volume types, privilege,
    capabilities, non-root, seccomp)."""
    problems = [k for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]
    problems += [f"volume {v['name']}" for v in spec.get("volumes", [])
                 if not set(v) - {"name"} <= RESTRICTED_VOLUMES]
    pod = spec.get("securityContext", {})
    for c in spec.get("initContainers", []) + spec["containers"]:
        ctx = {**pod, **c.get("securityContext", {})}
        name = c["name"]
        problems += [f"{name}: hostPort" for p in c.get("ports", []) if p.get("hostPort")]
        if ctx.get("privileged") or ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: privilege")
        caps = c.get("securityContext", {}).get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: capabilities")
        if ctx.get("runAsNonRoot") is not True or ctx.get("runAsUser") == 0:
            problems.append(f"{name}: runAsNonRoot")
        if ctx.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccomp")
    return problems


@pytest.mark.parametrize("tree", TREES)
def test_pods_pass_the_restricted_pod_security_their_namespaces_enforce(tree: str) -> None:
    objects = render(tree)
    levels = {n["metadata"]["name"]: n["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
              for n in find(objects, "Namespace")}
    assert levels == {GATEWAY_NS: "restricted", GUEST_NS: "restricted"}
    assert restricted_violations(deployment(tree)["spec"]["template"]["spec"]) == []
    guest = parse_server_config(gateway_config(objects), instance="test").kubernetes.pod.spec
    assert restricted_violations(dict(guest)) == []
    # the check can fail
    loose = yaml.safe_load(yaml.safe_dump(dict(guest)))
    del loose["containers"][0]["securityContext"]["capabilities"]
    loose["securityContext"]["runAsNonRoot"] = False
    assert restricted_violations(loose) == ["shell: capabilities", "shell: runAsNonRoot"]
