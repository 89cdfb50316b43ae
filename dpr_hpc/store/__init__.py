"""The store: one owner of everything written under a run's folder -- stage-job paths, records,
claims, attempt markers, grid bindings and the runs found on disk."""
