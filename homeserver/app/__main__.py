import sys

from homeserver.app.cli import main

sys.exit(main())
