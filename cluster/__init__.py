"""Ray clusters for ftune: a local multi-node cluster, the spot-notice watcher, AWS and KubeRay configs."""
