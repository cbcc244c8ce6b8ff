from bench.local.cli import main

main()
