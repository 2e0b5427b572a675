import sys

from luvc_common.cli import main

sys.exit(main(["serve", "llm", *sys.argv[1:]]))
