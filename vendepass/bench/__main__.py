from vendepass.bench.cli import main

main()
