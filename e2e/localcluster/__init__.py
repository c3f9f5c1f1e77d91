"""A real Kubernetes control plane on one machine, built from the package registries.

Used by `make cluster-up`, the e2e pytest fixtures and `make demo`.
"""
