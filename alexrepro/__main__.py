from alexrepro.cli.app import main

main()
