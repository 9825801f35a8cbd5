"""The cluster: nodes find each other through a HashiCorp Serf agent beside each one
(membership, failure detection, encrypted gossip: not written here), place lessons with
pure functions over the members they see, and answer each other's URLs."""
