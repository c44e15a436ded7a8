"""How ranks share the training state: averaged replicas, local SGD, sharded state, pipeline
stages."""
