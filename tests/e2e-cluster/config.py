"""Certificates, kubeconfigs and component configuration of the e2e cluster, written into its
run directory before anything starts. One node, ``pgrelief-e2e``, whose address exists only in
the cluster's own network namespace.

The components are configured as kubeadm would: client certificates from one CA with the
identities the bootstrap RBAC policy names (system:kube-controller-manager, system:kube-
scheduler, system:node:<node>, system:kube-proxy), Node+RBAC authorization, NodeRestriction,
per-controller ServiceAccount credentials, ServiceAccount token signing with an RSA key.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

NODE_NAME = "pgrelief-e2e"
NODE_IP = "10.88.0.2"
NODE_CIDR = f"{NODE_IP}/24"
NODE_LINK = "e2e0"
POD_SUBNET = "10.244.0.0/24"
POD_GATEWAY = "10.244.0.1"
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
API_PORT = 6443
ETCD_URL = "http://127.0.0.1:2379"
CNI_BIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins
# What the kubelet insists on (setupKernelTunables): shown to it as files, never set.
KUBELET_SYSCTLS = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}
# Per network namespace: set inside the cluster's namespace only.
NETNS_SYSCTLS = {
    "net/ipv4/ip_forward": "1",
    "net/bridge/bridge-nf-call-iptables": "1",
    "net/bridge/bridge-nf-call-ip6tables": "1",
}


@dataclass(frozen=True)
class Paths:
    run: Path

    @property
    def pki(self) -> Path:
        return self.run / "pki"

    @property
    def etc(self) -> Path:
        return self.run / "etc"

    @property
    def containerd_socket(self) -> Path:
        return self.run / "containerd" / "containerd.sock"

    @property
    def host_kubeconfig(self) -> Path:
        return self.run / "admin.kubeconfig"

    def kubeconfig(self, who: str) -> Path:
        return self.etc / f"{who}.kubeconfig"

    def cert(self, name: str) -> Path:
        return self.pki / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.pki / f"{name}.key"


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {args[0]}: {proc.stderr.strip()}")


def write_pki(p: Paths) -> None:
    p.pki.mkdir(parents=True, mode=0o700)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
        "-subj", "/CN=pgrelief-e2e-ca", cwd=p.pki,
    )  # fmt: skip
    leaves: dict[str, tuple[str, str, list[str]]] = {
        # name: (subject, extendedKeyUsage, subjectAltNames)
        "apiserver": (
            "/CN=kube-apiserver",
            "serverAuth",
            [
                f"IP:{NODE_IP}",
                f"IP:{KUBERNETES_SERVICE_IP}",
                "IP:127.0.0.1",
                "DNS:localhost",
                "DNS:kubernetes",
                "DNS:kubernetes.default",
                "DNS:kubernetes.default.svc",
                "DNS:kubernetes.default.svc.cluster.local",
            ],
        ),
        "kubelet-serving": (
            f"/CN={NODE_NAME}",
            "serverAuth",
            [f"IP:{NODE_IP}", f"DNS:{NODE_NAME}"],
        ),
        "admin": ("/O=system:masters/CN=pgrelief-e2e-admin", "clientAuth", []),
        "apiserver-kubelet-client": ("/CN=kube-apiserver-kubelet-client", "clientAuth", []),
        "controller-manager": ("/CN=system:kube-controller-manager", "clientAuth", []),
        "scheduler": ("/CN=system:kube-scheduler", "clientAuth", []),
        "kubelet": (f"/O=system:nodes/CN=system:node:{NODE_NAME}", "clientAuth", []),
        "kube-proxy": ("/CN=system:kube-proxy", "clientAuth", []),
    }
    for name, (subject, usage, sans) in leaves.items():
        ext = p.pki / f"{name}.ext"
        lines = [
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            f"extendedKeyUsage={usage}",
        ]
        if sans:
            lines.append("subjectAltName=" + ",".join(sans))
        ext.write_text("\n".join(lines) + "\n")
        _openssl(
            "req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", subject, cwd=p.pki,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-set_serial", str(secrets.randbits(63)), "-days", "3650", "-out", f"{name}.crt",
            "-extfile", ext.name, cwd=p.pki,
        )  # fmt: skip
    # ServiceAccount tokens are RS256-signed, as on a kubeadm cluster.
    _openssl(
        "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key",
        cwd=p.pki,
    )  # fmt: skip
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=p.pki)


def write_kubeconfig(path: Path, server: str, p: Paths, user: str) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": NODE_NAME,
                "cluster": {"server": server, "certificate-authority": str(p.cert("ca"))},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate": str(p.cert(user)),
                    "client-key": str(p.key(user)),
                },
            }
        ],
        "contexts": [
            {
                "name": NODE_NAME,
                "context": {"cluster": NODE_NAME, "user": user, "namespace": "default"},
            }
        ],
        "current-context": NODE_NAME,
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)


def _kubelet_config(p: Paths) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "healthzBindAddress": "127.0.0.1",
        "readOnlyPort": 0,
        "tlsCertFile": str(p.cert("kubelet-serving")),
        "tlsPrivateKeyFile": str(p.key("kubelet-serving")),
        # Only the API server (its kubelet-client certificate) can reach the kubelet API.
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(p.cert("ca"))},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "containerRuntimeEndpoint": f"unix://{p.containerd_socket}",
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,  # this machine has cgroup v1 only
        "failSwapOn": False,
        "oomScoreAdj": 0,  # no CAP_SYS_RESOURCE here: the kubelet cannot lower its own
        "protectKernelDefaults": True,  # verify, never change, the machine's sysctls
        "podLogsDir": str(p.run / "pod-logs"),
        "resolvConf": str(p.etc / "resolv.conf"),
        "clusterDomain": "cluster.local",
        "shutdownGracePeriod": "0s",
        "shutdownGracePeriodCriticalPods": "0s",
        "imageGCHighThresholdPercent": 100,  # never delete the images we imported
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "serializeImagePulls": False,
        "rotateCertificates": False,
        "registerNode": True,
    }


def _kube_proxy_config(p: Paths) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(p.kubeconfig("kube-proxy"))},
        "mode": "iptables",
        "hostnameOverride": NODE_NAME,
        "clusterCIDR": POD_SUBNET,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        # 0 = leave the kernel's conntrack settings alone (nf_conntrack_max is machine-wide).
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    }


def _containerd_config(p: Paths, pause_image: str) -> str:
    root = p.run / "containerd"
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{root / "root"}"
state = "{root / "state"}"
oom_score = 0
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{p.containerd_socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{root / "opt"}"

[{cri}]
  sandbox_image = "{pause_image}"
  # runc cannot lower oom_score_adj without CAP_SYS_RESOURCE, which this machine lacks.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false

[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{p.run / "cni"}"
"""


def _cni_config(p: Paths) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "pgrelief-e2e",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "ipMasq": False,  # nothing outside the namespace to masquerade to
                "hairpinMode": True,  # a pod reaching itself through its Service
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET, "gateway": POD_GATEWAY}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(p.run / "cni-ipam"),
                },
            }
        ],
    }


def write_plan(
    p: Paths, bin_dir: Path, pause_image: str, forward_fd: int, cgroup_mounts: list[list[str]]
) -> None:
    """Write every config file and plan.json, the list nsinit.py works through."""
    for d in (p.etc, p.etc / "sysctl", p.run / "cni", p.run / "pod-logs", p.run / "logs"):
        d.mkdir(parents=True, exist_ok=True)
    (p.etc / "resolv.conf").write_text(
        "# No DNS server in the e2e cluster: lookups fail at once instead of leaving it.\n"
        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"
    )
    (p.etc / "hosts").write_text(f"127.0.0.1 localhost\n{NODE_IP} {NODE_NAME}\n")
    server = f"https://{NODE_IP}:{API_PORT}"
    for who in ("admin", "controller-manager", "scheduler", "kubelet", "kube-proxy"):
        write_kubeconfig(p.kubeconfig(who), server, p, who)
    (p.etc / "kubelet.yaml").write_text(yaml.safe_dump(_kubelet_config(p)))
    (p.etc / "kube-proxy.yaml").write_text(yaml.safe_dump(_kube_proxy_config(p)))
    (p.etc / "containerd.toml").write_text(_containerd_config(p, pause_image))
    (p.run / "cni" / "10-pgrelief-e2e.conflist").write_text(json.dumps(_cni_config(p), indent=1))

    b = str(bin_dir)
    ca, pki = str(p.cert("ca")), p.pki
    probe_tls = {"ca": ca, "cert": str(p.cert("admin")), "key": str(p.key("admin"))}
    services: list[dict[str, Any]] = [
        {
            "name": "etcd",
            "argv": [
                f"{b}/etcd", "--name", NODE_NAME, "--data-dir", str(p.run / "etcd"),
                "--listen-client-urls", ETCD_URL, "--advertise-client-urls", ETCD_URL,
                "--listen-peer-urls", "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                "--initial-cluster", f"{NODE_NAME}=http://127.0.0.1:2380",
                "--unsafe-no-fsync", "--log-level", "warn",
            ],
            "ready": {"url": f"{ETCD_URL}/health"},
        },
        {
            "name": "kube-apiserver",
            "argv": [
                f"{b}/kube-apiserver", f"--etcd-servers={ETCD_URL}",
                "--bind-address=0.0.0.0", f"--advertise-address={NODE_IP}",
                f"--secure-port={API_PORT}",
                f"--tls-cert-file={p.cert('apiserver')}",
                f"--tls-private-key-file={p.key('apiserver')}",
                f"--client-ca-file={ca}",
                f"--kubelet-client-certificate={p.cert('apiserver-kubelet-client')}",
                f"--kubelet-client-key={p.key('apiserver-kubelet-client')}",
                "--kubelet-preferred-address-types=InternalIP",
                "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true", "--profiling=false", "--v=1",
            ],
            "ready": {"url": f"https://{NODE_IP}:{API_PORT}/readyz", **probe_tls},
        },
        {
            "name": "kube-controller-manager",
            "argv": [
                f"{b}/kube-controller-manager",
                f"--kubeconfig={p.kubeconfig('controller-manager')}",
                "--use-service-account-credentials=true", f"--root-ca-file={ca}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--cluster-signing-cert-file={ca}", f"--cluster-signing-key-file={pki / 'ca.key'}",
                "--allocate-node-cidrs=false", "--leader-elect=false", "--secure-port=0",
                "--v=1",
            ],
            "ready": {"alive": 1},
        },
        {
            "name": "kube-scheduler",
            "argv": [
                f"{b}/kube-scheduler", f"--kubeconfig={p.kubeconfig('scheduler')}",
                "--leader-elect=false", "--secure-port=0", "--v=1",
            ],
            "ready": {"alive": 1},
        },
        {
            "name": "containerd",
            "argv": ["containerd", "--config", str(p.etc / "containerd.toml")],
            "ready": {"unix": str(p.containerd_socket)},
        },
        {
            "name": "kubelet",
            "argv": [
                f"{b}/kubelet", f"--config={p.etc / 'kubelet.yaml'}",
                f"--kubeconfig={p.kubeconfig('kubelet')}", f"--root-dir={p.run / 'kubelet'}",
                f"--node-ip={NODE_IP}", f"--hostname-override={NODE_NAME}", "--v=1",
            ],
            "ready": {"url": "http://127.0.0.1:10248/healthz"},
        },
        {
            "name": "kube-proxy",
            "argv": [f"{b}/kube-proxy", f"--config={p.etc / 'kube-proxy.yaml'}", "--v=1"],
            "ready": {"alive": 1},
        },
    ]  # fmt: skip
    plan = {
        "hostname": NODE_NAME,
        "cgroup_mounts": cgroup_mounts,
        "masked_sysctls": KUBELET_SYSCTLS,
        "netns_sysctls": NETNS_SYSCTLS,
        "network": {"link": NODE_LINK, "node_cidr": NODE_CIDR},
        "forward": {"fd": forward_fd, "host": NODE_IP, "port": API_PORT},
        "env": {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
        "services": services,
    }
    (p.run / "plan.json").write_text(json.dumps(plan, indent=1))
