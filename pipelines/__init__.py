"""The HEALNet Kubeflow pipeline definition and its command line (`python -m pipelines`)."""
