import sys

from skybatch.server.daemon import main

sys.exit(main())
