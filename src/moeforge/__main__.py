import sys

from moeforge.cli import main

sys.exit(main())
