import sys

from skybatch.agent.agent import main

sys.exit(main())
