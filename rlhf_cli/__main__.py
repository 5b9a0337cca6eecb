from rlhf_cli.cli import main

main()
