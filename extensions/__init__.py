"""Optional plugins shipped with Loadstar (one folder each)."""
