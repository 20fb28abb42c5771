"""The iterdpo operator: reconciles IterativeDPORun resources on Kubernetes (kopf)."""
