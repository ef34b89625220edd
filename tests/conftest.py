"""Settings for every test: cheap password hashing in the servers tests start."""

import os

# bcrypt at cost 12 takes ~250 ms a hash; servers started by tests inherit this.
os.environ.setdefault("HOMESERVER_BCRYPT_ROUNDS", "4")
