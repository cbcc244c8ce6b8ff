from bench.anytime.cli import main

main()
