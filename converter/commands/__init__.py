"""The command line's subcommands, one module each: ``add_args(parser)`` defines its options, ``run(args)`` calls
the library, prints what it returns and gives the exit code. converter/cli.py dispatches to them (imported on
use, so ``qconvert --help`` loads no model code). Only this layer (and cli.py) prints or reads argparse.
"""
