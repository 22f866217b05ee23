"""imgpipe reconciler: keeps the bucket and Redis consistent (orphaned objects, stuck jobs)."""
