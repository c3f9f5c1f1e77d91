"""Pinned versions of every component of the local cluster; the build cache is keyed by them."""

KUBERNETES = "v1.35.4"
# k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with local paths;
# a module that depends on it must replace them with the published v0.<minor>.<patch> tags.
KUBERNETES_STAGING = "v0" + KUBERNETES[2:]
ETCD = "v3.6.16"
TRAINING_OPERATOR = "v1.9.3"
KWOK = "v0.8.0"
# Kueue (job queueing, quota and preemption); v0.17.0 is the newest the Go module proxy serves and
# builds with go1.26 (its go.mod says go 1.25.0).
KUEUE = "v0.17.0"
# The commit date of the release (the Go module proxy's .info Time), stamped as its build date.
KUEUE_RELEASE_DATE = "2026-03-31T10:20:15Z"
HELM = "v3.22.0"
# Kubernetes minor version of the client-go that helm v3.22.0 requires (v0.37.0); helm stamps it
# as the default Capabilities.KubeVersion for `helm template` and for lint deprecation checks.
HELM_KUBE_MINOR = "37"
# The real node: CoreDNS (cluster DNS, a slim build with only the plugins the cluster uses), the
# NetworkPolicy engine (kube-router's firewall alone) and crictl (CRI client for the node's pods).
COREDNS = "v1.14.7"            # requires client-go v0.35.4, the same as KUBERNETES_STAGING
KUBE_ROUTER = "v2.1.0"         # the only version the Go module proxy serves; see KUBE_ROUTER_UPGRADES
CRI_TOOLS = "v1.34.0"
# kube-router v2.1.0 pins dependencies with published advisories (golang.org/x/net among them).
# Its helper module upgrades them to patched releases; the netpol controller's code is unchanged.
KUBE_ROUTER_UPGRADES = (
    "golang.org/x/net@v0.62.0",
    "golang.org/x/crypto@v0.59.0",
    "golang.org/x/sys@v0.50.0",
    "golang.org/x/text@v0.44.0",
    "golang.org/x/oauth2@v0.38.0",
    "google.golang.org/grpc@v1.85.0",
    "google.golang.org/protobuf@v1.36.12",
)
# Prometheus from its Go module (Debian's 2.42 is built without Kubernetes service discovery):
# module v0.316.0 is Prometheus 3.16.0, built with only the discovery mechanisms the cluster uses.
PROMETHEUS = "v0.316.0"
PROMETHEUS_RELEASE = "3.16.0"
# The runtimes the integrations meet (e2e/runtimes/): Argo CD's Lua VM and kstatus.
GOPHER_LUA = "v1.1.2"          # the Lua VM inside Argo CD: what argo-cd 3.6 requires (go.mod, util/lua)
CLI_UTILS = "v0.37.2"          # sigs.k8s.io/cli-utils (pkg/kstatus, as Flux, kpt and Helm 4 use it); the newest served
