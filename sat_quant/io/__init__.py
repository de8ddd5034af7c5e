"""Checkpoints on disk: atomic publishing, tensor files, manifests, save, load, model-parallel split/merge.

Takes models, tensors, QuantConfigs and plain dicts; never an ``argparse.Namespace`` (that is the sat layer's).
"""
