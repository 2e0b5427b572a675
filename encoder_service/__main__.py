import sys

from luvc_common.cli import main

sys.exit(main(["serve", "encoder", *sys.argv[1:]]))
