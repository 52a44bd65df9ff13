"""Backbones behind one Learner protocol, built by name from typed configs (see registry)."""
