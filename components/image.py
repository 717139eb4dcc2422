"""The container image every Kubeflow component runs in (built from the project's Dockerfile)."""

IMAGE = "ghcr.io/switchprune/switchprune:0.1.0"
