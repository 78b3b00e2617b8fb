"""Deployment files. Only the Prometheus rules and config and the Alertmanager config ship in the
package (`trainguard.resources`); the Dockerfile, compose file and Kubernetes manifests do not."""
