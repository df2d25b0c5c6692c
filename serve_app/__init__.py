"""Everything Ray Serve deploys: the HTTP ingress, one deployment per agent, the embedder."""
