"""iterdpo: online iterative DPO, locally or on Kubernetes."""

__version__ = "0.1.0"  # the one place: pyproject.toml, the default image tag and the chart's appVersion follow it
