"""HTTP plumbing shared by the transports: routing, JSON bodies, Matrix errors, CORS."""
