"""Pinned versions of every component of the local cluster; the build cache is keyed by them."""

KUBERNETES = "v1.35.4"
# k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with local paths;
# a module that depends on it must replace them with the published v0.<minor>.<patch> tags.
KUBERNETES_STAGING = "v0" + KUBERNETES[2:]
ETCD = "v3.6.16"
TRAINING_OPERATOR = "v1.9.3"
KWOK = "v0.8.0"
HELM = "v3.22.0"
# Kubernetes minor version of the client-go that helm v3.22.0 requires (v0.37.0); helm stamps it
# as the default Capabilities.KubeVersion for `helm template` and for lint deprecation checks.
HELM_KUBE_MINOR = "37"
