from alexrepro.cli import main

main()
