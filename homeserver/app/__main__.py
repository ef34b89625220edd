import sys

from homeserver.app.entry import main

sys.exit(main())
