"""iterdpo: online iterative DPO, locally or on Kubernetes."""
